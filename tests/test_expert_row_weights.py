"""Gate weights applied inside the experts (model/moe.py GroupedExperts, kernels/linear.py FP8 experts).

The local dispatcher multiplies each (token, expert) pair's gate weight into the SwiGLU output
before the down projection instead of scaling the expert's output, so backward keeps nothing of
the hidden size for the combine. These tests check it is the same product: against an fp64
reference per row, and, for the FP8 experts, exactly, using power-of-2 weights, with the gate
weight's gradient against an fp64 restatement of the recipe.
"""
import pytest
import torch
import torch.nn.functional as F

from kernels import fp8
from kernels.linear import fp8_swiglu_experts
from model.moe import GroupedExperts, LocalDispatcher

COUNTS = [3, 0, 7, 5]


def make_experts(D=16, inter=8) -> GroupedExperts:
    torch.manual_seed(0)
    experts = GroupedExperts(len(COUNTS), D, inter)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.3)
        experts.down_proj.normal_(0, 0.3)
    return experts


def reference_rows(w_gate_up, w_down, x_ND: torch.Tensor, weight_N: torch.Tensor) -> torch.Tensor:
    """weight[n] * expert_e(x[n]) row by row, with plain matmuls (expert e has COUNTS[e] rows)."""
    rows, start = [], 0
    for e, c in enumerate(COUNTS):
        gate, up = (x_ND[start:start + c] @ w_gate_up[e].t()).chunk(2, dim=-1)
        rows.append((F.silu(gate) * up) @ w_down[e].t() * weight_N[start:start + c, None])
        start += c
    return torch.cat(rows)


def fp64_leaves(*tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


def assert_grads_close(got, want, tol):
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol)


def test_grouped_experts_row_weight_equals_scaling_the_output():
    experts = make_experts()
    x = torch.randn(sum(COUNTS), 16, requires_grad=True)
    w = torch.rand(sum(COUNTS), requires_grad=True)
    dy = torch.randn(sum(COUNTS), 16)
    got = experts(x, torch.tensor(COUNTS), w)
    params = [x, w, experts.gate_up_proj, experts.down_proj]
    ref = fp64_leaves(*params)
    want = reference_rows(ref[2], ref[3], ref[0], ref[1])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert_grads_close(torch.autograd.grad(got, params, dy), torch.autograd.grad(want, ref, dy.double()), 1e-5)


def test_grouped_experts_run_in_fp64_for_reference_gradients():
    """torch's grouped GEMM has no fp64; a model moved to fp64 (the reference of bench.fp8_grad_error)
    runs its experts one GEMM each, an expert without rows included."""
    experts = make_experts().double()
    x = torch.randn(sum(COUNTS), 16, dtype=torch.float64)
    w = torch.rand(sum(COUNTS), dtype=torch.float64)
    got = experts(x, torch.tensor(COUNTS), w)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, reference_rows(experts.gate_up_proj, experts.down_proj, x, w), rtol=1e-12, atol=1e-12)


def test_local_dispatcher_equals_per_token_weighted_sum_fp64():
    experts = make_experts()
    T, K = 6, 2
    x = torch.randn(T, 16, requires_grad=True)
    idx = torch.stack([torch.randperm(len(COUNTS) - 1)[:K] for _ in range(T)])  # expert 3 gets no token
    w = torch.rand(T, K, requires_grad=True)
    got = LocalDispatcher()(x, idx, w, experts)
    params = [x, w, experts.gate_up_proj, experts.down_proj]
    xr, wr, gur, dr = fp64_leaves(*params)
    want = torch.zeros(T, 16, dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            e = int(idx[t, k])
            gate, up = (xr[t] @ gur[e].t()).chunk(2)
            want[t] += wr[t, k] * ((F.silu(gate) * up) @ dr[e].t())
    dy = torch.randn(T, 16)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(got, params, dy)
    assert_grads_close(grads, torch.autograd.grad(want, [xr, wr, gur, dr], dy.double()), 1e-5)
    assert not grads[2][3].any() and not grads[3][3].any(), "an expert without tokens gets zero gradients"


@pytest.mark.parametrize("uniform", [True, False])
def test_fp8_experts_power_of_two_row_weights_scale_exactly(uniform):
    """With power-of-2 scales, a power-of-2 row weight scales the row's 1x128 tiles exactly: the
    output and dx rows scale exactly; with one weight for every row so do all weight gradients."""
    counts = [40, 0, 90, 30]
    N, D, inter = sum(counts), 256, 128
    torch.manual_seed(1)
    x = torch.randn(N, D)
    ws = [torch.randn(len(counts), inter, D) * 0.05, torch.randn(len(counts), inter, D) * 0.05,
          torch.randn(len(counts), D, inter) * 0.05]
    dy = torch.randn(N, D)
    w = torch.full((N,), 0.5) if uniform else 2.0 ** torch.randint(-3, 2, (N,)).float()
    runs = []
    for row_weight in (None, w.clone().requires_grad_()):
        leaves = [t.clone().requires_grad_() for t in [x] + ws]
        y = fp8_swiglu_experts(leaves[0], torch.cat(leaves[1:3], dim=1), leaves[3], counts, True, row_weight)
        y.backward(dy)
        runs.append((y, leaves, row_weight))
    (y0, plain, _), (y1, weighted, row_weight) = runs
    assert torch.equal(y1, y0 * w[:, None])
    assert torch.equal(weighted[0].grad, plain[0].grad * w[:, None])
    if uniform:
        for a, b in zip(weighted[1:], plain[1:]):
            assert torch.equal(a.grad, b.grad * 0.5)
    # The recipe's d loss / d w[n]: <Dgrad of the down projection, recomputed SwiGLU output>, in FP8.
    want, start = torch.zeros(N, dtype=torch.float64), 0
    xq = fp8.dequantize(*fp8.quantize_1x128(x, True)).double()
    for e, c in enumerate(counts):
        rows = slice(start, start + c)
        start += c
        w_gu = fp8.dequantize(*fp8.quantize_128x128(torch.cat([ws[0][e], ws[1][e]]), True)).double()
        gu = (xq[rows] @ w_gu.t()).float()
        gate, up = fp8.dequantize(*fp8.quantize_1x128(gu, True)).double().chunk(2, dim=1)
        dh = (fp8.dequantize(*fp8.quantize_1x128(dy[rows], True)).double()
              @ fp8.dequantize(*fp8.quantize_128x128(ws[2][e], True)).double())
        want[rows] = (dh * F.silu(gate) * up).sum(dim=1)
    assert ((row_weight.grad.double() - want).norm() / want.norm()).item() < 2e-3
