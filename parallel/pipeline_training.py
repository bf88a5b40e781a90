"""What a training loop needs to run pipeline (pp >= 1) x data (dp) x expert (ep) parallelism,
optionally with ZeRO-1: one object owning this rank's part of the model, its optimizer and the
collectives of a step.

DeepSeek-V3 section 3.2 (DualPipe pipeline, EP, ZeRO-1). With pp > 1 the model runs through
`parallel.pipeline.Pipeline`; with pp = 1 the micro-batches run one after the other on the whole
(expert-sharded) model. Gradients are reduced as `parallel.expert_parallel.reduce_gradients` does
(dense: mean over dp x ep; experts: sum over dp / (dp x ep)), by `GradientAllReduce` or by
`parallel.data_parallel.Zero1`, in buckets started during the backward passes (the zero-bubble
schedules' weight steps included).
Statistics that live on several pipeline ranks are combined over the pipeline group: the gradient
norm (squares summed), MaxVio (max), the balance loss (sum). The expert load of this rank's MoE
layers is summed over the dp x ep ranks that route tokens (the bias update's global load).
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from model.head_loss import head_logprobs
from model.init import materialized_device
from model.transformer import Transformer, lm_loss, maxvio

from .data_parallel import Zero1
from .expert_parallel import GradientAllReduce, local_state, param_grad_norms, shard_expert_state
from .mesh import ParallelLayout
from .pipeline import Pipeline



class PipelineParallel:
    """This rank's model part, optimizer and per-step collectives (see the module docstring).

    `make_optimizer(named_params)` builds the inner optimizer (e.g. the trainer's AdamW); with
    `zero` it runs on ZeRO-1 shards. Parameters that are not fp32, or `offload` (host-memory state),
    need fp32 master weights: `parallel.data_parallel.Zero1` then holds them, sharded with `zero`,
    whole on every rank without. `wire_dtype`: dtype of the activations sent
    between pipeline stages (bf16 under bf16 autocast and FP8); `overlap`: DualPipeV's overlapped
    forward and backward (parallel/pipeline_overlap.py). Experts must already be sharded (`ExpertParallel`) when ep > 1.
    """

    def __init__(self, model: Transformer, layout: ParallelLayout, *, micro_batch: int, seq_len: int,
                 n_microbatches: int, make_optimizer: Callable[[List[Tuple[str, torch.nn.Parameter]]], Any],
                 schedule: str = "1f1b", stages_per_rank: Optional[int] = None,
                 layers_per_stage: Optional[Sequence[int]] = None, zero: bool = False, offload: bool = False,
                 wire_dtype: Optional[torch.dtype] = None, overlap: bool = True):
        self.model, self.layout = model, layout
        self.n_microbatches, self.micro_batch = n_microbatches, micro_batch
        self.replicas = layout.dp * layout.ep
        self.replica = layout.dp_rank * layout.ep + layout.ep_rank
        self.device = materialized_device(model)
        self.pipe: Optional[Pipeline] = None
        if layout.pp > 1:
            self.pipe = Pipeline(model, pp_group=layout.pp_group, schedule=schedule, n_microbatches=n_microbatches,
                                 micro_batch=micro_batch, seq_len=seq_len, stages_per_rank=stages_per_rank,
                                 layers_per_stage=layers_per_stage, wire_dtype=wire_dtype,
                                 overlap=overlap)
        self.module = self.pipe.module if self.pipe is not None else model
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        self.named = named
        masters = offload or any(p.dtype != torch.float32 for _, p in named)
        self.zero = Zero1(named, layout, make_optimizer, shard=zero, offload=offload) if zero or masters else None
        self.optimizer = self.zero if self.zero is not None else make_optimizer(named)
        self.gradients = self.zero if self.zero is not None else GradientAllReduce(named, layout)
        self.param_uses = {}
        if self.pipe is not None:
            self.pipe.report_weight_gradients(self.gradients.added_outside_autograd)
            self.param_uses = self.pipe.parameter_uses()

    # ---- the step --------------------------------------------------------------------------
    def forward_backward(self, rows: torch.Tensor, *, mtp_lambda: float, alpha: float,
                         autocast: Callable[[], AbstractContextManager] = nullcontext) -> torch.Tensor:
        """Forward and backward of this replica's rows; returns this replica's mean [loss, mtp, balance].
        The gradient reduction (all-reduce, or ZeRO-1's reduce-scatter) starts bucket by bucket during
        the backward passes, as each bucket's last gradient arrives (`reduce_gradients` finishes it)."""
        if self.pipe is not None:
            self.gradients.expect_backwards(self.n_microbatches, self.param_uses)
            self.pipe.set_mtp_weight(mtp_lambda)
            self.pipe.set_balance_loss_weight(alpha / self.n_microbatches)
            with autocast():
                out = self.pipe.step(rows)
            balance = self.pipe.balance_loss()
            return torch.stack([out["loss"].double(), out["mtp_loss"].double(), balance.double()])
        micro = list(rows.split(self.micro_batch))
        self.gradients.expect_backwards(len(micro))
        self.model.set_balance_loss_weight(alpha / len(micro))
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        for tokens in micro:
            with autocast():
                out = lm_loss(self.model, tokens)
                total = (out["loss"] + mtp_lambda * out["mtp_loss"]) / len(micro)
            total.backward()
            sums += torch.stack([out["loss"].detach(), out["mtp_loss"].detach(),
                                 self.model.balance_loss().to(self.device)]).double() / len(micro)
        return sums

    def mean_over_replicas(self, values: torch.Tensor) -> torch.Tensor:
        """Mean over the dp x ep replicas (every pipeline rank already holds its replica's value)."""
        values = values.clone()
        if self.layout.dense_grad_group is not None:
            dist.all_reduce(values, group=self.layout.dense_grad_group)
        return values / self.replicas

    def reduce_gradients(self) -> None:
        """Finish the reduction started during backward: averaged gradients (ZeRO-1: this rank's shards)."""
        self.gradients.reduce_gradients()

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """L2 norm of the whole model's reduced gradient (every element counted once).

        Without ZeRO-1 it is computed like one process does (`training.optim.grad_norm`: the norm of
        the per-parameter fp64 norms, in the model's parameter order), so a pipeline-only run clips
        exactly as one process does; an expert tensor's norm combines the squared norms of its EP shards.
        """
        if self.zero is not None:
            return self.zero.grad_norm()
        index = {name: i for i, (name, _) in enumerate(self.model.named_parameters())}
        norms = torch.zeros(len(index), dtype=torch.float64, device=self.device)
        present = torch.zeros(len(index), device=self.device)
        named = [(n, p) for n, p in self.named if p.grad is not None]
        if named:
            rows = torch.tensor([index[n] for n, _ in named], device=self.device)
            norms[rows] = param_grad_norms(named, self.layout)
            present[rows] = 1.0
        if self.layout.pp > 1:
            dist.all_reduce(norms, group=self.layout.pp_group)
            dist.all_reduce(present, group=self.layout.pp_group)
        kept = norms[present > 0]
        return torch.linalg.vector_norm(kept) if kept.numel() else torch.zeros((), dtype=torch.float64)

    @torch.no_grad()
    def clip_grads(self, total_norm: float, max_norm: float) -> None:
        """Scale the gradients by max_norm / total_norm when the norm is larger (0 disables)."""
        if self.zero is not None:
            self.zero.clip_grads(max_norm, total_norm)
            return
        coef = max_norm / (total_norm + 1e-6)
        if max_norm > 0 and coef < 1.0:
            for _, p in self.named:
                if p.grad is not None:
                    p.grad.mul_(coef)

    def _moe_source(self):
        return self.pipe if self.pipe is not None else self.model

    @torch.no_grad()
    def expert_load(self) -> torch.Tensor:
        """Load of this rank's MoE layers [L_local, E], summed over the dp x ep ranks."""
        load = self._moe_source().expert_load().clone()
        if self.layout.dense_grad_group is not None and load.numel():
            dist.all_reduce(load, group=self.layout.dense_grad_group)
        return load

    def update_router_bias(self, gamma: float, load_LE: torch.Tensor) -> None:
        self._moe_source().update_router_bias(gamma, load_LE)

    def moe_layers(self):
        """This rank's MoE layers (those of its pipeline stages when pp > 1)."""
        return self._moe_source().moe_layers()

    def layer_load(self, load_LE: torch.Tensor) -> torch.Tensor:
        """The load of every MoE layer of the model [all MoE layers, E] from this rank's `load_LE`
        (gathered over the pipeline ranks when pp > 1: a collective)."""
        return self.pipe.full_expert_load(load_LE) if self.pipe is not None else load_LE

    def reset_expert_load(self) -> None:
        """Forget the tokens counted since the last bias update (a skipped step)."""
        for moe in self._moe_source().moe_layers():
            moe.gate.tokens_per_expert.zero_()

    def maxvio(self, load_LE: torch.Tensor) -> float:
        """MaxVio over all MoE layers of the model (max over the pipeline ranks)."""
        return self.pipe.maxvio(load_LE) if self.pipe is not None else maxvio(load_LE)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for _, p in self.named:
            p.grad = None

    # ---- validation ------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, batches: Iterable[torch.Tensor],
                 autocast: Callable[[], AbstractContextManager] = nullcontext) -> Tuple[float, int]:
        """(sum of token NLL in nats, token count) over `batches`, split round-robin over the replicas.

        Every replica runs the same number of forwards (one past the end repeats batch 0 and
        discards it) since expert-parallel and pipeline forwards are collectives."""
        batches = list(batches)
        replica = self.replica
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            for i in range(replica, -(-len(batches) // self.replicas) * self.replicas, self.replicas):
                tokens = batches[i if i < len(batches) else 0]
                with autocast():
                    if self.pipe is not None:
                        mean = self.pipe.evaluate(tokens)["loss"]
                    else:
                        h = self.model.hidden_states(tokens[:, :-1]).flatten(0, 1)
                        mean = -head_logprobs(h, self.model.lm_head.weight, tokens[:, 1:].flatten())[0].mean()
                if i < len(batches):
                    count = tokens[:, 1:].numel()
                    totals += torch.tensor([float(mean) * count, count], dtype=torch.float64, device=self.device)
        finally:
            self.model.train(was_training)
        if self.layout.dense_grad_group is not None:
            dist.all_reduce(totals, group=self.layout.dense_grad_group)
        return float(totals[0]), int(totals[1])

    # ---- checkpoints -----------------------------------------------------------------------
    def checkpoint_state(self) -> Dict[str, Any]:
        """{"model": this rank's parameters by name, "optim": optimizer state by name}, expert tensors
        (and ZeRO-1 shards) as DTensors so torch.distributed.checkpoint reshards them on load. The
        model's weights are fp32: a parameter with a separate master weight is saved as that master."""
        model = self.module.state_dict()
        optim = self.optimizer.state_dict()
        if self.layout.ep > 1 and self.layout.mesh is not None:
            model = shard_expert_state(model, self.layout)
            if self.zero is None:
                optim = shard_expert_state(optim, self.layout)
        if self.zero is not None:
            model.update(self.zero.master_state())
        return {"model": model, "optim": optim}

    def load_checkpoint_state(self, state: Dict[str, Any]) -> None:
        """Copy a state filled by torch.distributed.checkpoint (from `checkpoint_state`) into place."""
        model = local_state(state["model"])
        if self.zero is not None:
            model = self.zero.load_master_state(model)
        self.module.load_state_dict(model)
        if self.zero is not None:
            self.zero.load_state_dict(state["optim"])
        else:
            self.optimizer.load_state_dict(local_state(state["optim"]))
