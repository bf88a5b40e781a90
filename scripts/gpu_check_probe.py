"""One training step looked at closely, for scripts/gpu_check.py: host synchronizations and a profile.

    python scripts/gpu_check_probe.py [--cpu] [train.py overrides ...]

Builds the trainer in this process (train.py's config, data and model), runs two warm-up steps, then
- mla_flash (CUDA): a forward pass with SDPA restricted to flash attention (MLA pads its values to the
  query/key head dim for it; fails if SDPA cannot use flash attention);
- host_syncs (CUDA): one step under torch.cuda.set_sync_debug_mode("warn"); every operation that
  makes the host wait for the GPU warns, and the line counts them by source line of this repository;
- profile: two steps under torch.profiler (CPU and CUDA activities); the table, sorted by device
  time (CPU time on CPU), goes to `<out_dir>/profile_<precision>.txt`, the top rows into the line.
"""
from __future__ import annotations

import json
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.config import compose_job, validate  # noqa: E402
from training.distributed import init_distributed  # noqa: E402
from training.inputs import prepare_inputs  # noqa: E402
from training.loop import Trainer  # noqa: E402


def emit(check: str, ok: bool = True, **fields) -> None:
    print(json.dumps({"check": check, "ok": ok, **fields}), flush=True)


def run_step(trainer: Trainer):
    """One optimizer step of the trainer, waited for."""
    result = trainer.step()
    if trainer.dist.device.type == "cuda":
        torch.cuda.synchronize()
    return result


def sync_site(filename: str, lineno: int) -> str:
    """`path:line` relative to the repository for its own files, else the file's name."""
    path = Path(filename)
    try:
        return f"{path.resolve().relative_to(ROOT)}:{lineno}"
    except ValueError:
        return f"{path.name}:{lineno}"


def check_mla_flash(trainer: Trainer) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = trainer._next_rows()
    try:
        with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]), trainer.autocast():
            trainer.model(rows[:, :-1])
        emit("mla_flash", precision=trainer.cfg.precision.name)
    except RuntimeError as err:
        emit("mla_flash", False, precision=trainer.cfg.precision.name, error=str(err)[-500:])


def count_host_syncs(trainer: Trainer) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run_step(trainer)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = Counter(sync_site(w.filename, w.lineno) for w in caught if "synchroniz" in str(w.message))
    emit("host_syncs", precision=trainer.cfg.precision.name, count=sum(sites.values()), sites=dict(sites.most_common()))


def profile_two_steps(trainer: Trainer, out_dir: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    cuda = trainer.dist.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            run_step(trainer)
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    averages = prof.key_averages()
    table = averages.table(sort_by=sort, row_limit=25)
    path = out_dir / f"profile_{trainer.cfg.precision.name}.txt"
    path.write_text(table)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = sorted(averages, key=lambda e: getattr(e, key, 0.0), reverse=True)[:8]
    total = sum(getattr(e, key, 0.0) for e in averages) or 1.0
    top = [{"op": e.key, "ms_per_step": round(getattr(e, key, 0.0) / 2e3, 3), "calls_per_step": e.count // 2,
            "share": round(getattr(e, key, 0.0) / total, 3)} for e in rows]
    emit("profile", precision=trainer.cfg.precision.name, time="device" if cuda else "cpu", table=str(path),
         total_ms_per_step=round(total / 2e3, 2), top=top)


def main(argv) -> None:
    cpu = "--cpu" in argv
    overrides = [a for a in argv if a != "--cpu"]
    cfg = compose_job(["logging.wandb.mode=disabled", "eval.every=0", "checkpoint.every=0",
                       "train.device=" + ("cpu" if cpu else "cuda"), *overrides])
    mcfg = validate(cfg, 1)
    dist = init_distributed(cfg.train.device, cfg.parallel.timeout_s)
    trainer = Trainer(cfg, mcfg, dist, prepare_inputs(cfg, mcfg))
    trainer.out_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        run_step(trainer)
    if cpu:
        emit("mla_flash", precision=cfg.precision.name, skipped="CPU: no flash attention kernel")
        emit("host_syncs", precision=cfg.precision.name, skipped="CPU: no device to wait for")
    else:
        check_mla_flash(trainer)
        count_host_syncs(trainer)
    profile_two_steps(trainer, trainer.out_dir)
    trainer.batches.close()
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
