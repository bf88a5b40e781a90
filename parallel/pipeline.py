"""Pipeline parallelism for the Transformer: stage split + torch.distributed.pipelining schedules.

DeepSeek-V3 section 3.2.1 (DualPipe) and section 2.2 (MTP shares the embedding and the output head
with the main model, which the V-shaped placement keeps on one rank). `Pipeline` builds this rank's
stages from a full `Transformer` (see `pipeline_stages` for the split and for how the MTP modules
get their embeddings), wraps them in `PipelineStage`s with static shapes, and runs one optimizer
step's micro-batches through the chosen schedule (`pipeline_schedules`).

Loss: the last stage computes CE + lambda * mean MTP CE for each micro-batch and the schedule
back-propagates it divided by the number of micro-batches, so gradients equal those of one
process on the whole batch. The MoE balance loss needs nothing here: each MoE layer attaches it to
its output (model/moe.py); call `set_balance_loss_weight(alpha / n_microbatches)` as with gradient
accumulation. Router load, balance loss and MaxVio are read from this rank's MoE layers and
combined over the pipeline group by the helpers below.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import _batch_p2p

from kernels.linear import backward_phase
from model.moe import MoE, set_balance_loss_weight, stacked_expert_load, update_router_biases
from model.transformer import Transformer, maxvio

from .pipeline_overlap import DualPipeOverlap
from .pipeline_schedules import SCHEDULE_CLASSES, check_microbatches
from .pipeline_stages import V_SHAPED, LocalModel, StageModule, check_schedule, rank_stages, split_layers, stage_rank


class _Stage(PipelineStage):
    """PipelineStage whose backward steps tell the FP8 kernels which gradients they are for, and
    whose weight steps tell the gradient reduction which gradients they added.

    The zero-bubble schedules (zbv, dualpipev) split a stage's backward into an input step and a
    later weight step, and torch runs the custom autograd functions' backward in both; inside
    `kernels.linear.backward_phase` each step computes only its own GEMMs (and an MLA recompute
    runs once). The weight step adds gradients with `grad += dw`, outside autograd's accumulation
    and its hooks: it runs inside `weight_grads_added(parameters)` (set by `Pipeline.
    report_weight_gradients`; nothing by default), so buckets reduced during backward still start
    once their last gradient is in."""

    weight_grads_added: Callable[[List[torch.nn.Parameter]], ContextManager[None]] = staticmethod(
        lambda _params: nullcontext())

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._sent_early: set = set()

    def send_now(self, kind: str, mb: int) -> list:
        """Post the sends of micro-batch `mb`'s forward output (`kind` "F", `pipeline_overlap.FWD`) or
        input gradient ("B", `pipeline_overlap.BWD`) now, ahead of the schedule's own SEND action, which
        then sends nothing; returns the works."""
        ops = super().get_fwd_send_ops(mb) if kind == "F" else super().get_bwd_send_ops(mb)
        self._sent_early.add((kind, mb))
        return _batch_p2p(ops)

    def _unless_sent_early(self, kind: str, mb: int, send_ops: Callable[[int], list]) -> list:
        """The schedule's send operations for (kind, mb), or none when `send_now` already posted them."""
        if (kind, mb) in self._sent_early:
            self._sent_early.discard((kind, mb))
            return []
        return send_ops(mb)

    def get_fwd_send_ops(self, fwd_chunk_id: int):
        return self._unless_sent_early("F", fwd_chunk_id, super().get_fwd_send_ops)

    def get_bwd_send_ops(self, bwd_chunk_id: int):
        return self._unless_sent_early("B", bwd_chunk_id, super().get_bwd_send_ops)

    def backward_maybe_with_nosync(self, backward_type, bwd_kwargs, last_backward=False):
        with backward_phase(backward_type):
            return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward=last_backward)

    def backward_weight_one_chunk(self, bwd_chunk_id: int, last_backward: bool = False):
        with self.weight_grads_added(list(self.submod.parameters())):
            return super().backward_weight_one_chunk(bwd_chunk_id, last_backward=last_backward)


class _MicroBatchLoss:
    """Loss function handed to the schedule: records (CE, MTP CE) and returns the scaled total."""

    def __init__(self, n_microbatches: int, mtp_weight: float):
        self.n_microbatches, self.mtp_weight = n_microbatches, mtp_weight
        self.records: List[torch.Tensor] = []

    def __call__(self, losses_2: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.records.append(losses_2.detach())
        return (losses_2[0] + self.mtp_weight * losses_2[1]) / self.n_microbatches


class Pipeline:
    """This rank's pipeline stages of `model` and the schedule that runs them.

    Every rank of `pp_group` calls `step(tokens_BT)` with the same tokens [n_microbatches * micro_batch,
    seq_len + 1]; it returns the mean main and MTP losses on every pipeline rank. Shapes are static
    (`micro_batch`, `seq_len`): the schedule allocates its receive buffers once (static stage
    metadata also keeps the schedule from running a stage's forward to infer shapes, which would
    count router load and run expert all-to-alls). Only `module` (this rank's stages) is used; the
    rest of the `model` passed in is not touched and can be dropped by the caller. `wire_dtype`:
    the dtype activations and their gradients travel in between stages (StageModule; None: fp32).
    `overlap` (dualpipev only): run each OVERLAP_F_B action's forward and backward chunks interleaved
    (`pipeline_overlap.DualPipeOverlap`, Figure 4 of the report); False runs them one after the other.
    """

    def __init__(self, model: Transformer, *, pp_group: dist.ProcessGroup, schedule: str, n_microbatches: int,
                 micro_batch: int, seq_len: int, stages_per_rank: Optional[int] = None,
                 layers_per_stage: Optional[Sequence[int]] = None, mtp_weight: float = 0.3,
                 wire_dtype: Optional[torch.dtype] = None, overlap: bool = True):
        cfg = self.cfg = model.cfg
        self.pp_group = pp_group
        self.pp, self.pp_rank = dist.get_world_size(pp_group), dist.get_rank(pp_group)
        self.schedule_name = schedule
        spr = check_schedule(schedule, self.pp, stages_per_rank)
        self.n_stages = self.pp * spr
        check_microbatches(schedule, self.pp, spr, n_microbatches)
        v_shaped = schedule in V_SHAPED
        if cfg.tie_word_embeddings and not v_shaped:
            raise ValueError(f"model.tie_word_embeddings=true needs the embedding and the head on one rank: use "
                             f"parallel.schedule=zbv or dualpipev (got {schedule})")
        self.layout = split_layers(cfg.num_hidden_layers, self.n_stages, layers_per_stage)
        has_mtp = cfg.num_nextn_predict_layers > 0
        self.n_microbatches, self.micro_batch, self.seq_len = n_microbatches, micro_batch, seq_len
        self.stage_modules = [
            StageModule(model, s, self.n_stages, self.layout[s], carry_embedding=has_mtp and not v_shaped,
                        local_mtp_embedding=has_mtp and v_shaped, wire_dtype=wire_dtype)
            for s in rank_stages(self.pp_rank, self.pp, self.n_stages, schedule)]
        self.module = LocalModel(model, self.stage_modules)
        weight = next(self.module.parameters())
        self.device = weight.device
        self.stages = []
        for m in self.stage_modules:
            inputs, outputs = m.io_shapes(micro_batch, seq_len)
            self.stages.append(_Stage(m, m.stage, self.n_stages, weight.device, input_args=inputs,
                                             output_args=outputs, group=pp_group))
        self._loss = _MicroBatchLoss(n_microbatches, mtp_weight)
        cls = SCHEDULE_CLASSES[schedule]
        self.schedule = cls(self.stages[0] if schedule == "1f1b" else self.stages, n_microbatches,
                            loss_fn=self._loss, scale_grads=False)
        self._last_rank = dist.get_global_rank(pp_group, stage_rank(self.n_stages - 1, self.pp, schedule))
        self.overlap = (DualPipeOverlap(self.schedule, self.stage_modules, self.pp)
                        if overlap and schedule == "dualpipev" else None)

    def report_weight_gradients(self, added: Callable[[List[torch.nn.Parameter]], ContextManager[None]]) -> None:
        """Run every weight step (zbv, dualpipev) inside `added(stage parameters)`, e.g. a gradient
        reduction's `added_outside_autograd`, which sees the gradients those steps add."""
        for stage in self.stages:
            stage.weight_grads_added = added

    def parameter_uses(self) -> Dict[int, int]:
        """id(parameter) -> how many of this rank's stages hold it, where more than one does (the
        embedding shared by the first stage and the MTP module of a V-shaped schedule): each stage's
        backward adds to its gradient once per micro-batch."""
        counts: Dict[int, int] = {}
        for module in self.stage_modules:
            for p in module.parameters():
                counts[id(p)] = counts.get(id(p), 0) + 1
        return {k: v for k, v in counts.items() if v > 1}

    @property
    def mtp_weight(self) -> float:
        return self._loss.mtp_weight

    def set_mtp_weight(self, weight: float) -> None:
        """lambda of the MTP loss (0.3 then 0.1 in DeepSeek-V3)."""
        self._loss.mtp_weight = weight

    def _split(self, tokens_BT: torch.Tensor):
        want = (self.n_microbatches * self.micro_batch, self.seq_len + 1)
        if tuple(tokens_BT.shape) != want:
            raise ValueError(f"pipeline step expects tokens of shape {list(want)} (n_microbatches x micro_batch, "
                             f"seq_len + 1), got {list(tokens_BT.shape)}")
        return tokens_BT[:, :-1].contiguous(), tokens_BT[:, 1:].contiguous()

    def step(self, tokens_BT: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Forward and backward of all micro-batches; gradients accumulate in the parameters' .grad
        (every parameter of this rank has a .grad afterwards, zeros where it did not reach the loss)."""
        inputs, labels = self._split(tokens_BT)
        self._loss.records.clear()
        for p in self.module.parameters():
            # The zero-bubble schedules add weight gradients with `grad += dw`; starting from a dense
            # zero tensor keeps that valid when the first dw is a broadcast view (a parameter that
            # only reaches the loss through a sum, e.g. experts that received no tokens).
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        self.schedule.step(inputs, target=labels, labels=labels, return_outputs=False)
        if self.overlap is not None:
            self.overlap.wait_sends()
        return self._mean_losses()

    @torch.no_grad()
    def evaluate(self, tokens_BT: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Forward only (no router load counted): token-mean main and MTP losses on every pipeline rank.

        Any number of rows [R, seq_len + 1]: they run in chunks of `micro_batch` rows (the last may be
        smaller), stage after stage with plain send/recv. torch's runtime schedules (zbv, dualpipev)
        cannot run forward-only (`schedule.eval` still executes their backward actions), and
        evaluation is rare enough not to need overlap.
        """
        if tokens_BT.dim() != 2 or tokens_BT.shape[1] != self.seq_len + 1:
            raise ValueError(f"pipeline evaluation expects tokens [rows, seq_len + 1 = {self.seq_len + 1}], "
                             f"got {list(tokens_BT.shape)}")
        inputs, labels = tokens_BT[:, :-1], tokens_BT[:, 1:]
        was_training = self.module.training
        self.module.eval()
        local = {m.stage: m for m in self.stage_modules}
        total = torch.zeros(2, dtype=torch.float32, device=self.device)
        try:
            for x_mb, y_mb in zip(inputs.split(self.micro_batch), labels.split(self.micro_batch)):
                acts = (x_mb.contiguous(),)
                for s in range(self.n_stages):
                    owner, prev = self._stage_owner(s), self._stage_owner(s - 1) if s else None
                    if owner != self.pp_rank:
                        if prev == self.pp_rank:
                            for t in acts:
                                self._p2p(dist.isend, t.contiguous(), owner)
                        continue
                    if s and prev != self.pp_rank:
                        metas = local[s].io_shapes(x_mb.shape[0], self.seq_len)[0]
                        acts = tuple(self._recv_like(t, prev) for t in metas)
                    out = local[s](*acts, labels=y_mb.contiguous())
                    if s == self.n_stages - 1:
                        total += out.detach().float() * x_mb.shape[0]
                    acts = out if isinstance(out, tuple) else (out,)
        finally:
            self.module.train(was_training)
        total /= inputs.shape[0]
        dist.broadcast(total, src=self._last_rank, group=self.pp_group)
        return {"loss": total[0], "mtp_loss": total[1]}

    def _stage_owner(self, stage: int) -> int:
        return stage_rank(stage, self.pp, self.schedule_name)

    def _recv_like(self, meta: torch.Tensor, src_rank: int) -> torch.Tensor:
        buf = torch.empty(meta.shape, dtype=meta.dtype, device=self.device)
        self._p2p(dist.irecv, buf, src_rank)
        return buf

    def _p2p(self, op, tensor: torch.Tensor, pp_rank: int) -> None:
        """One send or receive as a batched P2P op, as the schedules do: NCCL then uses the pipeline
        group's communicator (connected at start-up) instead of creating a pairwise one."""
        peer = dist.get_global_rank(self.pp_group, pp_rank)
        for work in dist.batch_isend_irecv([dist.P2POp(op, tensor, peer, self.pp_group)]):
            work.wait()

    def _mean_losses(self) -> Dict[str, torch.Tensor]:
        """Mean over the micro-batches (float64, like gradient accumulation's bookkeeping), on every rank."""
        if self._loss.records:
            mean = torch.stack(self._loss.records).double().mean(dim=0)
        else:
            mean = torch.zeros(2, dtype=torch.float64, device=self.device)
        dist.broadcast(mean, src=self._last_rank, group=self.pp_group)
        return {"loss": mean[0], "mtp_loss": mean[1]}

    # ---- MoE statistics of this rank's layers -------------------------------------------------
    def moe_layers(self) -> List[MoE]:
        """This rank's MoE layers, main blocks in layer order, then the MTP blocks."""
        return [m for m in self.module.modules() if isinstance(m, MoE)]

    def moe_layer_ids(self) -> List[int]:
        """Index of each local MoE layer in the full model's `moe_layers()` order (rows of its load)."""
        cfg, ids = self.cfg, []
        for key, block in self.module.layers.items():
            if isinstance(block.mlp, MoE):
                ids.append(int(key) - cfg.first_k_dense_replace)
        if hasattr(self.module, "mtp"):
            ids.extend(cfg.n_moe_layers + j for j, m in enumerate(self.module.mtp) if isinstance(m.block.mlp, MoE))
        return ids

    def expert_load(self) -> torch.Tensor:
        """Tokens routed to each expert of this rank's MoE layers since the last bias update [L_local, E]."""
        return stacked_expert_load(self.moe_layers(), self.device)

    @torch.no_grad()
    def full_expert_load(self, load_LE: torch.Tensor) -> torch.Tensor:
        """The load of every MoE layer of the model [all MoE layers, E] from each pipeline rank's rows
        `load_LE` (this rank's layers); a collective over the pipeline ranks."""
        cfg = self.cfg
        n_layers = cfg.n_moe_layers + (cfg.num_nextn_predict_layers if cfg.n_routed_experts else 0)
        full = torch.zeros(n_layers, cfg.n_routed_experts, dtype=torch.float32, device=self.device)
        if load_LE.numel():
            full[self.moe_layer_ids()] = load_LE.float().to(self.device)
        dist.all_reduce(full, group=self.pp_group)
        return full

    def update_router_bias(self, gamma: float, load_LE: Optional[torch.Tensor] = None) -> None:
        """Auxiliary-loss-free bias update of this rank's routers (pass the load all-reduced over dp x ep)."""
        update_router_biases(self.moe_layers(), gamma, load_LE)

    def set_balance_loss_weight(self, weight: float) -> None:
        """Gradient weight of the sequence balance loss (alpha / n_microbatches)."""
        set_balance_loss_weight(self.moe_layers(), weight)

    def balance_loss(self) -> torch.Tensor:
        """Sum over all MoE layers of the whole model (all pipeline ranks) of the last balance loss."""
        layers = self.moe_layers()
        local = torch.stack([m.last_balance_loss for m in layers]).sum() if layers else torch.zeros(())
        total = local.detach().float().reshape(1).to(self.device)
        dist.all_reduce(total, group=self.pp_group)
        return total[0]

    def maxvio(self, load_LE: torch.Tensor) -> float:
        """MaxVio over the MoE layers of all pipeline ranks (max of each rank's local MaxVio)."""
        value = torch.tensor([maxvio(load_LE) if load_LE.numel() else float("-inf")], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.pp_group)
        return float(value[0]) if torch.isfinite(value[0]) else 0.0

    # ---- parameters under their original names ----------------------------------------------
    def named_parameters(self):
        return self.module.named_parameters()

    def parameters(self):
        return self.module.parameters()

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """This rank's part of the model's state dict, under the Transformer's own names."""
        return self.module.state_dict()

    def load_state_dict(self, state: Dict[str, torch.Tensor], strict: bool = True):
        return self.module.load_state_dict(state, strict=strict)
