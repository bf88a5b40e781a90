"""Activation memory: bytes saved for backward per token, FP8 recipe vs BF16 without recompute.

The recipe is what `precision=fp8` trains with: `model.fp8.apply_fp8` (DeepSeek-V3 sections 3.2.3
and 3.3.2: FP8 caching of the linears' inputs, E5M6 for the linear after attention, the SwiGLU input
cached in FP8 with its output recomputed, RMSNorm and the MLA projections recomputed) plus the
settings of configs/precision/fp8.yaml, i.e. `fused_head_loss: true` (model/head_loss.py: output
head + cross-entropy chunk by chunk, keeping the head's input and the labels instead of the logits,
which backward recomputes). The baseline is the same model under bf16 autocast, nothing
recomputed, plain head + `F.cross_entropy`.

Measured with `torch.autograd.graph.saved_tensors_hooks` during one forward of `lm_loss`: every
tensor autograd keeps for backward is counted once per storage (its whole storage, since that is
what stays alive), parameters excluded. "Per token" is the slope between two batch sizes at the same
sequence length, so per-step constants (autocast's bf16 weight copies) drop out. Rows: the
Transformer blocks (main layers and the MTP block), the whole forward including embedding, output
head and cross-entropy, and the time cost of the fused head loss (forward + backward, median of
`--repeats`, same FP8 model with the plain head loss as the peer; on CPU the FP8 kernels are the
slow reference ones, so the head alone is timed too, at the main head's shapes under bf16 autocast).

    python -m bench.activation_memory [--model tiny] [--seq-len 128] [--repeats 9]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Dict

import torch
import torch.nn.functional as F
import yaml

from model import ModelConfig, Transformer, lm_loss
from model.block import Block
from model.fp8 import apply_fp8
from model.head_loss import head_cross_entropy

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


def build(cfg: ModelConfig, recipe: bool) -> Transformer:
    """The fp8 recipe as `precision=fp8` trains it (apply_fp8 + configs/precision/fp8.yaml), or the
    bf16 baseline (plain model, plain head loss)."""
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    if recipe:
        settings = yaml.safe_load((ROOT / "configs" / "precision" / "fp8.yaml").read_text())
        model.fused_head_loss = bool(settings.get("fused_head_loss", False))
        apply_fp8(model)
    return model


def per_token(model: Transformer, seq_len: int, batches=(2, 4)) -> Dict[str, float]:
    """Slope of saved bytes over tokens between the two batch sizes."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.vocab_size, (max(batches), seq_len + 1), generator=gen)
    small, large = (saved_bytes(model, tokens[:b]) for b in batches)
    dt = (batches[1] - batches[0]) * seq_len
    return {k: (large[k] - small[k]) / dt for k in small}


def median_ms(fns: Dict[str, Callable[[], torch.Tensor]], repeats: int) -> Dict[str, float]:
    """{name: median wall time of fn() + backward in ms}; the functions take turns (after one warm-up
    round), so that load from other processes falls on all of them alike."""
    times: Dict[str, list] = {name: [] for name in fns}
    for _ in range(repeats + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn().backward()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def timings(model: Transformer, batch: int, seq_len: int, repeats: int) -> Dict[str, Dict[str, float]]:
    """{case: {"fused": ms, "plain": ms}}: lm_loss forward + backward of `model`, and the main head
    + cross-entropy alone at the same tokens."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=gen)
    h = torch.randn(batch * seq_len, cfg.hidden_size, generator=gen).requires_grad_()
    weight = model.lm_head.weight
    labels = tokens[:, 1:].flatten()

    def step(fused: bool) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = lm_loss(model, tokens, fused_head_loss=fused)
            return out["loss"] + 0.3 * out["mtp_loss"]

    def head(fused: bool) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                return head_cross_entropy(h, weight, labels)
            return F.cross_entropy(F.linear(h, weight).float(), labels)

    out = {}
    for case, fn in (("step", step), ("head", head)):
        out[case] = median_ms({"fused": lambda: fn(True), "plain": lambda: fn(False)}, repeats)
        model.zero_grad(set_to_none=True)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="a config name under configs/model (default tiny)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=9, help="timed forward+backward runs per case")
    args = parser.parse_args(argv)
    path = ROOT / "configs" / "model" / f"{args.model}.yaml"
    if not path.is_file():
        raise SystemExit(f"--model {args.model}: no {path}")
    if args.seq_len < 2 or args.repeats < 1:
        raise SystemExit(f"--seq-len must be >= 2 and --repeats >= 1, got {args.seq_len}, {args.repeats}")
    cfg = ModelConfig.from_dict(yaml.safe_load(path.read_text()))
    torch.set_num_threads(2)
    baseline = per_token(build(cfg, recipe=False), args.seq_len)
    model = build(cfg, recipe=True)
    fp8 = per_token(model, args.seq_len)
    recipe = "fp8 recipe (apply_fp8 + fused_head_loss from configs/precision/fp8.yaml)"
    what = {"blocks": "Transformer blocks (main layers + MTP block)",
            "total": "whole forward incl. embedding, head and cross-entropy"}
    for key in ("blocks", "total"):
        print(json.dumps({"bench": "activation_memory",
                          "case": f"{args.model}, seq_len {args.seq_len}, {what[key]}, bytes saved for backward",
                          "unit": "bytes/token", "ours": round(fp8[key], 1), "ours_is": recipe,
                          "peer": "bf16 autocast, no recompute, plain head + F.cross_entropy",
                          "peer_value": round(baseline[key], 1), "ratio": round(fp8[key] / baseline[key], 4)}),
              flush=True)
    what = {"step": f"lm_loss forward+backward of the fp8 recipe, 4 x {args.seq_len} tokens",
            "head": f"main head + cross-entropy alone, 4 x {args.seq_len} tokens, bf16 autocast"}
    for key, ms in timings(model, 4, args.seq_len, args.repeats).items():
        print(json.dumps({"bench": "activation_memory", "case": f"{args.model}, {what[key]}, time",
                          "unit": "ms", "ours": round(ms["fused"], 2), "ours_is": "fused head loss",
                          "peer": "plain head + F.cross_entropy", "peer_value": round(ms["plain"], 2),
                          "ratio": round(ms["fused"] / ms["plain"], 4)}), flush=True)


if __name__ == "__main__":
    main()
