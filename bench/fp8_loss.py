"""FP8 vs BF16 training loss, per run and over the curve (DeepSeek-V3 section 3.3: relative gap < 0.25%).

Each run is the real trainer (`train.py`, one process, one thread) on the built-in corpus: same config,
seed and data, only `precision` changes. For every seed the bench runs precision=fp8, bf16 and fp32
and compares, per window of steps (default 10) and at the end (final validation loss):

- fp8 vs bf16: the gap of the FP8 recipe;
- bf16 vs fp32: the noise floor. Two runs that differ by anything (bf16 rounding here) drift apart
  at this scale (discrete routing, small batches), so a gap is only a defect if it stands above it;
- fp8 vs fp32 (`fp32_ratio`): when the bf16 run itself leaves the course (a spike of its own), fp8
  vs bf16 shows bf16's excursion, and this ratio says which of the two moved;
- the largest gradient norm after the first window, fp8 vs bf16, with fp32's (`fp32_value`): a step
  whose FP8 gradient is far off shows up as a spike there, and a spike in fp32 too is the model's.

Then, per window and at the end, the mean and the spread (standard deviation over seeds) of the
per-seed relative gaps, for fp8 vs bf16 next to bf16 vs fp32. Two configs: `tiny` (the CI model,
hidden 256: a 128-wide block is half a row) and `wide` (hidden 512, 2 layers + MTP, 2 × 128-row
blocks per expert matrix, matrices at std 0.0225: the report's std x sqrt(fan-in)), both kept small
enough for a CPU. Two runs go at a time (2 cores).

JSON lines (bench contract): per seed and window, `ours` = fp8 mean loss, `peer_value` = bf16's,
`ratio` = fp8 / bf16, with `floor_ratio` = bf16 / fp32 and `fp32_ratio` = fp8 / fp32 on the same seed
and window; per window over seeds, `ours`/`peer_value` are the means and `gap_pct` / `floor_gap_pct` /
`fp32_gap_pct` hold {mean, spread} in %.
Progress goes to stderr.

    python -m bench.fp8_loss [--configs tiny,wide] [--seeds 7,8,9] [--window 10] [--steps N] [--keep DIR]

`--steps N` runs each config for N steps instead of its own 60 (the learning-rate schedule, warmup and
cosine decay, stretches with it): the report's gap is that of a whole run, and a 60-step run ends while
the loss still falls steeply.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp8", "bf16", "fp32")
TRAIN = ["logging.every=1", "logging.wandb.mode=disabled"]
CONFIGS: Dict[str, List[str]] = {
    # the command: tiny, 60 steps of 8 x 128 tokens in 2 micro-batches
    "tiny": ["model=tiny", "train.seq_len=128", "train.global_batch=8", "train.micro_batch=4", "train.steps=60"],
    # hidden 512, experts of 256 (two 128-row blocks), 2 layers (1 dense, 1 MoE) + the MTP module; matrices
    # at std 0.006 x sqrt(7168 / 512) = 0.0225, the report's output scale std x sqrt(fan-in) at this width
    # (README, "Conditioning at small width")
    "wide": ["model=tiny", "model.hidden_size=512", "model.initializer_range=0.0225", "model.intermediate_size=1024",
             "model.moe_intermediate_size=256", "model.num_hidden_layers=2", "model.q_lora_rank=256", "model.kv_lora_rank=128",
             "model.num_attention_heads=8", "train.seq_len=64", "train.global_batch=8", "train.micro_batch=4",
             "train.steps=60"],
}


def overrides(config: str, steps: Optional[int] = None) -> List[str]:
    """The config's train.py overrides, with `train.steps={steps}` in place of its own when given."""
    if steps is None:
        return list(CONFIGS[config])
    return [o for o in CONFIGS[config] if not o.startswith("train.steps=")] + [f"train.steps={steps}"]


def run_dir(out_root: Path, config: str, seed: int, precision: str, steps: Optional[int] = None) -> Path:
    """Where `run` trains (and finds) the run of `config`, `seed`, `precision` and `steps`."""
    return out_root / f"{config}{'' if steps is None else f'_{steps}steps'}_s{seed}_{precision}"


def run(config: str, seed: int, precision: str, out_root: Path, steps: Optional[int] = None) -> List[dict]:
    """One `train.py` run on one thread (validation at the end only); returns its metrics.jsonl rows.
    A run already complete in `out_root` is reused (train.py resumes from its final checkpoint)."""
    out = run_dir(out_root, config, seed, precision, steps)
    args = [sys.executable, str(ROOT / "train.py"), *overrides(config, steps), *TRAIN, f"seed={seed}",
            f"precision={precision}", f"out_dir={out}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{config} seed {seed} {precision} failed:\n{proc.stderr[-2000:]}")
    print(f"{config} seed {seed} {precision}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def windows(steps: int, width: int) -> List[Tuple[int, int]]:
    """[first, last] step numbers (1-based, inclusive) of consecutive windows of `width` steps."""
    return [(a, min(a + width - 1, steps)) for a in range(1, steps + 1, width)]


def window_loss(rows: List[dict], first: int, last: int) -> float:
    losses = [r["loss"] for r in rows if first <= r["step"] <= last and "loss" in r]
    return sum(losses) / len(losses)


def final_val(rows: List[dict]) -> float:
    return [r["val_loss"] for r in rows if "val_loss" in r][-1]


def max_grad_norm(rows: List[dict], after: int) -> float:
    return max(r["grad_norm"] for r in rows if r["step"] > after and "grad_norm" in r)


def emit(case: str, unit: str, ours: float, peer: str, peer_value: float, **extra) -> None:
    print(json.dumps({"bench": "fp8_loss", "case": case, "unit": unit, "ours": round(ours, 5), "peer": peer,
                      "peer_value": round(peer_value, 5), "ratio": round(ours / peer_value, 5), **extra}), flush=True)


def gap_stats(pairs: List[Tuple[float, float]]) -> dict:
    """{mean, spread} in % of the relative gaps a / b - 1 (spread: standard deviation over seeds)."""
    gaps = [100 * (a / b - 1) for a, b in pairs]
    return {"mean": round(statistics.mean(gaps), 3), "spread": round(statistics.stdev(gaps), 3) if len(gaps) > 1 else 0.0}


def report(config: str, seeds: List[int], curves: Dict[Tuple[int, str], List[dict]], width: int) -> None:
    """Per-seed lines, then the mean and spread over seeds, for every window and the final validation."""
    steps = max(r["step"] for r in curves[seeds[0], "fp8"])
    parts = [(f"steps {a}-{b}", lambda rows, a=a, b=b: window_loss(rows, a, b), "mean train loss")
             for a, b in windows(steps, width)]
    parts.append(("final validation", final_val, "val loss"))
    for seed in seeds:
        for name, measure, unit in parts:
            fp8, bf16, fp32 = (measure(curves[seed, p]) for p in PRECISIONS)
            emit(f"{config} seed {seed} {name}", unit, fp8, "bf16, same seed", bf16, floor_ratio=round(bf16 / fp32, 5),
                 fp32_ratio=round(fp8 / fp32, 5))
        fp8_gn, bf16_gn, fp32_gn = (max_grad_norm(curves[seed, p], width) for p in PRECISIONS)
        emit(f"{config} seed {seed} largest grad norm after step {width}", "grad norm", fp8_gn, "bf16, same seed",
             bf16_gn, fp32_value=round(fp32_gn, 5))
    for name, measure, unit in parts:
        values = {p: [measure(curves[s, p]) for s in seeds] for p in PRECISIONS}
        emit(f"{config} {name}, mean over seeds {','.join(map(str, seeds))}", unit, statistics.mean(values["fp8"]),
             "bf16", statistics.mean(values["bf16"]), gap_pct=gap_stats(list(zip(values["fp8"], values["bf16"]))),
             floor_gap_pct=gap_stats(list(zip(values["bf16"], values["fp32"]))),
             fp32_gap_pct=gap_stats(list(zip(values["fp8"], values["fp32"]))))


def parse_configs(text: str) -> List[str]:
    """`--configs`' comma-separated names; SystemExit naming the unknown ones and the known ones."""
    configs = text.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; known: {sorted(CONFIGS)}")
    return configs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="tiny,wide", help=f"comma-separated, of {sorted(CONFIGS)}")
    parser.add_argument("--seeds", default="7,8,9", help="comma-separated seeds (>= 3 for a spread worth reading)")
    parser.add_argument("--window", type=int, default=10, help="steps per window")
    parser.add_argument("--steps", type=int, help="steps per run instead of each config's 60")
    parser.add_argument("--keep", help="write the runs' out_dirs here (default: a temporary directory); "
                                       "runs already complete there are reused")
    args = parser.parse_args(argv)
    configs = parse_configs(args.configs)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.window < 1:
        raise SystemExit(f"--window must be >= 1, got {args.window}")
    if args.steps is not None and args.steps <= args.window:
        raise SystemExit(f"--steps must exceed --window ({args.window}): the grad-norm line reads the steps "
                         f"after the first window; got {args.steps}")
    with tempfile.TemporaryDirectory() as tmp:
        out_root = Path(args.keep).resolve() if args.keep else Path(tmp)
        jobs = [(c, s, p) for c in configs for s in seeds for p in PRECISIONS]
        with ThreadPoolExecutor(2) as pool:
            results = dict(zip(jobs, pool.map(lambda job: run(*job, out_root, args.steps), jobs)))
    for config in configs:
        report(config, seeds, {(s, p): results[config, s, p] for s in seeds for p in PRECISIONS}, args.window)


if __name__ == "__main__":
    main()
