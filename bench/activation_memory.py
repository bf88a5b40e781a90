"""Activation memory: bytes saved for backward per token, FP8 recipe vs BF16 without recompute.

DeepSeek-V3 sections 3.2.3 and 3.3.2: FP8 caching of the linears' inputs (E5M6 for the linear after
attention), the SwiGLU input cached in FP8 with its output recomputed, RMSNorm recomputed. The
baseline is the same model under bf16 autocast, nothing recomputed.

Measured with `torch.autograd.graph.saved_tensors_hooks` during one forward of `lm_loss`: every
tensor autograd keeps for backward is counted once per storage (its whole storage, since that is
what stays alive), parameters excluded. "Per token" is the slope between two batch sizes at the same
sequence length, so per-step constants (autocast's bf16 weight copies) drop out. Rows: the
Transformer blocks (main layers and the MTP block: what the recipe changes), and the whole forward
including embedding, output head and cross-entropy (kept in high precision in both recipes).

    python -m bench.activation_memory [--model tiny] [--seq-len 128]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict

import torch
import yaml

from model import ModelConfig, Transformer, lm_loss
from model.block import Block
from model.fp8 import apply_fp8

ROOT = Path(__file__).resolve().parents[1]


def saved_bytes(model: Transformer, tokens: torch.Tensor) -> Dict[str, int]:
    """{"blocks": bytes saved inside Block modules, "total": all bytes saved} for one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    depth = [0]
    counted: Dict[int, bool] = {}
    sums = {"blocks": 0, "total": 0}

    def enter(module, args):
        depth[0] += 1

    def leave(module, args, output):
        depth[0] -= 1

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in counted:
            counted[ptr] = True
            sums["total"] += storage.nbytes()
            if depth[0] > 0:
                sums["blocks"] += storage.nbytes()
        return t

    handles = []
    for m in model.modules():
        if isinstance(m, Block):
            handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast(tokens.device.type, dtype=torch.bfloat16):
                lm_loss(model, tokens)
    finally:
        for h in handles:
            h.remove()
    return sums


def per_token(cfg: ModelConfig, fp8: bool, seq_len: int, batches=(2, 4)) -> Dict[str, float]:
    """Slope of saved bytes over tokens between the two batch sizes."""
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    if fp8:
        apply_fp8(model)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (max(batches), seq_len + 1), generator=gen)
    small, large = (saved_bytes(model, tokens[:b]) for b in batches)
    dt = (batches[1] - batches[0]) * seq_len
    return {k: (large[k] - small[k]) / dt for k in small}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="a config name under configs/model (default tiny)")
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args(argv)
    path = ROOT / "configs" / "model" / f"{args.model}.yaml"
    if not path.is_file():
        raise SystemExit(f"--model {args.model}: no {path}")
    cfg = ModelConfig.from_dict(yaml.safe_load(path.read_text()))
    torch.set_num_threads(2)
    bf16 = per_token(cfg, False, args.seq_len)
    fp8 = per_token(cfg, True, args.seq_len)
    what = {"blocks": "Transformer blocks (main layers + MTP block)",
            "total": "whole forward incl. embedding, head and cross-entropy"}
    for key in ("blocks", "total"):
        print(json.dumps({"bench": "activation_memory",
                          "case": f"{args.model}, seq_len {args.seq_len}, {what[key]}, bytes saved for backward",
                          "unit": "bytes/token", "ours": round(fp8[key], 1),
                          "peer": "bf16 autocast, no recompute", "peer_value": round(bf16[key], 1),
                          "ratio": round(fp8[key] / bf16[key], 4)}), flush=True)


if __name__ == "__main__":
    main()
