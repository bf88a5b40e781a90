"""A whole Transformer under expert parallelism (4 gloo processes) follows the single-process run.

The checks live in tests/dist_expert_parallel.py (one torchrun launch): 3 AdamW steps with ep=4 on
2 simulated nodes (hierarchical and flat dispatchers) and dp=2 x ep=2, losses within 1e-5 and
gradients within 1e-4 relative of one process on the whole batch, global expert load for the bias
update, and a DCP checkpoint saved with ep=4 loaded back with ep=2 and ep=1.
"""
from dist_launch import run_torchrun


def test_expert_parallel_training_matches_single_process(tmp_path):
    output = run_torchrun("dist_expert_parallel.py", 4, str(tmp_path / "ckpt"))
    assert "DIST_EP_OK" in output, output[-4000:]
