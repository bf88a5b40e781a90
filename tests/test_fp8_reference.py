"""The FP8 reference (kernels/fp8.py) against independent definitions: loops in fp64, brute-force
nearest-value rounding, and fp64 products of the dequantized operands."""
import math

import pytest
import torch

from kernels import fp8

E4M3_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
E4M3_VALUES = E4M3_VALUES[E4M3_VALUES.isfinite()].unique()


def nearest_e4m3(v: torch.Tensor) -> torch.Tensor:
    """The E4M3 value nearest to each v, found among the sorted table of all E4M3 values (ties: even code)."""
    v = v.double().clamp(-448, 448).flatten()
    i = torch.searchsorted(E4M3_VALUES, v).clamp(1, E4M3_VALUES.numel() - 1)
    lo, hi = E4M3_VALUES[i - 1], E4M3_VALUES[i]
    hi_is_even = hi.float().to(torch.float8_e4m3fn).view(torch.uint8) % 2 == 0
    take_hi = (hi - v < v - lo) | ((hi - v == v - lo) & hi_is_even)
    return torch.where(take_hi, hi, lo)


def naive_scale(amax: float, pow2: bool) -> float:
    s = torch.clamp_min(torch.tensor(amax, dtype=torch.float32) / torch.tensor(448.0), 2.0 ** -126)
    if pow2:
        s = torch.tensor(2.0 ** math.ceil(math.log2(float(s))))
    return float(s)


def sample(shape, spread=3.0):
    """Normal values with per-element magnitudes spread over 10^±spread (exercises subnormals)."""
    return torch.randn(shape) * torch.pow(10.0, torch.empty(shape).uniform_(-spread, spread))


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("shape", [(3, 300), (1, 5), (2, 4, 128), (0, 256)])
def test_quantize_1x128_matches_tilewise_definition(shape, pow2):
    x = sample(shape)
    q, s = fp8.quantize_1x128(x, pow2)
    K = shape[-1]
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.shape == (*shape[:-1], math.ceil(K / 128)) and s.dtype == torch.float32
    x2, q2, s2 = x.reshape(-1, K), q.reshape(-1, K), s.reshape(-1, s.shape[-1])
    for r in range(x2.shape[0]):
        for kb in range(s2.shape[1]):
            tile = x2[r, kb * 128:(kb + 1) * 128]
            expect = naive_scale(float(tile.abs().max()), pow2)
            assert float(s2[r, kb]) == expect
            want = nearest_e4m3((tile / s2[r, kb]).float())
            assert torch.equal(q2[r, kb * 128:(kb + 1) * 128].double(), want)


def test_rounding_ties_to_even_subnormals_and_saturation():
    # scale 1 (amax 448): values on ties between E4M3 neighbours, subnormal ties, tiny values
    vals = torch.tensor([448.0, 1.0625, 1.1875, -1.0625, 17.0, 19.0, 2 ** -10, 3 * 2 ** -10, 5 * 2 ** -10,
                         2 ** -11, -2 ** -12, 0.0, 2 ** -6 - 2 ** -11])
    q, s = fp8.quantize_1x128(vals[None], pow2=False)
    assert float(s) == 1.0
    want = torch.tensor([448.0, 1.0, 1.25, -1.0, 16.0, 20.0, 0.0, 2 ** -8, 2 ** -8,
                         0.0, -0.0, 0.0, 2 ** -6])
    assert torch.equal(q.double().squeeze(0), want.double())


def test_zero_tile_gets_the_smallest_normal_scale():
    q, s = fp8.quantize_1x128(torch.zeros(2, 130))
    assert torch.equal(s, torch.full((2, 2), 2.0 ** -126, dtype=torch.float32))
    assert not q.float().any()


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("magnitude", [1e-5, 1e-8, 1e-12, 1e-30])
def test_small_gradients_keep_e4m3_precision(magnitude, pow2):
    """Tiles of gradient-sized values (a training step's gradients reach 1e-13) are scaled to E4M3's
    range like any others: every quantizer keeps the relative error of normal E4M3 values. An amax
    floor (the former max(amax, 1e-4)) put such tiles on the few subnormal codes or to zero."""
    x = torch.randn(256, 256) * magnitude
    q, s = fp8.quantize_1x128(x, pow2)
    normal = (x / s.repeat_interleave(128, 1)).abs() >= 2 ** -6
    assert normal.double().mean() > 0.95
    assert torch.all(((fp8.dequantize(q, s) - x).abs() <= x.abs() * 2 ** -4 * 1.0001)[normal])
    for name, (q, s), back in (("1x128", (q, s), lambda d: d), ("128x1", fp8.quantize_128x1(x, pow2), torch.t),
                               ("128x128", fp8.quantize_128x128(x, pow2), lambda d: d)):
        err = ((back(fp8.dequantize(q, s)).double() - x.double()).norm() / x.double().norm()).item()
        assert err < 0.035, f"{name}: relative error {err:.3f} at magnitude {magnitude}"


def test_pow2_scales_are_powers_of_two_covering_amax():
    x = sample((64, 256))
    _, s = fp8.quantize_1x128(x, pow2=True)
    mant, _ = torch.frexp(s)
    assert torch.all(mant == 0.5)
    amax = x.view(64, 2, 128).abs().amax(-1)
    assert torch.all(s * 448 >= amax) and torch.all(s * 224 < amax)


@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_128x128_blocks(pow2):
    w = sample((2, 200, 300), spread=2.0)
    q, s = fp8.quantize_128x128(w, pow2)
    assert s.shape == (2, 2, 3)
    for e in range(2):
        for nb in range(2):
            for kb in range(3):
                blk = w[e, nb * 128:(nb + 1) * 128, kb * 128:(kb + 1) * 128]
                assert float(s[e, nb, kb]) == naive_scale(float(blk.abs().max()), pow2)
                got = q[e, nb * 128:(nb + 1) * 128, kb * 128:(kb + 1) * 128].double()
                assert torch.equal(got.flatten(), nearest_e4m3(blk / s[e, nb, kb]))


@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_128x1_transposed_and_grouped(pow2):
    x = sample((300, 200))
    q, s = fp8.quantize_128x1(x, pow2)
    q_t, s_t = fp8.quantize_1x128(x.t().contiguous(), pow2)
    assert q.shape == (200, 300) and s.shape == (200, 3)
    assert torch.equal(q.view(torch.uint8), q_t.view(torch.uint8)) and torch.equal(s, s_t)
    counts = [0, 130, 1, 0, 169]
    qg, sg = fp8.quantize_128x1(x, pow2, counts=counts)
    # 2 + 1 + 2 blocks used, padded to the bound (300 + 127 * 5) // 128 = 7; block b at columns 128 b
    assert sg.shape == (200, 7) and qg.shape == (200, 7 * 128)
    row, blk = 0, 0
    for c in counts:
        qe, se = fp8.quantize_1x128(x[row:row + c].t().contiguous(), pow2)
        cols = qg[:, blk * 128:blk * 128 + c]
        assert torch.equal(cols.view(torch.uint8), qe.view(torch.uint8))
        assert torch.equal(sg[:, blk:blk + se.shape[1]], se)
        row, blk = row + c, blk + se.shape[1]
    pad = torch.ones(200, 7 * 128, dtype=torch.bool)
    for b, n in ((0, 128), (1, 2), (2, 1), (3, 128), (4, 41)):
        pad[:, b * 128:b * 128 + n] = False
    assert not qg.view(torch.uint8)[pad].any(), "padding columns are zero"
    assert torch.equal(sg[:, 5:], fp8.compute_scale(torch.zeros(200, 2), pow2))
    qt, st = fp8.quantize_128x1(x, pow2, counts=torch.tensor(counts))
    assert torch.equal(qt.view(torch.uint8), qg.view(torch.uint8)) and torch.equal(st, sg), "tensor counts"


def test_quantize_128x1_from_1x128_layout_equals_quantizing_the_dequantized():
    x = torch.randn(257, 256)
    xq, xs = fp8.quantize_1x128(x, pow2=True)
    q, s = fp8.quantize_128x1(xq, True, x_scale=xs, counts=[100, 157])
    q2, s2 = fp8.quantize_128x1(fp8.dequantize(xq, xs), True, counts=[100, 157])
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)
    # with power-of-2 scales, re-quantizing FP8 values mostly keeps them exact: the round trip
    # through 1x128 then 128x1 is barely worse than quantizing x once
    once = (fp8.dequantize(*fp8.quantize_128x1(x, True)).t() - x).norm() / x.norm()
    twice = (fp8.dequantize(*fp8.quantize_128x1(xq, True, x_scale=xs)).t() - x).norm() / x.norm()
    assert twice < 1.05 * once


def test_dequantize_error_bound_and_decode_is_exact():
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    finite = codes.float().isfinite()
    assert torch.equal(fp8.decode_e4m3(codes)[finite], codes.float()[finite])
    x = torch.randn(64, 384)
    q, s = fp8.quantize_1x128(x)
    deq = fp8.dequantize(q, s)
    normal = (x / s.repeat_interleave(128, 1)).abs() >= 2 ** -6
    assert torch.all(((deq - x).abs() <= x.abs() * 2 ** -4 * 1.0001)[normal])


def test_bad_scale_shape_is_rejected_with_the_shapes():
    q, _ = fp8.quantize_1x128(torch.randn(4, 256))
    with pytest.raises(ValueError, match="fits neither"):
        fp8.dequantize(q, torch.ones(4, 3))


def _fp32_bound(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Worst-case error of fp32 accumulation over K plus the scale products: (K + 4) * 2^-24 * sum |a||b|."""
    return (a.abs() @ b.abs().t()) * (a.shape[1] + 4) * 2.0 ** -24


@pytest.mark.parametrize("tiling", ["1x128,128x128", "1x128,1x128", "128x128,1x128", "128x128,128x128"])
@pytest.mark.parametrize("mnk", [(130, 70, 300), (1, 1, 1), (256, 128, 128)])
def test_fp8_gemm_within_fp32_rounding_of_fp64_product(tiling, mnk):
    M, N, K = mnk
    quant = {"1x128": fp8.quantize_1x128, "128x128": fp8.quantize_128x128}
    ta, tb = tiling.split(",")
    a, b = quant[ta](torch.randn(M, K)), quant[tb](torch.randn(N, K) * 0.1)
    out = fp8.fp8_gemm(*a, *b, out_dtype=torch.float32)
    da, db = fp8.dequantize(*a).double(), fp8.dequantize(*b).double()
    exact = da @ db.t()
    assert out.shape == (M, N) and out.dtype == torch.float32
    assert torch.all((out.double() - exact).abs() <= _fp32_bound(da, db) + 1e-30)
    assert fp8.fp8_gemm(*a, *b).dtype == torch.bfloat16


def test_grouped_gemms_equal_per_group_products():
    counts = [0, 70, 1, 200, 0]
    x = torch.randn(sum(counts), 300)
    w = torch.randn(5, 150, 300)
    xq, wq = fp8.quantize_1x128(x), fp8.quantize_128x128(w)
    out = fp8.fp8_gemm_grouped_m(*xq, *wq, counts, torch.float32)
    dx, dw = fp8.dequantize(*xq).double(), fp8.dequantize(*wq).double()
    row = 0
    for e, c in enumerate(counts):
        exact = dx[row:row + c] @ dw[e].t()
        assert torch.all((out[row:row + c].double() - exact).abs() <= _fp32_bound(dx[row:row + c], dw[e]))
        row += c
    dy = torch.randn(sum(counts), 150)
    a, b = fp8.quantize_128x1(dy, counts=counts), fp8.quantize_128x1(x, counts=counts)
    grad = fp8.fp8_gemm_grouped_k(*a, *b, counts)
    assert grad.shape == (5, 150, 300) and grad.dtype == torch.float32
    blk = 0
    for e, c in enumerate(counts):
        nb = math.ceil(c / 128)
        cols = slice(blk * 128, blk * 128 + c)
        da = fp8.dequantize(a[0][:, cols], a[1][:, blk:blk + nb]).double() if c else torch.zeros(150, 0).double()
        db = fp8.dequantize(b[0][:, cols], b[1][:, blk:blk + nb]).double() if c else torch.zeros(300, 0).double()
        assert torch.all((grad[e].double() - da @ db.t()).abs() <= _fp32_bound(da, db) + 1e-30)
        blk += nb
    assert torch.equal(fp8.fp8_gemm_grouped_k(*a, *b, torch.tensor(counts)), grad), "tensor counts"


def test_e5m6_roundtrip_rounding_and_packing():
    codes = torch.arange(4096, dtype=torch.int32)
    half_bits = codes << 4
    half_bits = torch.where(half_bits >= 0x8000, half_bits - 0x10000, half_bits)
    values = half_bits.to(torch.int16).view(torch.float16).double()
    values = values[values.isfinite()].unique()
    assert values.numel() == 2 * 31 * 64 - 1  # +-(31 exponents x 64 mantissas), one zero
    x = sample((3, 257), spread=4.0)
    packed, scale = fp8.quantize_e5m6(x)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 3 * 129) and scale.shape == (3, 3)
    mant, _ = torch.frexp(scale)
    assert torch.all(mant == 0.5)
    y = fp8.dequantize_e5m6(packed, scale, 257)
    v = (x / scale.repeat_interleave(128, 1)[:, :257]).double().flatten()
    d = (v[:, None] - values[None, :]).abs()
    nearest = values[d.argmin(dim=1)]
    got = (y / scale.repeat_interleave(128, 1)[:, :257]).double().flatten()
    assert torch.all((got - v).abs() == (nearest - v).abs())
    assert ((y - x).norm() / x.norm()) < 2 ** -7


@pytest.mark.parametrize("pow2", [False, True])
def test_nan_and_inf_propagate_through_quantization_and_gemms(pow2):
    x, w = torch.randn(4, 256), torch.randn(192, 256)
    x[1, 5], x[2, 130] = float("nan"), float("inf")
    q, s = fp8.quantize_1x128(x, pow2)
    assert s[1, 0].isnan() and s[2, 1].isinf() and s[[0, 3]].isfinite().all() and s[1, 1].isfinite()
    assert (q[1, :128].view(torch.uint8) == 0x7F).all(), "a NaN tile quantizes to NaN codes"
    deq = fp8.dequantize(q, s)
    assert deq[1, :128].isnan().all() and not deq[2, 128:].isfinite().any() and deq[[0, 3]].isfinite().all()
    y = fp8.fp8_gemm(q, s, *fp8.quantize_128x128(w, pow2))
    assert not y[1].isfinite().any() and not y[2].isfinite().any() and y[[0, 3]].isfinite().all()
    w[7, 3] = float("nan")
    wq, ws = fp8.quantize_128x128(w, pow2)
    assert ws[0, 0].isnan() and ws[1, 0].isfinite()
    xt, xts = fp8.quantize_128x1(x, pow2, counts=[1, 3])
    assert xts[5, 1].isnan() and xts[5, 0].isfinite() and xts[130, 1].isinf()
    assert fp8.decode_e4m3(torch.tensor([0x7F, 0xFF, 0x7E], dtype=torch.uint8).view(fp8.E4M3))[:2].isnan().all()
