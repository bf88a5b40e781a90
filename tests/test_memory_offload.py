"""The memory planner with `optim.offload=cpu` (parallel/memory.py, parallel/fit.py, parallel/summary.py):
the optimizer state leaves the GPU; the output says how much GPU memory that saves and how much host
memory a node needs (`parallel.data_parallel.state_bytes_per_element`: 16 B per shard element)."""
import json
import subprocess
import sys

import pytest

from model.memory import GIB
from model.summary import load_model_config
from parallel.fit import fit_layouts
from parallel.memory import Layout, memory_per_gpu, rank_param_counts
from train_helpers import ROOT


@pytest.mark.parametrize("param_dtype", ["fp32", "bf16"])
def test_offload_moves_the_optimizer_state_to_the_host(param_dtype):
    cfg, _ = load_model_config("v2_lite")
    base = Layout(pp=2, ep=4, dp=1, precision="fp8", param_dtype=param_dtype, fused_head_loss=True)
    plain = memory_per_gpu(cfg, base)
    off = memory_per_gpu(cfg, Layout(**{**base.__dict__, "offload": "cpu", "gpus_per_node": 4}))
    assert "offload" not in plain and plain["host_memory_gib_per_gpu"] == 0
    assert off["memory_breakdown"]["optimizer_gib"] == 0
    assert off["offload"]["gpu_gib_saved"] == pytest.approx(plain["memory_breakdown"]["optimizer_gib"])
    assert off["memory_gib_per_gpu"] == pytest.approx(plain["memory_gib_per_gpu"] - off["offload"]["gpu_gib_saved"])
    shards = [c["dense"] / 4 + c["experts"] for c in rank_param_counts(cfg, base)]
    assert off["offload"]["host_gib_per_node"] == pytest.approx(4 * max(shards) * 16 / GIB)


def test_fit_rows_carry_the_offload_figures():
    cfg, _ = load_model_config("v2_lite")
    base = Layout(precision="fp8", param_dtype="bf16", fused_head_loss=True, seq_len=4096)
    rows = fit_layouts(cfg, base, 8, 32.0, 4.0)
    assert rows and all(r["memory_gib_per_gpu"] <= 28.0 for r in rows)
    offloaded = [r for r in rows if r["layout"]["offload"] == "cpu"]
    # per node: the rank that keeps the most on the host (not always the GPU-memory peak rank) x 8
    assert offloaded and all(r["offload"]["host_gib_per_node"] >= 8 * r["host_memory_gib_per_gpu"] * (1 - 1e-9) > 0
                             for r in offloaded)


def test_summary_command_prints_the_offload_figures():
    proc = subprocess.run([sys.executable, "-m", "parallel.summary", "v2_lite", "parallel.ep=8", "precision=fp8",
                           "optim.offload=cpu", "parallel.gpus_per_node=4"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["layout"]["offload"] == "cpu" and out["memory_breakdown"]["optimizer_gib"] == 0
    assert out["offload"]["host_gib_per_node"] == pytest.approx(4 * out["host_memory_gib_per_gpu"])
    assert out["offload"]["gpu_gib_saved"] > 0
