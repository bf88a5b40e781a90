"""Training stall of a checkpoint save: synchronous vs asynchronous (`checkpoint.async`).

A model (configs/model/<name>.yaml) trains with the trainer's own step (`training.step.train_step`,
AdamW, fp32 on CPU, bf16 autocast on GPU) for `--steps` steps; one checkpoint of model + optimizer
state is saved after the first step through `training.checkpointer.Checkpointer`, synchronously or
asynchronously (staged to host memory, pinned on GPU, then written by a background thread). The
stall is the wall time of those steps, the save's wait included, minus the same steps without a
save (median of `--repeats`); the wall time and the training thread's CPU time inside the `save()`
call are reported too (the CPU time is what a loaded machine cannot inflate). On a 2-core CPU the
background writer also competes with training for the cores; on a GPU it does not.

    python -m bench.checkpoint [--model tiny] [--steps 4] [--repeats 3] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import yaml

from model import ModelConfig, Transformer
from training.checkpointer import Checkpointer
from training.distributed import Dist
from training.loop import autocast_for
from training.optim import AdamW
from training.step import train_step

ROOT = Path(__file__).resolve().parents[1]


def run(model, optimizer, batch, steps: int, device: torch.device, saver: Optional[Checkpointer],
        out: Path) -> tuple:
    """(wall seconds of `steps` steps with a save after the first and its final wait, wall and
    thread-CPU seconds inside save())."""
    dist = Dist(rank=0, world=1, local_rank=0, device=device)
    autocast = autocast_for("bf16" if device.type == "cuda" else "fp32", device)
    in_save = cpu_in_save = 0.0
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        train_step(model, optimizer, [batch], mtp_lambda=0.3, gamma=0.001, alpha=1e-4, grad_clip=1.0,
                   autocast=autocast, dist=dist)
        if i == 0 and saver is not None:
            t0, c0 = time.perf_counter(), time.thread_time()
            saver.save(1, {"model": model.state_dict(), "optim": optimizer.state_dict()}, model.cfg.to_dict(), {})
            in_save, cpu_in_save = time.perf_counter() - t0, time.thread_time() - c0
    if saver is not None:
        saver.wait()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, in_save, cpu_in_save


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.checkpoint", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="configs/model/<name>.yaml (default tiny)")
    p.add_argument("--steps", type=int, default=4, help="training steps per measurement (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="measurements per mode; the median is kept")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--out", type=Path, default=None, help="where checkpoints are written (default: a temp dir)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ModelConfig.from_dict(yaml.safe_load((ROOT / "configs" / "model" / f"{args.model}.yaml").read_text()))
    torch.manual_seed(0)
    model = Transformer(cfg).to(device).train()
    optimizer = AdamW(model.named_parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                      decay_embeddings=False, moments_dtype="bf16")
    batch = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), device=device)
    root = Path(tempfile.mkdtemp(prefix="bench_checkpoint_", dir=args.out))
    try:
        run(model, optimizer, batch, 2, device, None, root)  # warm-up
        savers = {"none": None,
                  "sync": Checkpointer(root / "sync", keep=1, asynchronous=False, pin_memory=False),
                  "async": Checkpointer(root / "async", keep=1, asynchronous=True, pin_memory=device.type == "cuda")}
        times = {mode: [] for mode in savers}
        for r in range(args.repeats):
            for mode, saver in savers.items():
                times[mode].append(run(model, optimizer, batch, args.steps, device, saver, root))
                print(f"repeat {r + 1}/{args.repeats} {mode}: {times[mode][-1][0]:.3f} s", file=sys.stderr, flush=True)
        base = statistics.median(t[0] for t in times["none"])
        stall = {m: statistics.median(t[0] for t in times[m]) - base for m in ("sync", "async")}
        in_save = {m: statistics.median(t[1] for t in times[m]) for m in ("sync", "async")}
        cpu_in_save = {m: statistics.median(t[2] for t in times[m]) for m in ("sync", "async")}
        savers["async"].close()
        size = sum(f.stat().st_size for f in (root / "sync").rglob("*") if f.is_file())
        case = (f"{args.model}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, checkpoint "
                f"{size / 2**20:.0f} MiB, {device.type}, {args.steps} steps of {args.batch}x{args.seq_len} "
                f"({base / args.steps:.3f} s/step)")
        rows = [("training stall of one save (steps with a save - steps without)", "s", stall),
                ("wall time inside Checkpointer.save()", "s", in_save),
                ("training-thread CPU time inside Checkpointer.save()", "s", cpu_in_save)]
        for what, unit, values in rows:
            print(json.dumps({"bench": "checkpoint", "case": f"{what}: {case}", "unit": unit,
                              "ours": round(values["async"], 4), "peer": "synchronous save",
                              "peer_value": round(values["sync"], 4),
                              "ratio": round(values["async"] / values["sync"], 3) if values["sync"] > 0 else None}))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
