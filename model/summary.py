"""`python -m model.summary <model-config-name> [key=value ...]`: sizes and training FLOPs of a model config.

Prints one JSON line: total_params, active_params, mtp_params, embedding_params (conventions in
`model/flops.py`) and flops_per_token (forward + backward, MTP included) at `train.seq_len`
(default 4096). The model is also built on the meta device (no memory, so `v3_671b` works on a
laptop) and its real parameter counts are checked against the formulas.

It also prints the training memory per GPU of a layout (`model/memory.py`, formula and assumptions
there): memory_gib_per_gpu, memory_breakdown {params_gib, grads_gib, optimizer_gib, activations_gib}
and the layout echoed. These keys are always printed; without overrides the layout is a single GPU
(pp = dp = ep = 1) with ZeRO-1 on (a no-op there), micro-batch 1, precision bf16.

Overrides: `hidden_size=512` or `model.hidden_size=512` change the model config,
`train.seq_len=8192` the sequence length (FLOP count and activations); the layout:
`parallel.pp= parallel.dp= parallel.ep= parallel.schedule= parallel.stages_per_rank=
parallel.layers_per_stage=[..] parallel.zero=true|false train.micro_batch= precision=bf16|fp8|fp32
precision.fused_head_loss=true|false (default: the precision config's) optim.moments_dtype=bf16|fp32`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
from omegaconf import OmegaConf

from .config import ModelConfig
from .flops import expert_params, flops_per_token, param_counts
from .memory import Layout, memory_per_gpu
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


LAYOUT_KEYS = {"parallel.pp": "pp", "parallel.dp": "dp", "parallel.ep": "ep", "parallel.schedule": "schedule",
               "parallel.stages_per_rank": "stages_per_rank", "parallel.layers_per_stage": "layers_per_stage",
               "parallel.zero": "zero", "train.micro_batch": "micro_batch", "precision": "precision",
               "precision.fused_head_loss": "fused_head_loss", "optim.moments_dtype": "moments_dtype"}


def split_layout_overrides(overrides: Sequence[str]) -> Tuple[Dict[str, object], List[str]]:
    """The `Layout` fields given among `overrides` (values parsed as YAML), and the other overrides."""
    fields: Dict[str, object] = {}
    rest: List[str] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key in LAYOUT_KEYS:
            fields[LAYOUT_KEYS[key]] = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={value}"]))["v"]
        elif sep and key.startswith("parallel."):
            raise ValueError(f"unknown override {item!r}: the layout keys are {', '.join(LAYOUT_KEYS)}")
        else:
            rest.append(item)
    return fields, rest


def precision_default(precision: str, key: str):
    """`key` of `configs/precision/<precision>.yaml` (False when the file or key is absent: a bad
    precision name is reported by the layout check)."""
    path = CONFIG_DIR.parent / "precision" / f"{precision}.yaml"
    return bool(OmegaConf.load(path).get(key, False)) if path.is_file() else False


def main(argv: Sequence[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    try:
        fields, rest = split_layout_overrides(argv[1:])
        if "fused_head_loss" not in fields:
            fields["fused_head_loss"] = precision_default(str(fields.get("precision", "bf16")), "fused_head_loss")
        cfg, seq_len = load_model_config(argv[0], rest)
        memory = memory_per_gpu(cfg, Layout(seq_len=seq_len, **fields))
    except (ValueError, FileNotFoundError) as err:
        print(f"model.summary: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"model": argv[0], **summarize(cfg, seq_len), **memory}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
