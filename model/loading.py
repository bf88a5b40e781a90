"""`load(path)`: a trained or imported model, on CPU, fp32, eval mode.

Accepts a training checkpoint (`out_dir/checkpoints/step_N`, or an `out_dir`, meaning its newest
complete checkpoint) or a Hugging Face DeepseekV3 directory (config.json + safetensors).
`ema=True` takes a training checkpoint's EMA weights (train.ema_decay > 0) instead of its weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

from .checkpoint_files import load_model_state, read_json, resolve_checkpoint
from .config import ModelConfig
from .transformer import Transformer


def load(path: Union[str, Path], ema: bool = False) -> Transformer:
    """The model of a checkpoint or Hugging Face directory (with `ema`: the checkpoint's EMA weights)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint or Hugging Face directory at {path}")
    if (path / "config.json").is_file() and not (path / "model_config.json").is_file():
        from .hf import load_hf_model
        if ema:
            raise ValueError(f"{path} is a Hugging Face directory: it holds no EMA weights (--ema needs a "
                             f"training checkpoint)")
        model = load_hf_model(path)
    else:
        step_dir = resolve_checkpoint(path)
        if step_dir is None:
            raise FileNotFoundError(f"{path} holds no complete checkpoint (step_<N>/ with meta.json) "
                                    f"and is not a Hugging Face directory (config.json)")
        model = Transformer(ModelConfig.from_dict(read_json(step_dir / "model_config.json")))
        state = model.state_dict()
        load_model_state(state, step_dir, ema=ema)
        model.load_state_dict(state)
    return model.float().eval()
