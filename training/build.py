"""What one rank builds for a training job: the process layout, its part of the model, the optimizer
factory, and the expert-parallel and pipeline/ZeRO-1 wrappers (used by `training.loop.Trainer`).

DeepSeek-V3 section 3.2: the model is built rank-locally (`parallel.rank_model`): a rank allocates
only its pipeline stages' layers and its 1/ep of the routed experts, from layout-independent initial
values, so one process and every (pp, ep, dp) layout start from the same weights.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from model.config import ModelConfig
from model.transformer import Transformer
from parallel.expert_parallel import ExpertParallel
from parallel.mesh import ParallelLayout, build_layout
from parallel.rank_model import RankModel, build_rank_model

from .config import micro_batch_size
from .optim import DTYPES, AdamW


def zero_enabled(cfg: DictConfig, dp: int) -> bool:
    """`parallel.zero`, or when null whether `dp` (the ranks that split the batch, dp x ep) exceeds 1."""
    return bool(cfg.parallel.zero) if cfg.parallel.zero is not None else dp > 1


def uses_pipeline_parallel(cfg: DictConfig, dp: int) -> bool:
    """Whether the run goes through `PipelineParallel`: pp > 1, ZeRO-1, offload or non-fp32 parameters
    (which need fp32 master weights)."""
    return (cfg.parallel.pp > 1 or zero_enabled(cfg, dp) or cfg.optim.offload == "cpu"
            or cfg.precision.param_dtype != "fp32")


def parallel_layout(cfg: DictConfig, mcfg: ModelConfig, device: torch.device, dp: int) -> Optional[ParallelLayout]:
    """The (pp, dp, ep) mesh and its process groups when the run uses EP or `PipelineParallel`, else None."""
    par = cfg.parallel
    if par.ep == 1 and not uses_pipeline_parallel(cfg, dp):
        return None
    return build_layout(pp=par.pp, dp=par.dp, ep=par.ep, gpus_per_node=par.gpus_per_node,
                        dispatcher=par.dispatcher, n_routed_experts=mcfg.n_routed_experts, n_group=mcfg.n_group,
                        device_type=device.type)


def build_rank(cfg: DictConfig, mcfg: ModelConfig, device: torch.device,
               layout: Optional[ParallelLayout] = None) -> RankModel:
    """This rank's model (`parallel.rank_model.build_rank_model`): declared on meta, with only the layers
    of its pipeline stages and its slice of the routed experts materialized on `device`, initialized
    from `seed` independently of the layout; FP8 layers under precision=fp8, every parameter (not the
    buffers: router bias, expert load, RoPE tables stay fp32) in `precision.param_dtype`."""
    torch.manual_seed(cfg.seed)
    par = cfg.parallel
    if cfg.precision.name == "fp8":
        importlib.import_module("kernels.ops").set_backend(cfg.precision.fp8_backend, device)
    layers = OmegaConf.to_container(par.layers_per_stage) if par.layers_per_stage is not None else None
    coords = dict(pp=layout.pp, pp_rank=layout.pp_rank, ep=layout.ep, ep_rank=layout.ep_rank) if layout else {}
    rank = build_rank_model(mcfg, seed=cfg.seed, device=device, schedule=par.schedule,
                            stages_per_rank=par.stages_per_rank, layers_per_stage=layers,
                            fp8=cfg.precision.name == "fp8", **coords)
    dtype = DTYPES[cfg.precision.param_dtype]
    for p in rank.model.parameters():
        p.data = p.data.to(dtype)
    rank.model.fused_head_loss = cfg.precision.fused_head_loss
    rank.model.train()
    return rank


def build_model(cfg: DictConfig, mcfg: ModelConfig, device: torch.device,
                layout: Optional[ParallelLayout] = None) -> Transformer:
    """The Transformer of `build_rank` (the parts this rank does not hold stay on the meta device)."""
    return build_rank(cfg, mcfg, device, layout).model


def optimizer_factory(cfg: DictConfig) -> Callable:
    """`named_params -> optimizer`: the trainer's AdamW, or DeepSpeed's CPU Adam with optim.offload=cpu."""
    o = cfg.optim
    kwargs = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
                  decay_embeddings=o.decay_embeddings)
    if o.offload == "cpu":
        from .cpu_adam import CPUAdamW

        return lambda named: CPUAdamW(named, **kwargs)
    return lambda named: AdamW(named, moments_dtype=o.moments_dtype, **kwargs)


def expert_parallel(model: Transformer, cfg: DictConfig, layout: Optional[ParallelLayout]) -> Optional[ExpertParallel]:
    """Dispatcher and collectives of expert parallelism (None when ep = 1); see parallel/expert_parallel.py."""
    if layout is None or layout.ep == 1:
        return None
    return ExpertParallel(model, layout, fp8=cfg.precision.name == "fp8")


def pipeline_parallel(model: Transformer, cfg: DictConfig, layout: Optional[ParallelLayout],
                      make_optimizer: Callable, dp: int):
    """Pipeline stages and/or ZeRO-1 and master weights (parallel/pipeline_training.py); None when pp = 1
    without ZeRO, with fp32 parameters and no offload."""
    par, t = cfg.parallel, cfg.train
    if not uses_pipeline_parallel(cfg, dp):
        return None
    from parallel.pipeline_training import PipelineParallel

    layers = OmegaConf.to_container(par.layers_per_stage) if par.layers_per_stage is not None else None
    micro = micro_batch_size(cfg, dp)
    return PipelineParallel(model, layout, micro_batch=micro, seq_len=t.seq_len,
                            n_microbatches=t.global_batch // (micro * dp), make_optimizer=make_optimizer,
                            schedule=par.schedule, stages_per_rank=par.stages_per_rank, layers_per_stage=layers,
                            zero=zero_enabled(cfg, dp), offload=cfg.optim.offload == "cpu",
                            wire_dtype=None if cfg.precision.name == "fp32" else torch.bfloat16,
                            overlap=par.overlap)
