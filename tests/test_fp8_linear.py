"""FP8 Linear and grouped SwiGLU experts (kernels/linear.py) and `precision=fp8` (model/fp8.py).

Gradients are checked two ways: against an fp64 re-statement of the recipe (same quantizers, exact
GEMMs, written per expert with plain loops: catches any wiring error), and against a bf16 linear.
E4M3 keeps 3 mantissa bits, so quantizing both operands of a GEMM already costs ~2.6% per operand
(~3.7% norm-relative error of the product on Gaussian data); the bf16 comparison therefore bounds the
norm-relative difference at 5% for one GEMM (10% for the two chained GEMMs of SwiGLU) and requires
the norms of outputs and gradients to agree to 2%.
"""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from kernels import fp8
from kernels.linear import fp8_linear, fp8_swiglu_experts
from model import ModelConfig, Transformer, lm_loss
from model.fp8 import FP8GroupedExperts, FP8Linear, FP8MLP, apply_fp8, fp8_modules
from model.moe import MLP, GroupedExperts

ROOT = Path(__file__).resolve().parents[1]


def q1(x):
    return fp8.dequantize(*fp8.quantize_1x128(x, True)).double()


def qw(w):
    return fp8.dequantize(*fp8.quantize_128x128(w, True)).double()


def qt(x):
    """128x1 quantization (transposed), dequantized: [K, M]."""
    return fp8.dequantize(*fp8.quantize_128x1(x, True)).double()


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def agree_with_bf16(ours, bf16, max_rel):
    """Norm-relative difference below the E4M3 bound, and the norms within 2% of each other."""
    assert rel(ours, bf16) < max_rel
    assert abs(ours.double().norm() / bf16.double().norm() - 1) < 2e-2


@pytest.mark.parametrize("e5m6", [False, True])
def test_fp8_linear_follows_the_recipe_exactly(e5m6):
    x = torch.randn(3, 70, 300)
    w = (torch.randn(200, 300) * 0.05).requires_grad_()
    xl = x.clone().requires_grad_()
    y = fp8_linear(xl, w, True, e5m6)
    dy = torch.randn_like(y)
    y.backward(dy)
    x2, dy2 = x.reshape(-1, 300), dy.reshape(-1, 200)
    assert rel(y.reshape(-1, 200), q1(x2) @ qw(w.detach()).t()) < 1e-6
    assert rel(xl.grad.reshape(-1, 300), q1(dy2) @ qw(w.detach())) < 1e-6
    x_cached = fp8.dequantize_e5m6(*fp8.quantize_e5m6(x2), 300) if e5m6 else q1(x2).float()
    assert rel(w.grad, qt(dy2) @ qt(x_cached).t()) < 1e-6
    assert w.grad.dtype == torch.float32


def test_fp8_linear_close_to_bf16_linear_and_autocast_dtypes():
    x = torch.randn(512, 256)
    w = torch.randn(384, 256) * 0.05
    dy = torch.randn(512, 384)
    grads = {}
    for kind in ("fp8", "bf16"):
        xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fp8_linear(xl, wl, True) if kind == "fp8" else F.linear(xl, wl)
        assert y.dtype == torch.bfloat16
        y.backward(dy.bfloat16())
        grads[kind] = (y, xl.grad, wl.grad)
    assert grads["fp8"][2].dtype == torch.float32 and grads["fp8"][1].dtype == torch.float32
    for ours, ref in zip(grads["fp8"], grads["bf16"]):
        agree_with_bf16(ours, ref, 0.05)


def saved_activation_bytes(fn, params):
    """Bytes of the tensors autograd saves for backward, parameters (and views of them) excluded."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in param_ptrs:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


@pytest.mark.parametrize("e5m6", [False, True])
def test_fp8_linear_caches_its_input_in_fp8(e5m6):
    x = torch.randn(256, 512, requires_grad=True)
    w = torch.randn(128, 512, requires_grad=True)
    saved = saved_activation_bytes(lambda: fp8_linear(x, w, True, e5m6), [w])
    data = [t for t in saved if t.numel() >= x.numel()]
    assert len(data) == 1 and data[0].dtype == (torch.uint8 if e5m6 else torch.float8_e4m3fn)
    per_element = sum(t.numel() * t.element_size() for t in saved) / x.numel()
    assert per_element <= (1.5 if e5m6 else 1.0) + 4 / 128 + 1e-9


def swiglu_recipe_fp64(x, wg, wu, wd, dy, counts):
    """The experts' FP8 recipe restated expert by expert with exact GEMMs: (y, dx, dwg, dwu, dwd)."""
    I = wg.shape[1]
    y, dx = torch.zeros(x.shape[0], wd.shape[1]).double(), torch.zeros_like(x).double()
    dwgu, dwd = torch.zeros(wg.shape[0], 2 * I, wg.shape[2]).double(), torch.zeros_like(wd).double()
    xq, row = fp8.quantize_1x128(x, True), 0
    for e, c in enumerate(counts):
        rows = slice(row, row + c)
        row += c
        if c == 0:
            continue
        xe = fp8.dequantize(xq[0][rows], xq[1][rows])
        wgu = qw(torch.cat([wg[e], wu[e]]))
        gu = xe.double() @ wgu.t()
        g, u = gu.chunk(2, dim=1)
        y[rows] = q1((F.silu(g) * u).float()) @ qw(wd[e]).t()
        gq, uq = q1(gu.float()).chunk(2, dim=1)
        h = F.silu(gq) * uq
        dh = q1(dy[rows]) @ qw(wd[e])
        dwd[e] = qt(dy[rows]) @ qt(h.float()).t()
        sig = torch.sigmoid(gq)
        dgu = torch.cat([dh * uq * sig * (1 + gq * (1 - sig)), dh * F.silu(gq)], dim=1).float()
        dx[rows] = q1(dgu) @ wgu
        dwgu[e] = qt(dgu) @ qt(xe).t()
    return y, dx, dwgu[:, :I], dwgu[:, I:], dwd


def make_experts(counts, D=256, I=128):
    E = len(counts)
    x = torch.randn(sum(counts), D)
    ws = [torch.randn(E, I, D) * 0.05, torch.randn(E, I, D) * 0.05, torch.randn(E, D, I) * 0.05]
    return x, ws, torch.randn(sum(counts), D)


def fp8_experts(x, wg, wu, wd, counts, row_weight=None):
    """`fp8_swiglu_experts` on separate gate and up weights (stacked as `GroupedExperts` stores them)."""
    return fp8_swiglu_experts(x, torch.cat([wg, wu], dim=1), wd, counts, True, row_weight)


def test_fp8_swiglu_experts_follow_the_recipe():
    counts = [5, 0, 150, 70]
    x, ws, dy = make_experts(counts, D=300, I=130)
    leaves = [t.clone().requires_grad_() for t in [x] + ws]
    y = fp8_experts(*leaves, torch.tensor(counts))
    y.backward(dy)
    want = swiglu_recipe_fp64(x, *ws, dy, counts)
    for got, exp in zip([y] + [t.grad for t in leaves], want):
        assert rel(got, exp) < 2e-3
    assert all(t.grad.dtype == torch.float32 for t in leaves[1:])
    assert not leaves[1].grad[1].any(), "an expert without tokens gets no gradient"


def test_fp8_swiglu_weight_built_from_sources_is_not_kept():
    """A dense SwiGLU stacks its gate and up weights per call and names them as the stack's sources:
    same output and gradients as a stacked parameter, bit for bit, and the stack is not among the
    tensors kept for backward (backward builds it again from the sources when it needs it)."""
    counts = [40]
    x, ws, dy = make_experts(counts, D=256, I=256)
    runs = []
    for built in (False, True):
        leaves = [t.clone().requires_grad_() for t in [x] + ws]
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            stack = torch.cat(leaves[1:3], dim=1)
            sources = ((leaves[1][0], leaves[2][0]), None) if built else (None, None)
            y = fp8_swiglu_experts(leaves[0], stack, leaves[3], counts, True, weight_sources=sources)
        y.backward(dy)
        runs.append([y] + [t.grad for t in leaves])
        kept = [t for t in saved if t.untyped_storage().data_ptr() == stack.untyped_storage().data_ptr()]
        assert bool(kept) != built
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_fp8_swiglu_experts_close_to_bf16_experts():
    counts = [100, 0, 260, 150]
    x, ws, dy = make_experts(counts)
    results = {}
    for kind in ("fp8", "bf16"):
        leaves = [t.clone().requires_grad_() for t in [x] + ws]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if kind == "fp8":
                y = fp8_experts(*leaves, counts)
            else:
                offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
                wg, wu, wd = (w.bfloat16() for w in leaves[1:])
                xb = leaves[0].bfloat16()
                h = F.silu(torch._grouped_mm(xb, wg.transpose(1, 2), offs=offs)) * \
                    torch._grouped_mm(xb, wu.transpose(1, 2), offs=offs)
                y = torch._grouped_mm(h, wd.transpose(1, 2), offs=offs)
        y.backward(dy.to(y.dtype))
        results[kind] = [y] + [t.grad for t in leaves]
    for ours, ref in zip(results["fp8"], results["bf16"]):
        agree_with_bf16(ours, ref, 0.1)


def tiny_config(**overrides) -> ModelConfig:
    values = yaml.safe_load((ROOT / "configs/model/tiny.yaml").read_text())
    values.update(overrides)
    return ModelConfig.from_dict(values)


def test_apply_fp8_switches_linears_and_experts_but_not_the_kept_parts():
    torch.manual_seed(0)
    model = Transformer(tiny_config(num_hidden_layers=2))
    keys = list(model.state_dict())
    tokens = torch.randint(0, 4096, (2, 16))
    ref = model(tokens)
    assert apply_fp8(model) is model and apply_fp8(model) is model
    assert list(model.state_dict()) == keys
    kinds = fp8_modules(model)
    assert kinds["experts"] == ["layers.1.mlp.experts", "mtp.0.block.mlp.experts"]
    assert kinds["mlp"] == ["layers.0.mlp", "layers.1.mlp.shared_experts", "mtp.0.block.mlp.shared_experts"]
    attn = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    blocks = ["layers.0", "layers.1", "mtp.0.block"]
    assert sorted(kinds["linear"]) == sorted([f"{b}.self_attn.{p}" for b in blocks for p in attn] + ["mtp.0.eh_proj"])
    assert type(model.lm_head) is nn.Linear and type(model.embed_tokens) is nn.Embedding
    for name, m in model.named_modules():
        if isinstance(m, FP8Linear):
            assert m.fp8_e5m6_cache == name.endswith("self_attn.o_proj")
    assert isinstance(model.layers["1"].mlp.experts, (FP8GroupedExperts, GroupedExperts))
    assert isinstance(model.layers["0"].mlp, (FP8MLP, MLP))
    out = model(tokens)
    assert rel(out, ref) < 0.1


def test_fp8_training_run_loss_falls():
    torch.manual_seed(0)
    model = apply_fp8(Transformer(tiny_config()))
    model.fused_head_loss = yaml.safe_load((ROOT / "configs/precision/fp8.yaml").read_text())["fused_head_loss"]
    assert model.fused_head_loss is True, "precision=fp8 trains with the fused head loss"
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    tokens = torch.randint(0, 4096, (2, 65))
    losses = []
    for _ in range(8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = lm_loss(model, tokens)
        (out["loss"] + 0.3 * out["mtp_loss"]).backward()
        assert all(p.grad is None or (p.grad.dtype == torch.float32 and p.grad.isfinite().all())
                   for p in model.parameters())
        opt.step()
        opt.zero_grad()
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_fused_head_loss_of_the_fp8_recipe_equals_plain():
    """The recipe's head + cross-entropy (model/head_loss.py) on an FP8 model: the same loss and the
    same gradient into the body (the body's FP8 backward would amplify any difference: a flipped
    power-of-2 scale or E4M3 rounding); the head weight sums the main and MTP heads in fp32, not
    bf16, so it differs by bf16 rounding."""
    torch.manual_seed(0)
    model = apply_fp8(Transformer(tiny_config(num_hidden_layers=2)))
    tokens = torch.randint(0, 4096, (2, 33))
    results = []
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = lm_loss(model, tokens, fused_head_loss=fused)
        (out["loss"] + 0.3 * out["mtp_loss"]).backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (out, grads), (ref, ref_grads) = results
    for key in ("loss", "mtp_loss"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-6, atol=0)
    for name, g in ref_grads.items():
        assert rel(grads[name], g) < (2 ** -7 if name == "lm_head.weight" else 1e-6), name


def test_no_tokens_gives_empty_outputs_and_zero_gradients():
    x = torch.randn(0, 256, requires_grad=True)
    ws = [t.requires_grad_() for t in make_experts([0, 0])[1]]
    fp8_experts(x, *ws, [0, 0]).sum().backward()
    w = torch.randn(64, 256, requires_grad=True)
    y = fp8_linear(x, w)
    y.sum().backward()
    assert y.shape == (0, 64) and x.grad.shape == (0, 256)
    assert not w.grad.any() and all(not t.grad.any() for t in ws)


@pytest.mark.parametrize("fp8_gemms", [False, True])
def test_recomputed_norms_attention_and_router_give_the_same_loss_and_gradients(fp8_gemms):
    """Recomputation is the same math: equal loss, and gradients equal up to summation order. With
    the FP8 GEMMs and bf16 autocast on, a last-bit difference that flips an E4M3 or bf16 rounding
    is amplified to that format's step in a few tensors, so there the bound is E4M3's."""
    from model.block import Block
    from model.fp8 import RecomputedBlock, RecomputedRMSNorm
    from model.norm import RMSNorm
    torch.manual_seed(0)
    model = apply_fp8(Transformer(tiny_config(num_hidden_layers=2)))
    plain = apply_fp8(Transformer(tiny_config(num_hidden_layers=2)))
    plain.load_state_dict(model.state_dict())
    for m in plain.modules():
        if type(m) in (RecomputedBlock, RecomputedRMSNorm):
            m.__class__ = Block if isinstance(m, Block) else RMSNorm
    if not fp8_gemms:
        for m in list(model.modules()) + list(plain.modules()):
            m.__class__ = {FP8Linear: nn.Linear, FP8MLP: MLP, FP8GroupedExperts: GroupedExperts}.get(type(m), type(m))
    assert fp8_modules(model)["block"] and not fp8_modules(plain)["block"]
    assert bool(fp8_modules(model)["linear"]) == fp8_gemms
    tokens = torch.randint(0, 4096, (2, 33))
    results = []
    for m in (model, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fp8_gemms):
            out = lm_loss(m, tokens)
        (out["loss"] + 0.3 * out["mtp_loss"]).backward()
        results.append([out["loss"]] + [p.grad for p in m.parameters()])
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1:], results[1][1:]):
        assert rel(a, b) < (2 ** -4 if fp8_gemms else 1e-6)
