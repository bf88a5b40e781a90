"""Expert-parallel dispatch on 4 gloo processes: flat and hierarchical equal the single-process result.

The checks themselves live in tests/dist_dispatch.py (one torchrun launch runs them all): outputs and
gradients of x, gate weights and expert weights against LocalDispatcher on the full experts, ranks
and experts without tokens, ep=4 on 2 simulated nodes and ep=2 (dp=2), FP8 payload, inter-node bytes
equal to the minimum and at most the flat dispatcher's, at most topk_group nodes per token.
"""
from dist_launch import run_torchrun


def test_flat_and_hierarchical_match_single_process():
    output = run_torchrun("dist_dispatch.py", 4)
    assert "DIST_DISPATCH_OK" in output, output[-4000:]
