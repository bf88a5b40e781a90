"""`load(path)`: a trained or imported model, on CPU, fp32, eval mode.

Accepts a training checkpoint (`out_dir/checkpoints/step_N`, or an `out_dir`, meaning its newest
complete checkpoint) or a Hugging Face DeepseekV3 directory (config.json + safetensors).
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

from .checkpoint_files import load_state, read_json, resolve_checkpoint
from .config import ModelConfig
from .transformer import Transformer


def load(path: Union[str, Path]) -> Transformer:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint or Hugging Face directory at {path}")
    if (path / "config.json").is_file() and not (path / "model_config.json").is_file():
        from .hf import load_hf_model
        model = load_hf_model(path)
    else:
        step_dir = resolve_checkpoint(path)
        if step_dir is None:
            raise FileNotFoundError(f"{path} holds no complete checkpoint (step_<N>/ with meta.json) "
                                    f"and is not a Hugging Face directory (config.json)")
        model = Transformer(ModelConfig.from_dict(read_json(step_dir / "model_config.json")))
        state = {"model": model.state_dict()}
        load_state(state, step_dir)
        model.load_state_dict(state["model"])
    return model.float().eval()
