"""Communication hidden behind computation, on 2 gloo processes with injected latency (DeepSeek-V3
section 3.2.1): the shared expert runs while the dispatch's all-to-all travels, forward and backward.
The checks live in tests/dist_overlap.py (one torchrun launch runs them all)."""
from dist_launch import run_torchrun


def test_computation_runs_while_collectives_travel():
    output = run_torchrun("dist_overlap.py", 2)
    assert "DIST_OVERLAP_OK" in output, output[-4000:]
