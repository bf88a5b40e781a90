"""`precision=fp8`: route the model's linears and experts through the FP8 kernels (DeepSeek-V3 section 3.3).

`apply_fp8(model)` switches, in place, every `nn.Linear` of the attention and MTP projections to
`FP8Linear`, every SwiGLU (`MLP`: dense layers and shared experts; `GroupedExperts`: routed
experts) to its FP8 version, and RMSNorm and the Block to versions that recompute in backward. The switch
changes the module's class to a subclass whose forward calls `kernels.linear` or recomputes;
parameters, names, state_dict and hooks are untouched, so optimizers and
checkpoints built before or after keep working. Kept in BF16/FP32 per the recipe: the embedding,
the output head, the router, the norms, the attention core and the MoE combine. The input of the
linear after attention (`self_attn.o_proj`) is cached for backward in E5M6.

Memory (section 3.2.3, recomputation of RMSNorm and of the MLA up-projections): no RMSNorm output
is kept for backward. Each norm is recomputed with what reads it, so only its input, the residual
stream, stays: MLA recomputes its input norm, projections, RoPE and attention core from the block's
input (PyTorch's attention keeps q, k and v, the up-projected tensors, for its backward, so not
storing them means re-running the core too; this recomputes a little more than the report, the
down-projections as well, and stores less); the router recomputes the post-attention norm and its
fp32 gate GEMM from the residual; the FP8 linears and experts keep FP8 copies of their inputs.
o_proj is outside the recomputation.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from kernels.linear import fp8_linear, fp8_swiglu_experts

from .block import Block
from .moe import MLP, GroupedExperts, MoE
from .norm import RMSNorm
from .recompute import recompute

KEPT_HIGH_PRECISION = ("lm_head",)
E5M6_CACHED = ("self_attn.o_proj",)


class FP8Linear(nn.Linear):
    """nn.Linear whose Fprop, Dgrad and Wgrad run in FP8 (set by `apply_fp8`, bias not supported)."""

    fp8_pow2: bool = True
    fp8_e5m6_cache: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.fp8_pow2, self.fp8_e5m6_cache)


class FP8MLP(MLP):
    """Dense / shared-expert SwiGLU in FP8: one expert of the grouped FP8 SwiGLU path (its stacked
    gate/up weight is built from the two parameters per call and not kept for backward)."""

    fp8_pow2: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        w_gate_up = torch.cat([self.gate_proj.weight, self.up_proj.weight]).unsqueeze(0)
        sources = ((self.gate_proj.weight, self.up_proj.weight), (self.down_proj.weight,))
        y = fp8_swiglu_experts(x2, w_gate_up, self.down_proj.weight.unsqueeze(0), None, self.fp8_pow2,
                               weight_sources=sources)
        return y.view(*x.shape[:-1], y.shape[-1])


class FP8GroupedExperts(GroupedExperts):
    """Routed experts in FP8: grouped GEMMs over rows sorted by expert, SwiGLU recomputed in backward.
    `x_fp8` = (e4m3 rows, 1x128 scales) of x_ND quantized with `fp8_pow2` (an FP8 dispatch payload) is
    used as the first GEMM's operand instead of quantizing x_ND again."""

    fp8_pow2: bool = True
    takes_fp8_input = True

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor, row_weight_N: Optional[torch.Tensor] = None,
                x_fp8: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        return fp8_swiglu_experts(x_ND, self.gate_up_proj, self.down_proj, counts_E, self.fp8_pow2, row_weight_N,
                                  x_fp8=x_fp8)


class RecomputedRMSNorm(RMSNorm):
    """RMSNorm that keeps only its input for backward (same outputs and gradients)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        return recompute(super().forward, [x], [self.weight])


class RecomputedBlock(Block):
    """Block whose RMSNorms are recomputed with what reads them, so that only the residual stream is
    kept for them: MLA recomputes its input norm, projections, RoPE and attention core in backward
    from the block's input (o_proj stays outside, its input cached in E5M6); the router recomputes
    the post-attention norm and its gate GEMM from the residual (`Router.forward`), while the experts
    keep their inputs in FP8. Decoding with a cache and no-grad forwards run the plain path."""

    def forward(self, x: torch.Tensor, rope, cache=None) -> torch.Tensor:
        if cache is not None or not torch.is_grad_enabled():
            return super().forward(x, rope, cache)
        attn, norm = self.self_attn, self.input_layernorm
        inner = [norm.weight] + [p for name, p in attn.named_parameters() if not name.startswith("o_proj.")]
        x = x + attn.o_proj(recompute(lambda t: attn.attend(RMSNorm.forward(norm, t), rope), [x], inner))
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            return x + self.mlp(h, recompute_from=(self.post_attention_layernorm, x))
        return x + self.mlp(h)


_FP8_CLASS = {nn.Linear: FP8Linear, MLP: FP8MLP, GroupedExperts: FP8GroupedExperts,
              RMSNorm: RecomputedRMSNorm, Block: RecomputedBlock}
_RECOMPUTED = (RecomputedRMSNorm, RecomputedBlock)
_FP8_CLASS.update({c: c for c in list(_FP8_CLASS.values())})


def _is_kept(name: str) -> bool:
    return any(name == n or name.endswith("." + n) for n in KEPT_HIGH_PRECISION)


def apply_fp8(model: nn.Module, pow2_scales: bool = True) -> nn.Module:
    """Switch `model`'s linears and experts to FP8, its norms and blocks to recomputation, in place
    (idempotent); returns the model.

    `pow2_scales` rounds every scale up to a power of 2, which makes the backward pass's 1x128 ->
    128x1 re-quantization of cached activations nearly lossless.
    """
    inside_swiglu = set()
    for name, module in model.named_modules():
        if id(module) in inside_swiglu or not isinstance(module, (nn.Linear, MLP, GroupedExperts, RMSNorm, Block)):
            continue
        if isinstance(module, nn.Linear) and _is_kept(name):
            continue
        fp8_cls = _FP8_CLASS.get(type(module))
        if fp8_cls is None:
            raise TypeError(f"apply_fp8: {name} is a {type(module).__name__}, a subclass the FP8 recipe "
                            f"does not know; supported: nn.Linear, model.moe.MLP, model.moe.GroupedExperts, "
                            f"model.norm.RMSNorm, model.block.Block")
        if isinstance(module, nn.Linear) and module.bias is not None:
            raise ValueError(f"apply_fp8: {name} has a bias; the FP8 Linear supports bias-free linears only")
        module.__class__ = fp8_cls
        if fp8_cls in _RECOMPUTED:
            continue
        module.fp8_pow2 = pow2_scales
        if fp8_cls is FP8Linear:
            module.fp8_e5m6_cache = any(name.endswith(n) for n in E5M6_CACHED)
        else:
            inside_swiglu.update(id(m) for m in module.modules())
    return model


def fp8_modules(model: nn.Module) -> dict:
    """Names of the modules `apply_fp8` switched, by kind (for logging and tests)."""
    kinds = {"linear": FP8Linear, "mlp": FP8MLP, "experts": FP8GroupedExperts, "norm": RecomputedRMSNorm,
             "block": RecomputedBlock}
    return {k: [n for n, m in model.named_modules() if isinstance(m, cls)] for k, cls in kinds.items()}
