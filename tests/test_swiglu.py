"""kernels.swiglu: the SwiGLU reference whose exp is reproducible bit for bit, against fp64."""
import torch
import torch.nn.functional as F

from kernels import swiglu
from kernels.fp8 import quantize_1x128


def test_exp_within_two_ulp_of_fp64_and_clamped():
    x = torch.cat([torch.linspace(-87.0, 88.0, 200001), torch.randn(10000) * 3])
    got = swiglu.exp_f32(x).double()
    want = torch.exp(x.double())
    ulp = torch.exp2(torch.floor(torch.log2(want)) - 23)
    assert ((got - want).abs() / ulp).max().item() <= 2.0
    edges = swiglu.exp_f32(torch.tensor([-200.0, 200.0, float("inf"), -float("inf")]))
    assert torch.equal(edges, swiglu.exp_f32(torch.tensor([-87.0, 88.0, 88.0, -87.0])))
    assert swiglu.exp_f32(torch.tensor([float("nan")])).isnan().all()


def test_swiglu_matches_fp64_and_quantizes_like_the_reference():
    torch.manual_seed(0)
    g, u, w = torch.randn(64, 256) * 4, torch.randn(64, 256), torch.rand(64)
    h = swiglu.swiglu(g, u, w)
    want = F.silu(g.double()) * u.double() * w.double()[:, None]
    assert ((h.double() - want).abs() <= want.abs() * 2.0 ** -20 + 1e-30).all()
    assert swiglu.silu(torch.tensor([float("nan"), float("inf"), -float("inf")])).tolist()[1:] == \
        [float("inf"), -float("inf")]
    assert swiglu.silu(torch.tensor([float("nan")])).isnan().all()
    q, s = swiglu.swiglu_quantize_1x128(torch.cat([g, u], dim=1), w, pow2=True)
    rq, rs = quantize_1x128(h, pow2=True)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)
