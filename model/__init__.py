"""DeepSeek-V3-style model: `from model import ModelConfig, Transformer, load`."""
from .config import ModelConfig
from .transformer import Transformer, lm_loss, maxvio
from .loading import load

__all__ = ["ModelConfig", "Transformer", "load", "lm_loss", "maxvio"]
