"""Layout rules of parallel/mesh.py and the wire helpers of parallel/comm.py (single process)."""
import pytest
import torch

from parallel.comm import TrafficCounter, dequantize_rows_fp8, fp8_row_bytes, quantize_rows_fp8
from parallel.mesh import build_layout, check_layout


def test_sizes_resolve_and_node_topology():
    layout = check_layout(8, pp=1, ep=4, gpus_per_node=2, n_routed_experts=16, n_group=4)
    assert (layout.pp, layout.dp, layout.ep) == (1, 2, 4)
    assert layout.ep_nodes == 2 and layout.ranks_per_ep_node == 2
    assert layout.dispatcher == "hierarchical"
    assert [layout.node_of(r) for r in range(4)] == [0, 0, 1, 1]
    assert [layout.local_index(r) for r in range(4)] == [0, 1, 0, 1]
    assert list(layout.expert_range(16, ep_rank=3)) == [12, 13, 14, 15]
    inside = check_layout(4, ep=2, gpus_per_node=4, n_routed_experts=16, n_group=3)
    assert inside.ep_nodes == 1 and inside.ranks_per_ep_node == 2 and inside.dispatcher == "flat"


def test_gpus_per_node_defaults_to_local_world_size(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert check_layout(4, ep=4).ep_nodes == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert check_layout(4, ep=4).ep_nodes == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(world_size=4, pp=3), "not divisible by parallel.pp x parallel.ep"),
    (dict(world_size=4, pp=1, dp=3, ep=2), "must equal the world size 4"),
    (dict(world_size=4, ep=4, n_routed_experts=6), "n_routed_experts \\(6\\) must be divisible by parallel.ep \\(4\\)"),
    (dict(world_size=6, ep=6, gpus_per_node=4), "parallel.ep \\(6\\) must be a multiple of parallel.gpus_per_node"),
    (dict(world_size=3, ep=3, gpus_per_node=4), "gpus_per_node \\(4\\) must be a multiple of parallel.ep \\(3\\)"),
    (dict(world_size=4, ep=4, gpus_per_node=2, n_routed_experts=12, n_group=3), "n_group \\(3\\) must be a multiple"),
    (dict(world_size=4, ep=4, gpus_per_node=2, dispatcher="ring"), "parallel.dispatcher must be one of"),
    (dict(world_size=4, ep=0), "parallel.ep must be a positive integer"),
    (dict(world_size=4, ep=4, gpus_per_node=0), "gpus_per_node must be a positive integer"),
])
def test_impossible_layouts_are_rejected(kwargs, message):
    world = kwargs.pop("world_size")
    with pytest.raises(ValueError, match=message):
        check_layout(world, **kwargs)


def test_flat_dispatcher_has_no_group_rule():
    layout = check_layout(4, ep=4, gpus_per_node=2, n_routed_experts=12, n_group=3, dispatcher="flat")
    assert layout.dispatcher == "flat"


def test_single_process_layout_has_no_groups():
    layout = build_layout(ep=1, gpus_per_node=1)
    assert layout.world_size == 1 and layout.ep_group is None and layout.dense_grad_group is None


def _reference_fp8(x):
    R, D = x.shape
    padded = torch.nn.functional.pad(x, (0, -D % 128)).view(R, -1, 128)
    scale = (padded.abs().amax(-1, keepdim=True) / 448).clamp_min(2.0 ** -126)
    return ((padded / scale).to(torch.float8_e4m3fn).float() * scale).view(R, -1)[:, :D]


@pytest.mark.parametrize("dim", [256, 192, 7])
def test_fp8_rows_roundtrip(dim):
    x = torch.randn(5, dim) * torch.logspace(-3, 2, 5).unsqueeze(1)
    x[2] = 0.0
    packed = quantize_rows_fp8(x)
    assert packed.dtype == torch.uint8 and packed.shape == (5, fp8_row_bytes(dim))
    y = dequantize_rows_fp8(packed, dim, torch.float32)
    torch.testing.assert_close(y, _reference_fp8(x), rtol=0, atol=0)
    assert float(((y - x).norm() / x.norm())) < 0.05
    assert fp8_row_bytes(7168) / (2 * 7168) <= 0.55


def test_fp8_rows_empty():
    packed = quantize_rows_fp8(torch.zeros(0, 192))
    assert packed.shape == (0, fp8_row_bytes(192))
    assert dequantize_rows_fp8(packed, 192, torch.bfloat16).shape == (0, 192)


def test_traffic_counter_splits_by_node():
    counter = TrafficCounter(gpus_per_node=2, my_rank=1)
    counter.add("dispatch", [3, 5, 2, 0], 10)
    assert counter.get("dispatch_intranode") == 30
    assert counter.get("dispatch_internode") == 20
    counter.reset()
    assert counter.get("dispatch_internode") == 0
