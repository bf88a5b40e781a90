"""How much of the communication each pipeline schedule hides, measured on CPU with injected latency.

DeepSeek-V3 section 3.2.1 (Figure 4): DualPipe interleaves the attention, dispatch, MLP and combine
of a forward chunk and a backward chunk so that the all-to-all of one travels while the other
computes. On a CPU the network is too fast to show that, so `bench/latency.py` makes every
collective and point-to-point operation complete no earlier than a delay after it starts (a sleep,
holding no core). For each schedule, a pp=2 x ep=2 run of the tiny model (4 ranks, gloo) times
training steps without and with the delay, alternately in the same processes, and reports

    exposed fraction = (step time with delay - step time without) / (operations per step x delay)

where each step time is the fastest of `--repeats` (load from other processes only adds time; the
fraction of each pair is listed in `runs`).

The delay. The report sizes DualPipe for cross-node expert parallelism with a computation-to-
communication ratio of about 1:1 (section 3.2.1), and two chunks can hide communication only up to
the computation they hold. So by default the delay is set per schedule so that the injected
communication of a step equals that step's time without it (`--comm-ratio 1`): delay = ratio x step
time / operations per step, from untimed steps (mean over ranks). `--delay-ms` sets a fixed delay
instead: with 10 ms per operation this tiny model's steps carry about 2.3x more communication than
computation, where a chunk spends most of an overlapped action waiting even while the other computes.

1.0 means every injected millisecond lengthened the step (nothing hidden), 0 means all of it was
hidden behind computation. Operations per step are those this rank started (mean over ranks).
`dualpipev` overlaps the forward and backward chunks of its OVERLAP_F_B actions
(parallel/pipeline_overlap.py); `dualpipev_sequential` is the same schedule with
`parallel.overlap=false`, which runs them one after the other.
`python -m bench.overlap` launches itself under torchrun and prints one JSON line per schedule:
{"bench": "overlap", "case": <schedule and sizes>, "unit": "exposed fraction", "ours": f,
 "peer": "nothing hidden", "peer_value": 1.0, "ratio": f}, plus the per-repeat fractions in `runs`.
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
from pathlib import Path
from typing import Dict, List

SCHEDULES = ("1f1b", "interleaved_1f1b", "zbv", "dualpipev", "dualpipev_sequential")
ROOT = Path(__file__).resolve().parents[1]
REPLICAS = 2  # the two expert-parallel ranks of each pipeline stage read different rows of the batch


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, default=None,
                        help="fixed latency injected into each operation (default: set by --comm-ratio)")
    parser.add_argument("--comm-ratio", type=float, default=1.0,
                        help="injected communication per step / step time without it, when --delay-ms is not set")
    parser.add_argument("--repeats", type=int, default=5, help="timed step pairs (without, with delay)")
    parser.add_argument("--schedules", default=",".join(SCHEDULES), help="comma-separated subset of " + ", ".join(SCHEDULES))
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--microbatches", type=int, default=16,
                        help="micro-batches per pipeline and step (DualPipeV needs >= 2 x pp)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.schedules.split(",")) - set(SCHEDULES))
    if unknown:
        parser.error(f"--schedules: unknown {unknown}; allowed: {', '.join(SCHEDULES)}")
    if (args.delay_ms is not None and args.delay_ms <= 0) or args.comm_ratio <= 0:
        parser.error("--delay-ms and --comm-ratio must be > 0")
    return args


def launch(argv: List[str]) -> int:
    """Re-run this module under torchrun with 4 gloo ranks."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
           "-m", "bench.overlap", *argv]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def measure(schedule: str, args: argparse.Namespace, dist_state, out_root: Path) -> Dict[str, object]:
    """Time `args.repeats` step pairs of one schedule; returns the JSON row (on every rank)."""
    import torch
    import torch.distributed as dist

    from bench.latency import InjectedLatency
    from training.config import compose_job, validate
    from training.inputs import prepare_inputs
    from training.loop import Trainer

    name, overlap = (schedule[:-len("_sequential")], "false") if schedule.endswith("_sequential") else (schedule, "true")
    cfg = compose_job(["model=tiny", "parallel.pp=2", "parallel.ep=2", f"parallel.schedule={name}",
                       f"parallel.overlap={overlap}",
                       f"train.seq_len={args.seq_len}", f"train.global_batch={args.microbatches * REPLICAS}",
                       "train.micro_batch=1", "logging.wandb.mode=disabled", f"out_dir={out_root / schedule}"])
    mcfg = validate(cfg, dist_state.world)
    trainer = Trainer(cfg, mcfg, dist_state, prepare_inputs(cfg, mcfg))

    def timed_step(delay_s: float):
        dist.barrier()
        with InjectedLatency(delay_s) as lat:
            t0 = time.perf_counter()
            trainer.step()
        dist.barrier()
        return time.perf_counter() - t0, lat.total_ops

    def mean_over_ranks(*values: float):
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return (t / dist_state.world).tolist()

    timed_step(0.0)
    if args.delay_ms is not None:
        delay = args.delay_ms / 1000
    else:
        t_plain, n_ops = mean_over_ranks(min(timed_step(0.0)[0] for _ in range(2)), timed_step(0.0)[1])
        delay = args.comm_ratio * t_plain / n_ops
    fractions, plain_times, delayed_times, ops = [], [], [], []
    for _ in range(args.repeats):
        t_plain, _ = timed_step(0.0)
        t_delayed, n_ops = timed_step(delay)
        t_plain, t_delayed, n_ops = mean_over_ranks(t_plain, t_delayed, float(n_ops))
        fractions.append((t_delayed - t_plain) / (n_ops * delay))
        plain_times.append(t_plain)
        delayed_times.append(t_delayed)
        ops.append(n_ops)
    fraction = (min(delayed_times) - min(plain_times)) / (statistics.mean(ops) * delay)
    return {"bench": "overlap",
            "case": f"{schedule} pp=2 ep=2 tiny, {args.microbatches} micro-batches x {args.seq_len} tokens, "
                    f"{delay * 1000:.2f} ms per operation"
                    + (f" (communication {args.comm_ratio:g}x the step time)" if args.delay_ms is None else "")
                    + f", {statistics.mean(ops):.0f} operations per step per rank, "
                    f"step {min(plain_times):.3f} s without / {min(delayed_times):.3f} s with delay "
                    f"(fastest of {args.repeats})",
            "unit": "exposed fraction", "ours": round(fraction, 4), "peer": "nothing hidden", "peer_value": 1.0,
            "ratio": round(fraction, 4), "runs": [round(f, 4) for f in fractions]}


def worker(args: argparse.Namespace) -> None:
    from training.distributed import init_distributed

    dist_state = init_distributed("cpu")
    out_root = Path(tempfile.gettempdir()) / "moeforge_bench_overlap"
    for schedule in args.schedules.split(","):
        row = measure(schedule, args, dist_state, out_root)
        if dist_state.is_main:
            print(json.dumps(row), flush=True)
    dist_state.shutdown()


def main(argv: List[str]) -> None:
    args = parse_args(argv)
    if "RANK" not in os.environ:
        sys.exit(launch(argv))
    worker(args)


if __name__ == "__main__":
    main(sys.argv[1:])
