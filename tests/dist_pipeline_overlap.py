"""torchrun worker (4 ranks, gloo): DualPipeV's overlapped forward and backward changes no result.

pp=2 x ep=2 on a shrunken `tiny` model. For every schedule, two copies of one model train the same
batches, one with `Pipeline(overlap=False)`, one with `overlap=True` run under injected latency
(bench/latency.py, so that the all-to-alls take time and the two chunks of an overlapped action
really interleave). Main and MTP losses and every gradient must be bitwise equal at every step;
DualPipeV also with the hierarchical dispatcher over two one-rank nodes (its rail process group gets a
twin too) and in bf16 autocast (the backward thread must run under the caller's autocast: the
router and MLA recompute forward ops in backward). For DualPipeV the overlapped run must have handed
the baton over during communication (`Baton.overlaps` > 0).

Gradient buckets during backward under the zero-bubble schedules (zbv, dualpipev), whose weight steps
add gradients outside autograd's hooks: `GradientAllReduce` with the pipeline reporting its weight
steps must start buckets before the schedule's step returns, and give bitwise the gradients of the
blocking reduction after the step. Prints OVERLAP OK on rank 0.
"""
import copy
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.latency import InjectedLatency  # noqa: E402
from dist_launch import finish_worker  # noqa: E402
from dist_pipeline_train import tiny_config  # noqa: E402
from model.transformer import Transformer  # noqa: E402
from parallel.dispatch import make_dispatcher  # noqa: E402
from parallel import grad_buckets  # noqa: E402
from parallel.expert_parallel import GradientAllReduce, apply_expert_parallel, reduce_gradients  # noqa: E402
from parallel.mesh import build_layout  # noqa: E402
from parallel.pipeline import Pipeline  # noqa: E402

FAILURES = []
N_MB, SEQ, STEPS, LR = 6, 8, 2, 1e-2


def train(model, layout, schedule, overlap, autocast, batches):
    """Losses and gradients of each step (plain SGD between steps, identical for both runs)."""
    pipe = Pipeline(model, pp_group=layout.pp_group, schedule=schedule, n_microbatches=N_MB, micro_batch=1,
                    seq_len=SEQ, overlap=overlap)
    pipe.set_balance_loss_weight(model.cfg.aux_loss_alpha / N_MB)
    named = [(n, p) for n, p in pipe.named_parameters() if p.requires_grad]
    record = []
    for tokens in batches:
        for _, p in named:
            p.grad = None
        with autocast(), (InjectedLatency(0.002) if overlap else nullcontext()):
            out = pipe.step(tokens)
        reduce_gradients(named, layout)
        record.append((torch.stack([out["loss"], out["mtp_loss"]]), {n: p.grad.clone() for n, p in named}))
        with torch.no_grad():
            for _, p in named:
                p -= LR * p.grad
    return record, pipe


def check(schedule, precision, dispatcher_name, gpus_per_node, cfg):
    layout = build_layout(pp=2, ep=2, gpus_per_node=gpus_per_node, n_routed_experts=cfg.n_routed_experts,
                          n_group=cfg.n_group)
    torch.manual_seed(0)
    model = Transformer(cfg)
    twin = copy.deepcopy(model)
    dispatcher = make_dispatcher(dispatcher_name, layout.ep_group, layout.gpus_per_node)
    for m in (model, twin):
        apply_expert_parallel(m, layout, dispatcher)
    replica = layout.dp_rank * layout.ep + layout.ep_rank
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (2, N_MB, SEQ + 1), generator=gen)[replica] for _ in range(STEPS)]
    autocast = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else nullcontext)
    plain, _ = train(model, layout, schedule, False, autocast, batches)
    overlapped, pipe = train(twin, layout, schedule, True, autocast, batches)
    tag = f"rank {dist.get_rank()} {schedule} {precision} {dispatcher_name}"
    for step, ((loss_a, grads_a), (loss_b, grads_b)) in enumerate(zip(plain, overlapped)):
        if not torch.equal(loss_a, loss_b):
            FAILURES.append(f"{tag} step {step}: losses {loss_a.tolist()} (sequential) vs {loss_b.tolist()} (overlapped)")
        differ = [n for n in grads_a if not torch.equal(grads_a[n], grads_b[n])]
        if differ:
            FAILURES.append(f"{tag} step {step}: gradients differ: {differ[:4]}")
    overlaps = pipe.overlap.baton.overlaps if pipe.overlap is not None else 0
    if schedule == "dualpipev" and overlaps == 0:
        FAILURES.append(f"{tag}: no chunk computed while the other communicated")
    if schedule == "dualpipev" and pipe.overlap.early_sends == 0:
        FAILURES.append(f"{tag}: no chunk's output was sent before its overlapped action ended")
    if dist.get_rank() == 0:
        print(f"{schedule} {precision} {dispatcher_name}: losses {[r[0].tolist() for r in overlapped]} bitwise equal; "
              f"hand-offs during communication {overlaps}, sends posted early "
              f"{pipe.overlap.early_sends if pipe.overlap is not None else 0}", flush=True)


def check_buckets_during_backward(schedule, cfg):
    layout = build_layout(pp=2, ep=2, gpus_per_node=4, n_routed_experts=cfg.n_routed_experts, n_group=cfg.n_group)
    torch.manual_seed(0)
    model = Transformer(cfg)
    twin = copy.deepcopy(model)
    dispatcher = make_dispatcher("flat", layout.ep_group, layout.gpus_per_node)
    pipes = []
    for m in (model, twin):
        apply_expert_parallel(m, layout, dispatcher)
        pipe = Pipeline(m, pp_group=layout.pp_group, schedule=schedule, n_microbatches=N_MB, micro_batch=1,
                        seq_len=SEQ, overlap=True)
        pipe.set_balance_loss_weight(cfg.aux_loss_alpha / N_MB)
        pipes.append(pipe)
    replica = layout.dp_rank * layout.ep + layout.ep_rank
    tokens = torch.randint(0, cfg.vocab_size, (2, N_MB, SEQ + 1), generator=torch.Generator().manual_seed(2))[replica]
    named = [[(n, p) for n, p in pipe.named_parameters() if p.requires_grad] for pipe in pipes]
    grad_buckets.BUCKET_ELEMENTS, default_cap = 20_000, grad_buckets.BUCKET_ELEMENTS
    try:
        gradients = GradientAllReduce(named[0], layout)
    finally:
        grad_buckets.BUCKET_ELEMENTS = default_cap
    pipes[0].report_weight_gradients(gradients.added_outside_autograd)
    gradients.expect_backwards(N_MB, pipes[0].parameter_uses())
    pipes[0].step(tokens)
    during = gradients.buckets.started
    gradients.reduce_gradients()
    pipes[1].step(tokens)
    reduce_gradients(named[1], layout)
    tag = f"rank {dist.get_rank()} {schedule} buckets"
    total = len(gradients.buckets.buckets)
    if not 0 < during:
        FAILURES.append(f"{tag}: none of {total} buckets started before the schedule's step returned")
    differ = [n for (n, p), (_, q) in zip(*named) if not torch.equal(p.grad, q.grad)]
    if differ:
        FAILURES.append(f"{tag}: bucketed gradients differ from the blocking reduction: {differ[:4]}")
    if dist.get_rank() == 0:
        print(f"{schedule}: {during} of {total} gradient buckets started during the step; gradients equal to the "
              f"blocking reduction bit for bit", flush=True)


def main():
    dist.init_process_group("gloo")
    cfg = tiny_config()
    for case in [("dualpipev", "fp32", "flat", 4), ("dualpipev", "bf16", "flat", 4),
                 ("dualpipev", "fp32", "hierarchical", 1), ("1f1b", "fp32", "flat", 4),
                 ("interleaved_1f1b", "fp32", "flat", 4), ("zbv", "fp32", "flat", 4)]:
        check(*case, cfg)
    for schedule in ("zbv", "dualpipev"):
        check_buckets_during_backward(schedule, cfg)
    finish_worker(FAILURES, "OVERLAP OK")


if __name__ == "__main__":
    main()
