"""One optimizer step and one validation pass (DeepSeek-V3 sections 2.1.2, 2.2, 4.2).

A step runs the micro-batches with gradient accumulation (loss = CE + λ·mean MTP CE, each scaled by
1/accumulation steps; the sequence-wise balance loss reaches the gradients through the MoE layers
with weight α/accumulation steps), averages gradients over data-parallel ranks, clips them by global
norm, applies AdamW and then moves every router bias by ±γ from the expert load summed over ranks.
A step whose loss or gradient norm is not finite changes nothing: no update, no bias move.
"""
from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

import torch

from eval.scoring import bits_per_byte, token_nll
from model.transformer import Transformer, lm_loss, maxvio
from parallel.expert_parallel import ExpertParallel

from .distributed import Dist
from .optim import AdamW, clip_grads, grad_norm

if TYPE_CHECKING:
    from parallel.pipeline_training import PipelineParallel


@dataclass
class StepResult:
    loss: float
    mtp_loss: float
    balance_loss: float
    grad_norm: float
    maxvio: float
    skipped: bool
    traffic: Dict[str, float] = field(default_factory=dict)
    load: Optional[torch.Tensor] = None  # [MoE layers, E]: tokens per expert over ranks (pp: local layers)


def reset_expert_load(model: Transformer) -> None:
    """Forget the tokens counted since the last bias update (used when a step is skipped)."""
    for moe in model.moe_layers():
        moe.gate.tokens_per_expert.zero_()


def train_step(model: Transformer, optimizer: AdamW, micro_batches: List[torch.Tensor], *, mtp_lambda: float,
               gamma: float, alpha: float, grad_clip: float, autocast: Callable[[], AbstractContextManager],
               dist: Dist, ep: Optional[ExpertParallel] = None) -> StepResult:
    """Forward/backward over `micro_batches` ([b, S+1] each), then update unless non-finite.

    With expert parallelism (`ep`), gradients, their norm and the expert load are reduced by `ep`
    (experts differ between EP ranks) and the step's all-to-all bytes are returned in `traffic`."""
    accum = len(micro_batches)
    if ep is not None:
        ep.dispatcher.reset_traffic()
        ep.expect_backwards(accum)
    model.set_balance_loss_weight(alpha / accum)
    sums = torch.zeros(3, dtype=torch.float64, device=dist.device)
    for tokens in micro_batches:
        with autocast():
            out = lm_loss(model, tokens)
            total = (out["loss"] + mtp_lambda * out["mtp_loss"]) / accum
        total.backward()
        sums += torch.stack([out["loss"].detach(), out["mtp_loss"].detach(),
                             model.balance_loss().to(sums.device)]).double() / accum
    params = [p for p in model.parameters() if p.requires_grad]
    if ep is None:
        dist.average_gradients(params)
        norm = float(grad_norm(params))
        load_LE = dist.all_reduce_(model.expert_load().clone())
    else:
        ep.reduce_gradients()
        norm = float(ep.grad_norm())
        load_LE = ep.expert_load()
    dist.all_reduce_(sums).div_(dist.world)
    loss, mtp_loss, balance = sums.tolist()
    skipped = not (math.isfinite(loss) and math.isfinite(mtp_loss) and math.isfinite(norm))
    if skipped:
        reset_expert_load(model)
    else:
        clip_grads(params, norm, grad_clip)
        optimizer.step()
        model.update_router_bias(gamma, load_LE)
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss, mtp_loss=mtp_loss, balance_loss=balance, grad_norm=norm,
                      maxvio=maxvio(load_LE), skipped=skipped, traffic=ep.traffic() if ep is not None else {},
                      load=load_LE)


def parallel_train_step(par: "PipelineParallel", rows: torch.Tensor, *, mtp_lambda: float, gamma: float,
                        alpha: float, grad_clip: float, autocast: Callable[[], AbstractContextManager],
                        ep: Optional[ExpertParallel] = None) -> StepResult:
    """`train_step` for pipeline parallelism and/or ZeRO-1 (parallel/pipeline_training.py): this
    replica's `rows` ([micro-batches x b, S+1]) run through the pipeline schedule (or one micro-batch
    after the other when pp = 1); same reductions, skip rule, clipping and bias update."""
    if ep is not None:
        ep.dispatcher.reset_traffic()
    sums = par.forward_backward(rows, mtp_lambda=mtp_lambda, alpha=alpha, autocast=autocast)
    par.reduce_gradients()
    norm = float(par.grad_norm())
    load_LE = par.expert_load()
    loss, mtp_loss, balance = par.mean_over_replicas(sums).tolist()
    skipped = not (math.isfinite(loss) and math.isfinite(mtp_loss) and math.isfinite(norm))
    if skipped:
        par.reset_expert_load()
    else:
        par.clip_grads(norm, grad_clip)
        par.optimizer.step()
        par.update_router_bias(gamma, load_LE)
    par.zero_grad()
    return StepResult(loss=loss, mtp_loss=mtp_loss, balance_loss=balance, grad_norm=norm,
                      maxvio=par.maxvio(load_LE), skipped=skipped, traffic=ep.traffic() if ep is not None else {},
                      load=load_LE)


def parallel_validate(par: "PipelineParallel", batches, bytes_per_token: float, *,
                      autocast: Callable[[], AbstractContextManager]) -> Tuple[float, float]:
    """`validate` through `PipelineParallel.validate` (batches split over the data-parallel replicas)."""
    nll_sum, count = par.validate(batches, autocast)
    if count == 0:
        raise ValueError("validation split produced no batches; lower eval.batch_size or train.seq_len")
    return nll_sum / count, bits_per_byte(nll_sum, count * bytes_per_token)


@torch.no_grad()
def validate(model: Transformer, batches, bytes_per_token: float, *,
             autocast: Callable[[], AbstractContextManager], dist: Dist) -> Tuple[float, float]:
    """(mean token NLL in nats, bits per byte) over `batches`, split round-robin over ranks.

    Every rank runs the same number of forwards (a rank past the end repeats batch 0 and discards
    it), since expert-parallel forwards are collectives."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=dist.device)
    batches = list(batches)
    for i in range(dist.rank, -(-len(batches) // dist.world) * dist.world, dist.world):
        with autocast():
            nll = token_nll(model, batches[i if i < len(batches) else 0].to(dist.device))
        if i >= len(batches):
            continue
        totals += torch.stack([nll.double().sum(), torch.tensor(nll.numel(), dtype=torch.float64,
                                                                device=dist.device)])
    dist.all_reduce_(totals)
    model.train(was_training)
    nll_sum, count = totals.tolist()
    if count == 0:
        raise ValueError("validation split produced no batches; lower eval.batch_size or train.seq_len")
    return nll_sum / count, bits_per_byte(nll_sum, count * bytes_per_token)
