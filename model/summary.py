"""Sizes and training FLOPs of a model config: the model's side of `python -m parallel.summary`.

`summarize(cfg, seq_len)`: total_params, active_params, mtp_params, embedding_params (conventions in
`model/flops.py`) and flops_per_token (forward + backward, MTP included) at `seq_len`. The model is
also built on the meta device (no memory, so `v3_671b` works on a laptop) and its real parameter
counts are checked against the formulas. `load_model_config` reads `configs/model/<name>.yaml` with
overrides.

The command `python -m parallel.summary <model-config-name> [key=value ...] [--fit GPUS --gpu-mem GIB]`
prints these figures together with the training memory per GPU of a layout and can search the
layouts that fit; it lives in the parallel package (the layer that knows layouts), which model/ never
imports.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
from omegaconf import OmegaConf

from .config import ModelConfig
from .flops import expert_params, flops_per_token, param_counts
from .transformer import Transformer

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"
DEFAULT_SEQ_LEN = 4096


def load_model_config(name: str, overrides: Sequence[str] = ()) -> Tuple[ModelConfig, int]:
    """ModelConfig from `configs/model/<name>.yaml` with `key=value` overrides, and the seq_len to use."""
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no model config {path}; known model configs: {', '.join(known)}")
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    seq_len = DEFAULT_SEQ_LEN
    model_overrides: List[str] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form key=value")
        if key == "train.seq_len":
            seq_len = int(value)
            continue
        key = key[len("model."):] if key.startswith("model.") else key
        if key not in ModelConfig.__dataclass_fields__:
            raise ValueError(f"unknown override {item!r}: allowed are train.seq_len and the model fields "
                             f"({', '.join(ModelConfig.__dataclass_fields__)})")
        model_overrides.append(f"{key}={value}")
    merged = OmegaConf.merge(OmegaConf.create(values), OmegaConf.from_dotlist(model_overrides))
    return ModelConfig.from_dict(OmegaConf.to_container(merged, resolve=True)), seq_len


def meta_param_counts(cfg: ModelConfig) -> Dict[str, int]:
    """The same counts as `param_counts`, taken from a model built on the meta device."""
    with torch.device("meta"):
        model = Transformer(cfg)
    total = mtp = embedding = 0
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name.startswith("mtp."):
            mtp += p.numel()
            continue
        total += p.numel()
        if name in ("embed_tokens.weight", "lm_head.weight"):
            embedding += p.numel()
    idle_experts = cfg.n_routed_experts - cfg.num_experts_per_tok
    idle = sum(idle_experts * expert_params(cfg) for layer in model.layers.values()
               if cfg.is_moe_layer(layer.layer_idx))
    lookup = 0 if cfg.tie_word_embeddings else model.embed_tokens.weight.numel()
    return {"total_params": total, "active_params": total - idle - lookup, "mtp_params": mtp,
            "embedding_params": embedding}


def summarize(cfg: ModelConfig, seq_len: int = DEFAULT_SEQ_LEN) -> Dict[str, float]:
    """Formula counts (checked against the meta-device model) and flops_per_token at `seq_len`."""
    counts = param_counts(cfg)
    real = meta_param_counts(cfg)
    if counts != real:
        raise RuntimeError(f"parameter formulas in model/flops.py disagree with the model: {counts} vs {real}")
    return {**counts, "seq_len": seq_len, "flops_per_token": flops_per_token(cfg, seq_len)}


if __name__ == "__main__":
    sys.exit("model.summary is a library; the command is `python -m parallel.summary "
             "<model-config-name> [key=value ...] [--fit GPUS --gpu-mem GIB]`")
