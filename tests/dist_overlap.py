"""torchrun worker (2 ranks, gloo): communication overlapped with computation (DeepSeek-V3 section 3.2.1).

Launched by tests/test_overlap.py. Every collective completes no earlier than DELAY after it starts
(bench/latency.py's injector), and the times at which things happen are recorded:
- an MoE layer (ep=2, shared expert) starts the shared expert's forward after the dispatch's payload
  all-to-all started and before it can have completed (start + DELAY), and the routed experts after;
  in backward the shared expert's backward runs after the dispatch's reverse all-to-all started and
  before it can have completed; the overlapped layer's output and gradients equal the layer run with
  the dispatch and shared expert one after the other (`dispatcher(...)` then the shared expert); the
  dispatcher's wait hooks run around every blocking wait (counts exchange, dispatch and combine, forward
  and backward) and nowhere else: the shared and routed experts compute outside them;
- gradient buckets (ep=2 with `ExpertParallel`, dp=2 with ZeRO-1, 2 micro-batches, small buckets): a
  bucket's collective starts before the last backward pass returns, and the reduced gradients equal
  those of the reduction after backward (2 ranks: a sum of two terms, exact in any order).
Prints DIST_OVERLAP_OK when all pass.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from dist_launch import finish_worker  # noqa: E402

from bench.latency import InjectedLatency  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.moe import MoE  # noqa: E402
from model.transformer import Transformer, lm_loss  # noqa: E402
from parallel import grad_buckets  # noqa: E402
from parallel.data_parallel import Zero1  # noqa: E402
from parallel.dispatch import WaitHooks, make_dispatcher  # noqa: E402
from parallel.expert_parallel import ExpertParallel, keep_expert_slice, reduce_gradients  # noqa: E402
from parallel.mesh import build_layout  # noqa: E402

DELAY = 0.3
REDUCE_SCATTER = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"
FAILURES = []
CFG = ModelConfig(vocab_size=64, hidden_size=128, intermediate_size=128, moe_intermediate_size=64,
                  num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, n_routed_experts=8,
                  n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1, max_position_embeddings=64)


def check(name, ok, detail=""):
    if not ok:
        FAILURES.append(f"rank {dist.get_rank()}: {name} {detail}")


class Timeline:
    """Monotonic times of named events; wraps dist.all_to_all_single to log async starts."""

    def __init__(self):
        self.events = []

    def mark(self, name):
        self.events.append((name, time.monotonic()))

    def first(self, name):
        return next(t for n, t in self.events if n == name)

    def all(self, name):
        return [t for n, t in self.events if n == name]


class MarkingHooks(WaitHooks):
    """Wait hooks that mark "wait" before blocking and "waited" after on a Timeline."""

    def __init__(self, line):
        self.line = line

    def before(self):
        self.line.mark("wait")

    def after(self):
        self.line.mark("waited")


class OneLayer:
    def __init__(self, moe):
        self.moe = moe

    def moe_layers(self):
        return [self.moe]


def moe_layer(rank):
    """The same seeded MoE layer on every rank, holding this rank's half of the routed experts."""
    torch.manual_seed(0)
    moe = MoE(CFG)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.05)
    keep_expert_slice(OneLayer(moe), rank, 2)
    moe.dispatcher = make_dispatcher("flat", None, 2)
    return moe


def check_shared_expert_overlap():
    rank = dist.get_rank()
    moe = moe_layer(rank)
    x = torch.randn(2, 16, CFG.hidden_size, generator=torch.Generator().manual_seed(rank)).requires_grad_()
    line = Timeline()
    moe.dispatcher.wait_hooks = MarkingHooks(line)
    moe.shared_experts.register_forward_pre_hook(lambda *_: line.mark("shared forward"))
    moe.experts.register_forward_pre_hook(lambda *_: line.mark("routed forward"))
    moe.shared_experts.down_proj.register_full_backward_hook(lambda *_: line.mark("shared backward"))
    with InjectedLatency(DELAY):
        a2a = dist.all_to_all_single

        def logged(*args, **kwargs):
            if kwargs.get("async_op"):
                line.mark("async a2a")
            return a2a(*args, **kwargs)

        dist.all_to_all_single = logged
        try:
            y = moe(x)
            line.mark("forward done")
            y.square().sum().backward()
        finally:
            dist.all_to_all_single = a2a
    order = [n for n, _ in line.events if n != "async a2a"]
    pair = ["wait", "waited"]
    expected = (pair + ["shared forward"] + pair + ["routed forward"] + pair + ["forward done"]
                + pair + ["shared backward"] + pair)  # counts, dispatch, combine | combine^-1, dispatch^-1
    check("wait hooks around every wait and no computation", order == expected, f"{order}")
    starts = line.all("async a2a")
    fwd_start, shared = starts[0], line.first("shared forward")
    check("shared forward after the dispatch started", fwd_start < shared, f"{line.events}")
    check("shared forward before the dispatch can complete", shared < fwd_start + DELAY, f"{line.events}")
    check("routed experts after the dispatch completed", line.first("routed forward") >= fwd_start + DELAY,
          f"{line.events}")
    back = [t for t in starts if t > line.first("forward done")]
    shared_back = line.first("shared backward")
    reverse_dispatch = max(t for t in back if t < shared_back)
    check("shared backward while the reverse dispatch travels", shared_back < reverse_dispatch + DELAY,
          f"{line.events}")

    sequential = moe_layer(rank)
    xs = x.detach().clone().requires_grad_()
    x_TD = xs.view(-1, CFG.hidden_size)
    idx, w, _ = sequential.gate(x_TD)
    ys = (sequential.dispatcher(x_TD, idx, w, sequential.experts) + sequential.shared_experts(x_TD)).view_as(xs)
    ys.square().sum().backward()
    check("overlapped output == sequential", torch.equal(y.detach(), ys.detach()))
    # x's gradient sums three contributions (router, shared expert, dispatch) in the order autograd
    # reaches them, which the overlap changes: equal up to that fp32 summation order. Everything
    # downstream of x's gradient (the router's weight) inherits it; the experts' gradients are equal.
    err = float((x.grad - xs.grad).abs().max() / xs.grad.abs().max())
    print(f"rank {rank}: grad x max relative difference to the sequential layer {err:.2e}", flush=True)
    check("overlapped grad x == sequential up to summation order", err < 1e-6, f"{err:.2e}")
    for (name, p), q in zip(moe.named_parameters(), sequential.parameters()):
        if name == "gate.weight":
            gerr = float((p.grad - q.grad).abs().max() / q.grad.abs().max())
            check(f"overlapped grad {name} up to summation order", gerr < 1e-5, f"{gerr:.2e}")
        else:
            check(f"overlapped grad {name} == sequential", torch.equal(p.grad, q.grad))


def transformer():
    torch.manual_seed(1)
    model = Transformer(CFG)
    for p in model.parameters():
        torch.nn.init.normal_(p, 0, 0.05)
    return model


def backward_passes(model, line, n=2):
    """n micro-batches of this rank's tokens, forward and backward; marks when the last backward returned."""
    gen = torch.Generator().manual_seed(10 + dist.get_rank())
    for _ in range(n):
        tokens = torch.randint(0, CFG.vocab_size, (2, 17), generator=gen)
        out = lm_loss(model, tokens)
        ((out["loss"] + 0.3 * out["mtp_loss"]) / n).backward()
    line.mark("backward done")


def logging_collective(module, name, line, label):
    """Replace module.<name> by a wrapper that marks the start of each asynchronous call."""
    original = getattr(module, name)

    def logged(*args, **kwargs):
        if kwargs.get("async_op"):
            line.mark(label)
        return original(*args, **kwargs)

    setattr(module, name, logged)
    return lambda: setattr(module, name, original)


def check_buckets():
    grad_buckets.BUCKET_ELEMENTS = 40_000
    ep = build_layout(ep=2, gpus_per_node=2, n_routed_experts=CFG.n_routed_experts, n_group=CFG.n_group)
    model = transformer()
    par = ExpertParallel(model, ep)
    check("ep buckets", len(par.gradients.buckets.buckets) > 2, f"{len(par.gradients.buckets.buckets)}")
    line = Timeline()
    restore = logging_collective(dist, "all_reduce", line, "bucket")
    par.expect_backwards(2)
    try:
        backward_passes(model, line)
    finally:
        restore()
    par.reduce_gradients()
    early = [t for t in line.all("bucket") if t < line.first("backward done")]
    check("ep: buckets started during backward", len(early) >= 2, f"{line.events}")
    blocking = transformer()
    keep_expert_slice(blocking, ep.ep_rank, ep.ep)
    for moe in blocking.moe_layers():
        moe.dispatcher = par.dispatcher
    backward_passes(blocking, Timeline())
    reduce_gradients(blocking.named_parameters(), ep)
    for (name, p), q in zip(model.named_parameters(), blocking.parameters()):
        check(f"ep bucketed grad {name} == blocking", torch.equal(p.grad, q.grad))

    dp = build_layout(dp=2, n_routed_experts=CFG.n_routed_experts)
    sgd = lambda named: torch.optim.SGD([p for _, p in named], lr=0.1)  # noqa: E731
    shards = {}
    for armed in (True, False):
        model = transformer()
        zero = Zero1(model.named_parameters(), dp, sgd)
        line = Timeline()
        restore = logging_collective(dist, REDUCE_SCATTER, line, "bucket")
        if armed:
            zero.expect_backwards(2)
        try:
            backward_passes(model, line)
            zero.reduce_gradients()
        finally:
            restore()
        early = [t for t in line.all("bucket") if t < line.first("backward done")]
        check(f"zero armed={armed}: buckets started during backward", (len(early) >= 2) == armed, f"{line.events}")
        shards[armed] = [s.grad for s in zero.shards]
    for i, (a, b) in enumerate(zip(shards[True], shards[False])):
        check(f"zero bucketed shard grad {i} == after backward", torch.equal(a, b))


def main():
    dist.init_process_group("gloo")
    check_shared_expert_overlap()
    check_buckets()
    finish_worker(FAILURES, "DIST_OVERLAP_OK")


if __name__ == "__main__":
    main()
