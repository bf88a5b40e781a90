"""FP8 Linear and grouped SwiGLU experts as autograd functions (DeepSeek-V3 section 3.3).

All three GEMMs of a linear run on E4M3 operands with fine-grained scales:
  Fprop  y  = x · Wᵀ      x per 1x128 tile, W per 128x128 block
  Dgrad  dx = dy · W      dy per 1x128 tile, W (same blocks, read transposed)
  Wgrad  dW = dyᵀ · x     dy and x per 128x1 tile (128 tokens of one channel), fp32 result
The input is cached for backward in FP8 (its 1x128 form, re-quantized to 128x1 in backward), or in
E5M6 for the linear after attention. The experts cache their input and the SwiGLU input (gate and
up projections) in FP8 and recompute the SwiGLU output in backward. The SwiGLU output and the cached
gate/up output are quantized where the SwiGLU is computed (`ops.swiglu_quantize_1x128`: one fused
kernel on Triton, reading the gate/up output once). Weight gradients are fp32.
Weights are quantized once per optimizer step (`kernels.weights`); Dgrad reads the transposed FP8
copy, so every GEMM operand is K-major. Expert row counts stay on the device (a tensor) or are
None for a single expert (the dense SwiGLU): nothing here waits for the GPU.

Split backward (zero-bubble pipeline schedules, ZB-V and DualPipeV): the schedule first computes the
gradient of a stage's input ("input" phase) and later the weight gradients ("weight" phase), and
torch's `stage_backward_weight` calls these functions' backward a second time for that. Inside
`backward_phase(...)` each backward computes only the GEMMs of its phase (the experts keep the
quantized operands of their weight-gradient GEMMs from the input phase), so every backward GEMM
runs once, as in a plain backward.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence, Tuple, Union

import torch

from . import ops
from .groups import as_counts
from .swiglu import silu
from .weights import fp8_weight


PHASES = ("full", "input", "weight")
_phase = ["full"]


@contextlib.contextmanager
def backward_phase(kind: str) -> Iterator[None]:
    """Within the block, backward calls compute only the gradients of `kind`: "input" (the input
    gradient, Dgrad), "weight" (weight gradients, Wgrad) or "full" (both; the default)."""
    if kind not in PHASES:
        raise ValueError(f"backward phase must be one of {PHASES}, got {kind!r}")
    _phase.append(kind)
    try:
        yield
    finally:
        _phase.pop()


def current_phase() -> str:
    """The innermost `backward_phase` ("full" outside any)."""
    return _phase[-1]


def _wanted(ctx) -> Tuple[bool, bool]:
    """(input gradient, weight gradients) this backward call must compute. In the weight phase the
    input gradient is still computed when autograd will use it (the node that made the input runs
    in this backward)."""
    phase = current_phase()
    want_dx = ctx.needs_input_grad[0] and (phase != "weight" or _input_node_runs(ctx))
    return want_dx, phase != "input"


def _input_node_runs(ctx) -> bool:
    node = ctx.next_functions[0][0]
    if node is None or type(node).__name__ == "AccumulateGrad":  # a leaf: a stage input, not wanted here
        return False
    return torch._C._will_engine_execute_node(node)


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


ROW_ALIGN = 16  # Wgrad runs over tokens: its transposed operands' rows padded to 16 bytes (aligned, pipelined loads)


def _pad_rows(t: torch.Tensor, pad: int) -> torch.Tensor:
    """t [M, ...] followed by `pad` zero rows (zero tokens add nothing to a weight gradient)."""
    if not pad:
        return t
    raw = t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
    out = torch.cat([raw, raw.new_zeros(pad, *raw.shape[1:])])
    return out.view(t.dtype)


class FP8LinearFunction(torch.autograd.Function):
    """y = x · Wᵀ with the FP8 recipe; x [..., K], weight [N, K] (no bias)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, pow2: bool, e5m6_cache: bool) -> torch.Tensor:
        K = x.shape[-1]
        x2 = x.reshape(-1, K)
        xq, xs = ops.quantize_1x128(x2, pow2)
        w8 = fp8_weight(weight, pow2)
        y = ops.fp8_gemm(xq, xs, w8.data, w8.scale, _out_dtype(x))
        if e5m6_cache:
            xq, xs = ops.quantize_e5m6(x2)
        ctx.save_for_backward(xq, xs, weight)
        ctx.pow2, ctx.e5m6, ctx.x_meta = pow2, e5m6_cache, (x.shape, x.dtype)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xq, xs, weight = ctx.saved_tensors
        x_shape, x_dtype = ctx.x_meta
        pow2 = ctx.pow2
        dy2 = dy.reshape(-1, weight.shape[0])
        dx = dw = None
        want_dx, want_dw = _wanted(ctx)
        if want_dx:
            w8 = fp8_weight(weight, pow2)
            dyq, dys = ops.quantize_1x128(dy2, pow2)
            dx = ops.fp8_gemm(dyq, dys, w8.data_t, w8.scale_t, x_dtype).view(x_shape)
        if ctx.needs_input_grad[1] and want_dw:
            dyt, dyts = _quantize_wgrad_operand(dy2, pow2, None)
            if ctx.e5m6:
                xt, xts = _quantize_wgrad_operand(ops.dequantize_e5m6(xq, xs, x_shape[-1]), pow2, None)
            else:
                xt, xts = _quantize_wgrad_operand(xq, pow2, None, xs)
            dw = ops.fp8_gemm(dyt, dyts, xt, xts, torch.float32)
        return dx, dw, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, pow2: bool = False, e5m6_cache: bool = False) -> torch.Tensor:
    """x · weightᵀ in FP8 (Fprop, Dgrad, Wgrad); the input cached in FP8, or E5M6 when `e5m6_cache`."""
    return FP8LinearFunction.apply(x, weight, pow2, e5m6_cache)


def _silu_grad(g: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(g)
    return s * (1 + g * (1 - s))


class FP8SwiGLUExpertsFunction(torch.autograd.Function):
    """Grouped SwiGLU experts down(silu(gate(x)) * up(x) * w) over rows sorted by expert, in FP8.

    Gate and up run as one GEMM against their weights stacked [E, 2I, D] (gate rows first, quantized
    per 128x128 block of the stack). The optional per-row gate weight w scales the SwiGLU output before the
    down projection, so the MoE combine keeps nothing of the output's size for backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                counts: Optional[torch.Tensor], pow2: bool, row_weight: Optional[torch.Tensor],
                weight_sources, x_fp8: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        out_dtype = _out_dtype(x)
        xq, xs = ops.quantize_1x128(x, pow2) if x_fp8 is None else x_fp8
        gu8 = fp8_weight(w_gate_up, pow2, weight_sources[0])
        d8 = fp8_weight(w_down, pow2, weight_sources[1])
        gu = ops.fp8_gemm_grouped_m(xq, xs, gu8.data, gu8.scale, counts, out_dtype)
        hq, hs, gu_q, gu_s = ops.swiglu_quantize_1x128(gu, row_weight, pow2, with_input=True)
        y = ops.fp8_gemm_grouped_m(hq, hs, d8.data, d8.scale, counts, out_dtype)
        # A weight built from sources (a dense SwiGLU's stacked gate and up) is not kept: backward
        # rebuilds it from them, so no copy of it lives per micro-batch in flight.
        built = [w if src is None else None for w, src in zip((w_gate_up, w_down), weight_sources)]
        ctx.save_for_backward(xq, xs, gu_q, gu_s, *built, row_weight)
        ctx.counts, ctx.pow2, ctx.x_dtype, ctx.weight_sources = counts, pow2, x.dtype, weight_sources
        ctx.weight_shapes = (w_gate_up.shape, w_down.shape)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        want_dx, want_dw = _wanted(ctx)
        stash = getattr(ctx, "wgrad_operands", None)
        if stash is not None and want_dw and not want_dx:  # weight phase after an input phase
            ctx.wgrad_operands = None
            return (None, *FP8SwiGLUExpertsFunction._weight_grads(ctx, *stash), None, None, None, None, None)
        xq, xs, gu_q, gu_s, w_gate_up, w_down, row_weight = ctx.saved_tensors
        w_gate_up, w_down = (_rebuilt(w, src, shape) for w, src, shape
                             in zip((w_gate_up, w_down), ctx.weight_sources, ctx.weight_shapes))
        counts, pow2 = ctx.counts, ctx.pow2
        g, u = ops.dequantize(gu_q, gu_s).chunk(2, dim=-1)
        silu_g = silu(g)
        a = silu_g * u
        dyq, dys = ops.quantize_1x128(dy, pow2)
        d8 = fp8_weight(w_down, pow2, ctx.weight_sources[1])
        dh = ops.fp8_gemm_grouped_m(dyq, dys, d8.data_t, d8.scale_t, counts, torch.float32)
        d_row_weight = None
        if row_weight is not None:
            w_N1 = row_weight.float().unsqueeze(1)
            if ctx.needs_input_grad[5]:
                d_row_weight = (dh * a).sum(dim=1).to(row_weight.dtype)
            a, dh = a * w_N1, dh * w_N1
        dgu = torch.cat([dh * u * _silu_grad(g), dh * silu_g], dim=-1)
        dx = None
        if want_dx:
            gu8 = fp8_weight(w_gate_up, pow2, ctx.weight_sources[0])
            dguq, dgus = ops.quantize_1x128(dgu, pow2)
            dx = ops.fp8_gemm_grouped_m(dguq, dgus, gu8.data_t, gu8.scale_t, counts, ctx.x_dtype)
        operands = tuple(_quantize_wgrad_operand(t, pow2, counts) for t in (dy, a, dgu))
        if not want_dw:  # input phase: the weight phase runs the two Wgrad GEMMs on these
            ctx.wgrad_operands = operands
            return dx, None, None, None, None, d_row_weight, None, None
        return (dx, *FP8SwiGLUExpertsFunction._weight_grads(ctx, *operands), None, None, d_row_weight, None, None)

    @staticmethod
    def _weight_grads(ctx, dy_t, h_t, dgu_t) -> Tuple[torch.Tensor, torch.Tensor]:
        """(dW_gate_up, dW_down) from the 128x1-quantized (values, scales) of dy, of the SwiGLU output
        and of the gate/up gradient, and the saved FP8 input."""
        xq, xs = ctx.saved_tensors[:2]
        x_t = _quantize_wgrad_operand(xq, ctx.pow2, ctx.counts, xs)
        dw_down = ops.fp8_gemm_grouped_k(*dy_t, *h_t, ctx.counts)
        dw_gate_up = ops.fp8_gemm_grouped_k(*dgu_t, *x_t, ctx.counts)
        return dw_gate_up, dw_down


def _quantize_wgrad_operand(t: torch.Tensor, pow2: bool, counts: Optional[torch.Tensor],
                            scale: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """128x1 quantization of a Wgrad operand (of the experts or the FP8 Linear): grouped by expert, or
    (counts None) with its rows padded to ROW_ALIGN (aligned, pipelined loads in the Wgrad GEMM)."""
    if counts is None:
        pad = -t.shape[0] % ROW_ALIGN
        t, scale = _pad_rows(t, pad), None if scale is None else _pad_rows(scale, pad)
    return ops.quantize_128x1(t, pow2, x_scale=scale, counts=counts)


def _rebuilt(w: Optional[torch.Tensor], sources, shape) -> torch.Tensor:
    """The weight `fp8_swiglu_experts` was given: kept as is, or stacked again from its sources."""
    if w is not None:
        return w
    with torch.no_grad():
        return torch.cat([t.detach() for t in sources], dim=-2).view(shape)


def fp8_swiglu_experts(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                       counts: Union[Sequence[int], torch.Tensor, None], pow2: bool = False,
                       row_weight: Optional[torch.Tensor] = None, weight_sources=(None, None),
                       x_fp8: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Experts' SwiGLU on x [T, D] (rows sorted by expert, counts[e] rows for expert e) in FP8.

    w_gate_up [E, 2I, D] (gate rows, then up rows: `GroupedExperts.gate_up_proj`), w_down [E, D, I];
    `counts` a tensor (kept on its device), a list, or None for one expert taking every row;
    `row_weight` [T] (optional) scales each row's SwiGLU output before the down projection;
    `weight_sources` (gate_up's, down's) the parameters a weight is built from when it is not a
    parameter itself, stacked along its output dimension (`kernels.weights.fp8_weight`); such a
    weight is not kept for backward, which stacks it again only if its FP8 copy is stale. `x_fp8`:
    (e4m3 [T, D], fp32 scales [T, ceil(D/128)]), x already quantized per 1x128 tile with `pow2` (an
    FP8 dispatch payload), read by the first GEMM instead of quantizing x again. Returns [T, D] in x's
    dtype (the autocast dtype under autocast). Gradients of the weights are fp32.
    """
    if counts is not None:
        counts = as_counts(counts, x.device)
    return FP8SwiGLUExpertsFunction.apply(x, w_gate_up, w_down, counts, pow2, row_weight, tuple(weight_sources),
                                          x_fp8)
