"""Pretrain a DeepSeek-V3-style MoE model.

    python train.py [key=value ...]
    python train.py -m optim.lr=1e-3,2e-3 [key=value ...]     # a sweep: one job after another
    torchrun --nproc_per_node=N train.py [key=value ...]

With no arguments: the `tiny` model on the built-in corpus (Python's standard library), a few
minutes on a laptop CPU, on the GPU when there is one. Overrides use Hydra's syntax and the typed
schema of `training/config.py`, e.g. `model=small precision=fp32 train.steps=2000 out_dir=runs/a
data=shards data.train_dir=... logging.wandb.mode=offline`. `--cfg` prints the composed config.
`-m` / `--multirun` runs the cartesian product of the sweep overrides (`a=1,2`, `range(..)`,
`choice(..)`), job i in `${out_dir}/i`; `hydra.*` overrides and `+key` for a key the schema lacks
are refused (training/sweep.py).

`out_dir` receives config.yaml (resolved; each start's also in config_starts/), launches.jsonl
(overrides and git commit of every launch), metrics.jsonl,
checkpoints/step_<N>/, wandb/ and tokenizer/; running the same command again resumes from the
newest complete checkpoint.
Exit status: 0 done (or stopped by SIGTERM/SIGINT/checkpoint.signal after saving), 1 training failed
(including a checkpoint that could not be written, or a rank that died or hung), 2 bad config.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import List, Optional

# Idle OpenMP threads sleep instead of spinning (set before torch loads its OpenMP runtime): on a
# shared CPU, spinning threads of the 2-core default job measured up to 20x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from training.config import ConfigError, data_parallel_size, resolve_path, validate
from training.sweep import Job, plan_jobs


def one_line(err: BaseException) -> str:
    """A config error as one line: Hydra's message, its cause, and the available options if listed."""
    text = str(err).split("Config search path:")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    message = lines[0].rstrip(".") if lines else type(err).__name__
    cause = err.__cause__
    if cause is not None and str(cause).strip():
        message += f": {str(cause).strip().splitlines()[0]}"
    elif len(lines) > 1 and lines[1].startswith("Available options"):
        message += f"; {lines[1].rstrip(':').lower()}: {', '.join(lines[2:])}"
    elif len(lines) > 1 and not lines[1].startswith("See "):
        message += f": {lines[1]}"
    return message


def keep_freed_memory() -> None:
    """glibc malloc, for CPU training: never mmap (so never munmap) and keep freed memory, instead of
    mapping fresh pages for every large tensor (the 2048 x 4096 fp32 logits of the default job) and
    page-faulting them in again each step: 30 such buffers took 737k page faults and 0.97 s of system
    time, 8k and 0.01 s with this. No-op without glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 1 << 30)


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__.strip())
        return 0
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        jobs = plan_jobs([a for a in args if a != "--cfg"])
        models = [validate(job.cfg, world) for job in jobs]
    except (HydraException, OmegaConfBaseException, ConfigError) as err:
        print(f"train.py: config error: {one_line(err)}", file=sys.stderr)
        return 2
    if "--cfg" in args:
        for job in jobs:
            if job.number is not None:
                print(f"# job {job.number}: {' '.join(job.overrides)}")
            print(OmegaConf.to_yaml(job.cfg, resolve=True), end="")
        return 0
    for job, mcfg in zip(jobs, models):
        if job.number is not None and int(os.environ.get("RANK", "0")) == 0:
            print(f"train.py: multirun job {job.number} ({job.number + 1} of {len(jobs)}): "
                  f"{' '.join(job.overrides)}", flush=True)
        status = run_job(job, mcfg, args, world)
        if status:
            return status
    return 0


def run_job(job: Job, mcfg, args: List[str], world: int) -> int:
    """Train one composed job; returns the exit status (0, 1 training failed, 2 bad config)."""
    from training.checkpoint import CheckpointError
    from training.distributed import init_distributed, is_collective_failure
    from training.hardware import use_deterministic
    from training.inputs import prepare_inputs
    from training.loop import Trainer, TrainingError
    from training.run_config import keep_config
    from training.runinfo import record_launch

    cfg = job.cfg
    start = time.perf_counter()
    use_deterministic(cfg.train.deterministic)
    try:
        dist = init_distributed(cfg.train.device, cfg.parallel.timeout_s)
        if dist.device.type == "cpu":
            keep_freed_memory()
    except ConfigError as err:
        print(f"train.py: config error: {err}", file=sys.stderr)
        return 2
    try:
        inputs = prepare_inputs(cfg, mcfg)
        out_dir = resolve_path(cfg.out_dir, Path.cwd())
        if dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            keep_config(out_dir, OmegaConf.to_yaml(cfg, resolve=True))
            record_launch(out_dir, args, job.overrides, job.number, world)
            inputs.tokenizer.save(out_dir / "tokenizer")
        dist.barrier()
        trainer = Trainer(cfg, mcfg, dist, inputs)
        resumed = trainer.resume()
        if dist.is_main:
            print(banner(cfg, trainer, dist.world, resumed), flush=True)
        last = trainer.run()
        if dist.is_main and "val_loss" in last:
            print(f"done: step {last['step']}, val_loss {last['val_loss']:.4f}, val_bpb {last['val_bpb']:.4f}, "
                  f"{time.perf_counter() - start:.0f} s in this process", flush=True)
    except ConfigError as err:  # found once the data is known (vocabulary size): every rank agrees
        print(f"train.py: config error: {err}", file=sys.stderr)
        dist.shutdown()
        return 2
    except (TrainingError, CheckpointError) as err:  # every rank stops at the same step with the same error
        print(f"train.py: {err}", file=sys.stderr)
        dist.shutdown()
        return 1
    except RuntimeError as err:
        if not is_collective_failure(err):
            raise
        # a peer died or hangs: no shutdown barrier, it would wait too
        print(f"train.py: rank {dist.rank}: a collective failed, another rank died or did not answer within "
              f"parallel.timeout_s={cfg.parallel.timeout_s:g} s: {str(err).strip().splitlines()[0]}",
              file=sys.stderr)
        return 1
    dist.shutdown()
    return 0


def banner(cfg, trainer, world: int, resumed) -> str:
    """Lines saying what runs where, what steps the weights, whether MFU is known, and from which
    checkpoint it resumed."""
    from training.hardware import device_name

    t = cfg.train
    n_params = sum(p.numel() for p in trainer.model.parameters())
    dp = data_parallel_size(cfg, world)
    accum = t.global_batch // (trainer.micro_batch * dp)
    text = (f"train.py: {n_params / 1e6:.2f}M parameters, {trainer.dist.device}, precision={cfg.precision.name}, "
            f"world {world} (dp {dp}), batch {t.global_batch} x {t.seq_len} tokens (micro {trainer.micro_batch}, "
            f"accumulation {accum}), {t.steps} steps = {trainer.schedules.total_tokens / 1e6:.2f}M tokens, "
            f"out_dir={trainer.out_dir}\ntrain.py: parameters {cfg.precision.param_dtype}, optimizer "
            f"{trainer.describe_optimizer()}")
    if trainer.peak is None:
        text += (f"\ntrain.py: no MFU: {device_name(trainer.dist.device)!r} is not in training/hardware.py's table; "
                 f"set train.peak_tflops=<dense TFLOP/s of one device in precision {cfg.precision.name}>")
    if resumed is not None:
        text += f"\ntrain.py: resumed from {resumed} (step {trainer.progress.step})"
    if trainer.init_from_skipped:
        text += f"\ntrain.py: init_from={cfg.init_from} not used: out_dir holds a checkpoint, resuming wins"
    if trainer.initialized_from is not None:
        text += f"\ntrain.py: initialized from {trainer.initialized_from} (weights only: step 0, fresh optimizer)"
    return text


if __name__ == "__main__":
    sys.exit(main())
