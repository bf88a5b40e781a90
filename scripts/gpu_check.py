"""End-to-end check of a GPU machine (or, with --cpu, of the same steps on the CPU): one JSON line per
result, a summary line last, exit status 1 when a check failed. Run it through scripts/gpu_check.sh,
which installs the trainer's missing dependencies from carried wheels first.

Lines (`"check"` names the step; every line has `"ok"`):
- env: device name, compute capability, Python / torch / CUDA / Triton / transformers versions;
- kernel: tests/test_fp8_triton.py's checks on the GPU's Triton kernels (quantizers bit-exact with
  the reference, GEMMs within the bound of Hopper's FP8 accumulation); on CPU CI runs them already;
- bench.fp8_gemm: the benchmark's lines (GPU only);
- autotune: `python -m kernels.autotune` (v3_671b's launch shapes): per (kind, N, K) the fastest GEMM
  configuration and its time against the recorded one, nothing written (on CPU: its one-line refusal);
- train: `tiny` for N steps in bf16, fp8 and fp32, then the same job resumed from its mid-way
  checkpoint in a fresh out_dir: the resumed losses must equal the uninterrupted ones bit for bit
  (GPU runs use train.deterministic=true, README "Exactness");
- throughput: `small` at 4096 tokens per sequence in bf16 and fp8 (tiny at 128 on CPU): tokens/s, MFU,
  peak memory against the planner's estimate (`python -m parallel.summary`);
- zero1: torchrun with one process: a process group (NCCL on GPU) at world size 1, ZeRO-1's
  reduce-scatter / all-gather, a checkpoint saved and resumed through it, losses equal to the plain run;
- dispatch: the flat and the hierarchical expert dispatcher at ep = 1 (all-to-all to itself) against
  the single-process MoE (scripts/gpu_check_dist.py);
- host_syncs / profile: the host synchronizations of one training step (torch.cuda.set_sync_debug_mode)
  and a profiler table of two steps (scripts/gpu_check_probe.py).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("bf16", "fp8", "fp32")
# --cpu: a 2-layer `tiny` on short sequences, so the whole check takes about a minute on 2 cores.
CPU_TINY = ["model.num_hidden_layers=2", "model.hidden_size=128", "model.intermediate_size=256",
            "model.moe_intermediate_size=64", "model.num_attention_heads=2", "model.q_lora_rank=64",
            "model.kv_lora_rank=32", "model.qk_nope_head_dim=32", "model.qk_rope_head_dim=16",
            "model.v_head_dim=32", "train.seq_len=64", "train.global_batch=4"]
COMMON = ["logging.wandb.mode=disabled", "eval.batches=2", "eval.batch_size=4"]

results: List[dict] = []


def emit(check: str, ok: bool = True, **fields) -> dict:
    """Print one JSON line and remember it for the summary."""
    line = {"check": check, "ok": bool(ok), **fields}
    results.append(line)
    print(json.dumps(line), flush=True)
    return line


def run(cmd: List[str], timeout: float, env: Dict[str, str] = None) -> subprocess.CompletedProcess:
    """Run a command from the repository root; raise with its output's tail when it fails."""
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                    WANDB_MODE="disabled", **(env or {}))
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited with {proc.returncode}: "
                           f"{(proc.stdout + proc.stderr)[-2500:]}")
    return proc


def json_lines(text: str) -> List[dict]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def read_metrics(out_dir: Path) -> List[dict]:
    return json_lines((out_dir / "metrics.jsonl").read_text())


def step(name: str):
    """Decorator: a failing step prints one line with ok=false and the error instead of stopping."""
    def wrap(fn):
        def inner(*args, **kwargs):
            try:
                fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - every failure becomes a result line
                emit(name, False, error=str(err)[-3000:], where=traceback.format_exc(limit=2)[-800:])
        return inner
    return wrap


@step("env")
def check_env(cuda: bool) -> None:
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for module in ("triton", "transformers", "safetensors", "hydra", "omegaconf"):
        try:
            versions[module] = __import__(module).__version__
        except Exception as err:  # noqa: BLE001
            versions[module] = f"missing ({type(err).__name__})"
    if cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available (run with --cpu on a machine without a GPU)")
        props = torch.cuda.get_device_properties(0)
        device = {"device": props.name, "capability": f"{props.major}.{props.minor}",
                  "memory_gib": round(props.total_memory / 2 ** 30, 1), "gpus": torch.cuda.device_count()}
    else:
        device = {"device": "cpu", "capability": None, "threads": torch.get_num_threads()}
    emit("env", **device, **versions)


@step("kernel")
def check_kernels(cuda: bool) -> None:
    if not cuda:
        emit("kernel", skipped="CPU: CI runs tests/test_fp8_triton.py under TRITON_INTERPRET=1")
        return
    proc = run([sys.executable, "tests/test_fp8_triton.py"], 300, env={"MOEFORGE_TRITON_DEVICE": "cuda"})
    outcome = json_lines(proc.stdout)[-1]
    for name, error in outcome.items():
        emit("kernel", error is None, name=name, **({"error": error} if error else {}))


@step("bench.fp8_gemm")
def check_bench(cuda: bool) -> None:
    if not cuda:
        emit("bench.fp8_gemm", skipped="CPU: the benchmark measures the Triton kernels on a GPU")
        return
    proc = run([sys.executable, "-m", "bench.fp8_gemm", "--iters", "20"], 300)
    lines = json_lines(proc.stdout)
    if not lines:
        raise RuntimeError(f"bench.fp8_gemm printed no JSON lines: {proc.stdout[-500:]}")
    for line in lines:
        emit("bench.fp8_gemm", **{k: v for k, v in line.items() if k != "bench"})


@step("autotune")
def check_autotune(cuda: bool) -> None:
    cmd = [sys.executable, "-m", "kernels.autotune", "--model", "v3_671b"]
    if not cuda:  # exits with status 2 and one line
        proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES=""),
                              capture_output=True, text=True, timeout=120)
        emit("autotune", proc.returncode == 2 and "no CUDA GPU" in proc.stdout, skipped=proc.stdout.strip())
        return
    lines = json_lines(run(cmd, 420).stdout)
    if not lines:
        raise RuntimeError("kernels.autotune printed no JSON lines")
    for line in lines:
        emit("autotune", **line)


def train(args: List[str], out_dir: Path, timeout: float, torchrun: bool = False) -> List[dict]:
    """train.py (or torchrun with one process) with `args` into `out_dir`; returns its metrics records."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] if torchrun \
        else [sys.executable]
    run(launcher + ["train.py", *COMMON, *args, f"out_dir={out_dir}"], timeout)
    return read_metrics(out_dir)


def resumed_copy(full: Path, resumed: Path, step: int) -> None:
    """A fresh out_dir holding only `full`'s checkpoint of `step` (train.py resumes from it)."""
    shutil.rmtree(resumed, ignore_errors=True)
    shutil.copytree(full / "checkpoints" / f"step_{step}", resumed / "checkpoints" / f"step_{step}")


def loss_gap(ours: List[dict], ref: List[dict], after: int) -> float:
    """Largest |loss difference| over the logged steps after `after` (inf when the steps differ)."""
    want = {r["step"]: r for r in ref if r["step"] > after}
    got = {r["step"]: r for r in ours if r["step"] > after}
    if set(got) != set(want) or not got:
        return float("inf")
    return max(max(abs(got[s][k] - want[s][k]) for k in ("loss", "mtp_loss")) for s in got)


@step("train")
def check_train(cuda: bool, out: Path) -> None:
    steps = 20 if cuda else 6
    size = [] if cuda else CPU_TINY
    extra = ["train.deterministic=true"] if cuda else []
    for precision in PRECISIONS:
        job = [f"precision={precision}", *size, *extra, f"train.steps={steps}", f"checkpoint.every={steps // 2}",
               "logging.every=1", f"eval.every={steps // 2}"]
        full, resumed = out / f"train_{precision}", out / f"train_{precision}_resumed"
        shutil.rmtree(full, ignore_errors=True)
        start = time.perf_counter()
        ref = train(job, full, 600)
        seconds = time.perf_counter() - start
        resumed_copy(full, resumed, steps // 2)
        ours = train(job, resumed, 600)
        gap = loss_gap(ours, ref, steps // 2)
        last = ref[-1]
        emit("train", gap == 0.0, precision=precision, steps=steps, loss_first=ref[0]["loss"], loss=last["loss"],
             val_loss=last.get("val_loss"), tokens_per_s=round(last["tokens_per_s"], 1), mfu=last.get("mfu"),
             resume_max_abs_diff=gap, seconds=round(seconds, 1))


def planner_estimate_gib(model: str, seq_len: int, precision: str) -> float:
    """The planner's memory per GPU for one process at micro-batch 1 (`python -m parallel.summary`)."""
    proc = run([sys.executable, "-m", "parallel.summary", model, f"train.seq_len={seq_len}", "train.micro_batch=1",
                f"precision={precision}", "parallel.zero=false"], 300)
    return float(json_lines(proc.stdout)[-1]["memory_gib_per_gpu"])


@step("throughput")
def check_throughput(cuda: bool, out: Path) -> None:
    model, seq_len = ("small", 4096) if cuda else ("tiny", 128)
    for precision in ("bf16", "fp8"):
        batch = (["train.global_batch=8", "train.steps=12", "logging.every=4"] if cuda else
                 ["train.global_batch=2", "train.steps=4", "logging.every=2"])
        job = [f"model={model}", f"precision={precision}", f"train.seq_len={seq_len}", "train.micro_batch=1", *batch,
               "eval.every=0", "checkpoint.every=0"]
        out_dir = out / f"throughput_{precision}"
        shutil.rmtree(out_dir, ignore_errors=True)
        last = train(job, out_dir, 900)[-1]
        estimate = planner_estimate_gib(model, seq_len, precision)
        measured = last.get("mem_peak_gib", last.get("mem_rss_peak_gib"))
        emit("throughput", model=model, precision=precision, seq_len=seq_len,
             tokens_per_s=round(last["tokens_per_s"], 1), mfu=last.get("mfu"), mem_peak_gib=measured,
             mem_reserved_gib=last.get("mem_reserved_gib"), estimate_gib=round(estimate, 3),
             measured_over_estimate=round(measured / estimate, 3) if estimate else None,
             note=None if cuda else "CPU: peak RSS includes the interpreter and libraries")


@step("zero1")
def check_zero1(cuda: bool, out: Path) -> None:
    job = ["precision=fp32" if not cuda else "precision=bf16", *([] if cuda else CPU_TINY), "train.steps=6",
           "checkpoint.every=3", "logging.every=1", "eval.every=0", *(["train.deterministic=true"] if cuda else [])]
    plain_dir, sharded_dir, resumed_dir = out / "zero1_plain", out / "zero1", out / "zero1_resumed"
    for d in (plain_dir, sharded_dir):
        shutil.rmtree(d, ignore_errors=True)
    plain = train(job, plain_dir, 600)
    sharded = train(job + ["parallel.zero=true"], sharded_dir, 600, torchrun=True)
    resumed_copy(sharded_dir, resumed_dir, 3)
    resumed = train(job + ["parallel.zero=true"], resumed_dir, 600, torchrun=True)
    gap_plain, gap_resume = loss_gap(sharded, plain, 0), loss_gap(resumed, sharded, 3)
    emit("zero1", gap_plain <= 1e-6 and gap_resume == 0.0, backend="nccl" if cuda else "gloo", world_size=1,
         max_abs_diff_vs_plain=gap_plain, resume_max_abs_diff=gap_resume)


@step("dist")
def check_dist(cuda: bool) -> None:
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                "scripts/gpu_check_dist.py", "--device", "cuda" if cuda else "cpu"], 300)
    for line in json_lines(proc.stdout):
        emit(**line)


@step("probe")
def check_probe(cuda: bool, out: Path) -> None:
    args = [f"out_dir={out / 'probe'}"] + ([] if cuda else ["--cpu", *CPU_TINY])
    for precision in ("bf16", "fp8") if cuda else ("bf16",):  # CPU: FP8 runs the slow reference kernels
        proc = run([sys.executable, "scripts/gpu_check_probe.py", *args, f"precision={precision}"], 600)
        for line in json_lines(proc.stdout):
            emit(**line)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run the steps on the CPU (CI)")
    parser.add_argument("--out", default="outputs/gpu_check", help="where runs write (default outputs/gpu_check)")
    args = parser.parse_args(argv)
    cuda = not args.cpu
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    check_env(cuda)
    if cuda and not results[-1]["ok"]:
        return 1
    check_kernels(cuda)
    check_bench(cuda)
    check_autotune(cuda)
    check_train(cuda, out)
    check_throughput(cuda, out)
    check_zero1(cuda, out)
    check_dist(cuda)
    check_probe(cuda, out)
    failed = sorted({r["check"] for r in results if not r["ok"]})
    emit("summary", not failed, failed=failed, lines=len(results), seconds=round(time.perf_counter() - start, 1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
