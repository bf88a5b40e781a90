"""FP8 gradient error on real training states, against fp64 (DeepSeek-V3 section 3.3).

`bench.fp8_loss` says how far an FP8 run ends from a BF16 one; this bench says what the FP8 recipe does
to one step's gradient, which is what moves a run. The state is the end of `bench.fp8_loss`'s fp8 run
of a config and seed (trained here when `--keep` does not hold it). On that state and the next
`--batches` global batches of the run's own data, the step's gradient (CE + λ·MTP over the
micro-batches, the balance loss at its weight, as `train.py` computes it; no update) is computed by
the model moved to fp64 (router logits, attention scores and RoPE in fp32, as the model computes
them) and by the model as `train.py` runs it with precision=fp8, bf16 and fp32. Per batch and
precision:

- `relerr`: |g - g64| / |g64| over all parameters, and per part (`parts`: the embedding, the head,
  each layer's or the MTP module's attention, dense MLP, router, routed and shared experts, norms);
- `gain`: <g, g64> / |g64|², 1 when the error is unbiased, under 1 when rounding shrinks the gradient;
- `loss_gap_pct`: the step's loss against fp64's, in % (what the forward's rounding costs the loss).

JSON lines (bench contract): per batch and over all batches and seeds, `ours` = fp8's `relerr`,
`peer_value` = bf16's, with fp32's as `fp32_value`. Progress goes to stderr.

    python -m bench.fp8_grad_error [--configs wide] [--seeds 7] [--batches 3] [--steps N] [--keep DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from bench import fp8_loss
from model.transformer import lm_loss

PRECISIONS = ("fp8", "bf16", "fp32")
NORM_NAMES = ("layernorm", "enorm", "hnorm", "norm.weight")


def part_of(name: str) -> str:
    """The part of the model a parameter belongs to, e.g. "layers.1 experts", "mtp.0 attention", "lm_head"."""
    head, _, rest = name.partition(".")
    if head not in ("layers", "mtp"):
        return head
    index, _, rest = rest.partition(".")
    where = f"{head}.{index}"
    for marker, role in ((".experts.", "experts"), ("shared_experts.", "shared experts"), ("mlp.gate.", "router"),
                         ("self_attn.", "attention"), ("mlp.", "mlp")):
        if marker in "." + rest:
            return f"{where} {role}"
    if any(n in rest for n in NORM_NAMES):
        return f"{where} norms"
    return f"{where} {rest.rsplit('.', 1)[0]}"


def load_state(run_dir: Path, config: str, seed: int, precision: str, steps: Optional[int]):
    """A `Trainer` of `precision` holding the final checkpoint of `run_dir` (a run of another precision:
    the weights and the data position are the run's)."""
    from training.config import validate
    from training.distributed import init_distributed
    from training.inputs import prepare_inputs
    from training.loop import Trainer
    from training.sweep import plan_jobs

    args = [*fp8_loss.overrides(config, steps), *fp8_loss.TRAIN, f"seed={seed}", f"precision={precision}",
            f"out_dir={run_dir}"]
    cfg = plan_jobs(args)[0].cfg
    mcfg = validate(cfg, 1)
    with contextlib.redirect_stdout(sys.stderr):  # the resume's "changed config: precision" warning
        trainer = Trainer(cfg, mcfg, init_distributed(cfg.train.device, cfg.parallel.timeout_s),
                          prepare_inputs(cfg, mcfg))
        if trainer.resume() is None:
            raise SystemExit(f"{run_dir} holds no checkpoint")
    return trainer


def step_gradient(trainer, model, rows: torch.Tensor, autocast) -> Tuple[float, Dict[str, torch.Tensor]]:
    """(mean CE over the micro-batches, fp64 copies of the gradients) of one step on `rows`."""
    micro_batches = list(rows.split(trainer.micro_batch))
    tokens = trainer.progress.tokens
    lam = trainer.schedules.mtp_lambda(tokens)
    model.zero_grad(set_to_none=True)
    model.set_balance_loss_weight(trainer.mcfg.aux_loss_alpha / len(micro_batches))
    loss = 0.0
    for tokens_BT in micro_batches:
        with autocast():
            out = lm_loss(model, tokens_BT)
            total = (out["loss"] + lam * out["mtp_loss"]) / len(micro_batches)
        total.backward()
        loss += float(out["loss"].detach()) / len(micro_batches)
    grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss, grads


def compare(grads: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]) -> dict:
    """relerr (whole and per part) and gain of `grads` against `ref`."""
    err2, ref2, dot = 0.0, 0.0, 0.0
    parts: Dict[str, List[float]] = {}
    for name, r in ref.items():
        g = grads.get(name, torch.zeros_like(r))
        e2, r2 = float((g - r).square().sum()), float(r.square().sum())
        err2, ref2, dot = err2 + e2, ref2 + r2, dot + float((g * r).sum())
        acc = parts.setdefault(part_of(name), [0.0, 0.0])
        acc[0] += e2
        acc[1] += r2
    return {"relerr": (err2 / ref2) ** 0.5, "gain": dot / ref2,
            "parts": {p: round((e / r) ** 0.5, 4) for p, (e, r) in parts.items() if r > 0}}


def measure(config: str, seed: int, batches: int, out_root: Path, steps: Optional[int]) -> List[dict]:
    """Per batch: {precision: compare(...) + loss_gap_pct} at the end of the config's fp8 run."""
    fp8_loss.run(config, seed, "fp8", out_root, steps)
    run_dir = fp8_loss.run_dir(out_root, config, seed, "fp8", steps)
    trainers = {p: load_state(run_dir, config, seed, p, steps) for p in PRECISIONS}
    fp64 = copy.deepcopy(trainers["fp32"].model).double()
    results = []
    for b in range(batches):
        rows = trainers["fp32"]._next_rows()
        loss64, ref = step_gradient(trainers["fp32"], fp64, rows, contextlib.nullcontext)
        row = {"step": trainers["fp32"].progress.step + 1 + b, "fp64_loss": loss64,
               "fp64_grad_norm": sum(float(g.square().sum()) for g in ref.values()) ** 0.5}
        for p, t in trainers.items():
            loss, grads = step_gradient(t, t.model, rows, t.autocast)
            row[p] = {**compare(grads, ref), "loss_gap_pct": 100 * (loss / loss64 - 1)}
        print(f"{config} seed {seed} batch {b + 1}/{batches}: fp8 {row['fp8']['relerr']:.4f}, "
              f"bf16 {row['bf16']['relerr']:.4f}", file=sys.stderr, flush=True)
        results.append(row)
    return results


def _r(x: float) -> float:
    return round(x, 5)


def emit(case: str, fp8: float, bf16: float, fp32: float, **extra) -> None:
    print(json.dumps({"bench": "fp8_grad_error", "case": case, "unit": "relative gradient error vs fp64",
                      "ours": _r(fp8), "peer": "bf16, same state and rows", "peer_value": _r(bf16),
                      "ratio": _r(fp8 / bf16), "fp32_value": _r(fp32), **extra}), flush=True)


def report(config: str, seed: int, rows: List[dict]) -> None:
    for row in rows:
        emit(f"{config} seed {seed} step {row['step']}", *(row[p]["relerr"] for p in PRECISIONS),
             gain={p: _r(row[p]["gain"]) for p in PRECISIONS},
             loss_gap_pct={p: _r(row[p]["loss_gap_pct"]) for p in PRECISIONS},
             fp64_grad_norm=_r(row["fp64_grad_norm"]), parts_fp8=row["fp8"]["parts"], parts_bf16=row["bf16"]["parts"])


def summary(config: str, rows: List[dict]) -> None:
    mean = {p: statistics.mean(r[p]["relerr"] for r in rows) for p in PRECISIONS}
    emit(f"{config}, mean over {len(rows)} states and batches", *(mean[p] for p in PRECISIONS),
         gain={p: _r(statistics.mean(r[p]["gain"] for r in rows)) for p in PRECISIONS},
         loss_gap_pct={p: _r(statistics.mean(r[p]["loss_gap_pct"] for r in rows)) for p in PRECISIONS},
         fp8_relerr_range=[_r(min(r["fp8"]["relerr"] for r in rows)), _r(max(r["fp8"]["relerr"] for r in rows))])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="wide", help=f"comma-separated, of {sorted(fp8_loss.CONFIGS)}")
    parser.add_argument("--seeds", default="7", help="comma-separated seeds")
    parser.add_argument("--batches", type=int, default=3, help="batches measured per state")
    parser.add_argument("--steps", type=int, help="length of the fp8 run (default: the config's own)")
    parser.add_argument("--keep", help="bench.fp8_loss's --keep directory (default: a temporary one)")
    args = parser.parse_args(argv)
    configs = fp8_loss.parse_configs(args.configs)
    if args.batches < 1:
        raise SystemExit(f"--batches must be >= 1, got {args.batches}")
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        out_root = Path(args.keep).resolve() if args.keep else Path(tmp)
        for config in configs:
            rows = []
            for seed in seeds:
                measured = measure(config, seed, args.batches, out_root, args.steps)
                report(config, seed, measured)
                rows += measured
            summary(config, rows)


if __name__ == "__main__":
    main()
