"""`bash scripts/gpu_check.sh --cpu`, the GPU machine check in its CPU mode: every step runs and passes
(exact resume in three precisions, ZeRO-1 through a one-process group, both dispatchers at ep = 1,
the probe), so the script cannot rot between GPU runs."""
import json
import os
import subprocess
import sys

from train_helpers import ROOT

EXPECTED = {"env", "kernel", "bench.fp8_gemm", "autotune", "train", "throughput", "zero1", "dispatch", "mla_flash",
            "host_syncs", "profile", "summary"}


def test_gpu_check_cpu_mode(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="2")
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    failed = [line for line in lines if not line["ok"]]
    assert proc.returncode == 0 and not failed, f"{failed}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert {line["check"] for line in lines} == EXPECTED
    train = {line["precision"]: line for line in lines if line["check"] == "train"}
    assert set(train) == {"bf16", "fp8", "fp32"}
    assert all(t["resume_max_abs_diff"] == 0.0 and t["loss"] < t["loss_first"] for t in train.values())
    dispatch = {(line["dispatcher"], line["precision"]) for line in lines if line["check"] == "dispatch"}
    assert len(dispatch) == 6 and lines[-1]["check"] == "summary"
