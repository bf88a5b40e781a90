"""torchrun worker (4 ranks, gloo): flat and hierarchical dispatch against the single-process
LocalDispatcher on the full experts. Launched by tests/test_parallel_dispatch.py.

Every rank rebuilds the whole problem (all ranks' tokens, all experts) from a fixed seed, computes
the single-process reference on the tokens of its EP group, and compares its own slice of the
outputs and gradients (x, gate weights, its experts' weights). Layouts: ep=4 on 2 simulated nodes
(gpus_per_node=2), and dp=2 x ep=2 with one rank per node and with both ranks on one node. Rank 1
sends no token; the "skewed" routing leaves the last EP rank's experts and expert 1 without tokens.
Also checked: FP8 payload (exactly the 1x128-quantized input, close to fp32), bf16 autocast (rows
travel as bf16), inter-node bytes equal to the minimum and intra-node bytes as the protocol says
(stage 1 lands on the same local index), nodes reached per token on the actual traffic, at most one host
synchronization per layer over forward and backward (tests/test_fp8_host_syncs.py counts them), also
for FP8 experts on the Triton path. FP8 experts read the FP8 payload as it arrives: the hidden rows are
quantized once (at the source) and the result equals one process's FP8 experts on the same tokens.
Prints DIST_DISPATCH_OK when all pass.
"""
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from dist_launch import finish_worker  # noqa: E402
from test_fp8_host_syncs import SyncCounter  # noqa: E402

from kernels import ops  # noqa: E402
from kernels.triton.launch import recording  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.fp8 import apply_fp8  # noqa: E402
from model.moe import GroupedExperts, LocalDispatcher, Router  # noqa: E402
from parallel import comm  # noqa: E402
from parallel.dispatch import make_dispatcher  # noqa: E402
from parallel.mesh import build_layout  # noqa: E402

D, I, E, K = 256, 32, 16, 4
TOKENS_PER_RANK = [5, 0, 7, 3]
FAILURES = []


def check(name, ok, detail=""):
    if not ok:
        FAILURES.append(f"rank {dist.get_rank()}: {name} {detail}")


def close(name, got, want, rtol=1e-5, atol=1e-5):
    try:
        torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)
    except AssertionError as e:
        FAILURES.append(f"rank {dist.get_rank()}: {name}: {str(e)[:300]}")


def close_norm(name, got, want, rel=1e-2):
    """bf16 paths sum in different orders: compare by relative error of the whole tensor."""
    err = (got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)
    if not err <= rel:
        FAILURES.append(f"rank {dist.get_rank()}: {name}: relative norm error {float(err):.3g} > {rel}")


def fake_fp8(x):
    """Independent 1x128 e4m3 quantize-dequantize, gradient straight through."""
    R, Dx = x.shape
    tiles = x.detach().float().view(R, Dx // 128, 128)
    scale = tiles.abs().amax(-1, keepdim=True).clamp_min(1e-4) / 448.0
    q = ((tiles / scale).to(torch.float8_e4m3fn).float() * scale).view(R, Dx).to(x.dtype)
    return x + (q - x).detach()


def routing(kind, T, gen, n_nodes, banned):
    scores = torch.rand(T, E, generator=gen)
    if kind == "router":
        cfg = ModelConfig(hidden_size=D, n_routed_experts=E, num_experts_per_tok=K, n_group=n_nodes,
                          topk_group=1, vocab_size=32, intermediate_size=32, moe_intermediate_size=I,
                          num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2)
        return Router(cfg).select(scores)
    if kind == "skewed":
        scores[:, banned] = -1.0
    return scores.topk(K, dim=-1).indices


def run_case(layout, dispatcher_name, kind, fp8, dtype, seed, amp=False):
    """amp: fp32 tensors under bf16 autocast (rows travel as bf16, the experts compute in bf16)."""
    ep_ranks = dist.get_process_group_ranks(layout.ep_group)
    counts = [TOKENS_PER_RANK[r] for r in ep_ranks]
    gen = torch.Generator().manual_seed(seed)
    T = sum(counts)
    per_rank, n_nodes = E // layout.ep, layout.ep_nodes
    banned = list(range(E - per_rank, E)) + [1]
    x = torch.randn(T, D, generator=gen).to(dtype)
    idx = routing(kind, T, gen, n_nodes, banned)
    w = torch.rand(T, K, generator=gen) + 0.1
    gy = torch.randn(T, D, generator=gen).to(dtype)
    full = GroupedExperts(E, D, I)
    with torch.no_grad():
        full.gate_up_proj.normal_(0, 0.05, generator=gen)
        full.down_proj.normal_(0, 0.05, generator=gen)
    full = full.to(dtype)

    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    xin = fake_fp8(xr) if fp8 else (xr + (xr.bfloat16().float() - xr).detach() if amp else xr)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        ref = LocalDispatcher()(xin, idx, wr, full)
    (ref.float() * gy.float()).sum().backward()

    lo = sum(counts[: layout.ep_rank])
    hi = lo + counts[layout.ep_rank]
    rows = slice(layout.ep_rank * per_rank, (layout.ep_rank + 1) * per_rank)
    local = GroupedExperts(per_rank, D, I).to(dtype)
    with torch.no_grad():
        local.gate_up_proj.copy_(full.gate_up_proj[rows])
        local.down_proj.copy_(full.down_proj[rows])
    disp = make_dispatcher(dispatcher_name, layout.ep_group, layout.gpus_per_node, fp8=fp8)
    xm, wm = x[lo:hi].clone().requires_grad_(), w[lo:hi].clone().requires_grad_()
    syncs = SyncCounter()
    with syncs:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = disp(xm, idx[lo:hi], wm, local)
        (out.float() * gy[lo:hi].float()).sum().backward()

    tag = f"{dispatcher_name} ep={layout.ep} gpn={layout.gpus_per_node} {kind} fp8={fp8} {dtype} amp={amp}"
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 and not amp else dict(rtol=3e-2, atol=2e-2)
    check(f"{tag} dtype", out.dtype == dtype and out.shape == (hi - lo, D))
    check(f"{tag} host syncs", sum(syncs.calls.values()) <= 1, f"{dict(syncs.calls)}")
    close(f"{tag} output", out, ref.detach()[lo:hi], **tol)
    close(f"{tag} grad x", xm.grad, xr.grad[lo:hi], **tol)
    close(f"{tag} grad w", wm.grad, wr.grad[lo:hi], **tol)
    compare_weights = close_norm if amp else partial(close, **tol)
    compare_weights(f"{tag} grad gate_up", local.gate_up_proj.grad, full.gate_up_proj.grad[rows])
    compare_weights(f"{tag} grad down", local.down_proj.grad, full.down_proj.grad[rows])

    internode, combine_internode = disp.traffic.get("dispatch_internode"), disp.traffic.get("combine_internode")
    intranode = disp.traffic.get("dispatch_intranode")
    one_call = disp.a2a_internode_bytes
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        again = disp(xm, idx[lo:hi], wm, local)
    close(f"{tag} no_grad output", again, out.detach(), rtol=0, atol=0)
    check(f"{tag} counters accumulate", disp.a2a_internode_bytes == 2 * one_call == 2 * (internode + combine_internode))

    my_node = layout.node_of(layout.ep_rank)
    experts_per_node = E // n_nodes
    node_TK = idx[lo:hi] // experts_per_node
    hit_TN = torch.zeros(hi - lo, n_nodes, dtype=torch.bool).scatter_(1, node_TK, True)
    check(f"{tag} nodes per token", torch.equal(disp.last_nodes_per_token, hit_TN.sum(1)),
          f"{disp.last_nodes_per_token} vs {hit_TN.sum(1)}")
    if kind == "router":
        check(f"{tag} node limit", max(disp.last_nodes_per_token.tolist(), default=0) <= 1)
    remote_nodes = int(hit_TN.sum()) - int(hit_TN[:, my_node].sum())
    wire_bytes = 2 if amp else x.element_size()
    row = (256 + 8) if fp8 else D * wire_bytes
    rank_TK = idx[lo:hi] // per_rank
    hit_TR = torch.zeros(hi - lo, layout.ep, dtype=torch.bool).scatter_(1, rank_TK, True)
    other_node = torch.tensor([layout.node_of(r) != my_node for r in range(layout.ep)])
    flat_copies = int(hit_TR[:, other_node].sum())
    if dispatcher_name == "hierarchical":
        check(f"{tag} internode bytes == minimum", internode == remote_nodes * row, f"{internode} vs {remote_nodes * row}")
    else:
        check(f"{tag} flat internode bytes", internode == flat_copies * row, f"{internode} vs {flat_copies * row}")
    G = layout.ranks_per_ep_node
    same_local = torch.tensor([r % G == layout.ep_rank % G for r in range(layout.ep)])
    if dispatcher_name == "hierarchical":  # stage 2 forwards from the same-local-index rank of each node
        intra_rows = int(hit_TR[:, ~same_local].sum())
    else:
        intra_rows = int(hit_TR[:, ~other_node].sum()) - int(hit_TR[:, layout.ep_rank].sum())
    intra = torch.tensor([intranode, intra_rows * row], dtype=torch.float64)
    dist.all_reduce(intra, group=layout.ep_group)
    check(f"{tag} intranode bytes (EP group total)", intra[0] == intra[1], f"{intra.tolist()}")
    sent_back = remote_nodes if dispatcher_name == "hierarchical" else flat_copies
    combine = torch.tensor([combine_internode, sent_back * D * wire_bytes], dtype=torch.float64)
    dist.all_reduce(combine, group=layout.ep_group)
    check(f"{tag} combine internode bytes (EP group total)", combine[0] == combine[1], f"{combine.tolist()}")
    disp.reset_traffic()
    check(f"{tag} reset", disp.a2a_internode_bytes == 0 and disp.a2a_intranode_bytes == 0)
    return internode, flat_copies * row, remote_nodes * row


def run_fp8_experts_case(layout, dispatcher_name, seed):
    """FP8 experts behind an FP8 dispatch: against one process's FP8 experts on the EP group's tokens
    (same quantization of the same rows, so only the order of the fp32 sums differs), with the input
    rows quantized once in forward; then the host synchronizations of the Triton path."""
    ep_ranks = dist.get_process_group_ranks(layout.ep_group)
    counts = [TOKENS_PER_RANK[r] + 3 for r in ep_ranks]
    gen = torch.Generator().manual_seed(seed)
    T, per_rank = sum(counts), E // layout.ep
    x = torch.randn(T, D, generator=gen)
    idx = torch.rand(T, E, generator=gen).topk(K, dim=-1).indices
    w = torch.rand(T, K, generator=gen) + 0.1
    gy = torch.randn(T, D, generator=gen)
    full = GroupedExperts(E, D, I)
    with torch.no_grad():
        full.gate_up_proj.normal_(0, 0.05, generator=gen)
        full.down_proj.normal_(0, 0.05, generator=gen)
    lo = sum(counts[: layout.ep_rank])
    hi = lo + counts[layout.ep_rank]
    rows = slice(layout.ep_rank * per_rank, (layout.ep_rank + 1) * per_rank)
    local = GroupedExperts(per_rank, D, I)
    with torch.no_grad():
        local.gate_up_proj.copy_(full.gate_up_proj[rows])
        local.down_proj.copy_(full.down_proj[rows])
    full, local = apply_fp8(full), apply_fp8(local)
    xr = x.clone().requires_grad_()
    ref = LocalDispatcher()(xr, idx, w, full)
    (ref * gy).sum().backward()

    disp = make_dispatcher(dispatcher_name, layout.ep_group, layout.gpus_per_node, fp8=True)
    xm = x[lo:hi].clone().requires_grad_()
    quantized = []
    quantize = ops.quantize_1x128

    def counting(t, pow2=False):
        quantized.append(tuple(t.shape))
        return quantize(t, pow2)

    ops.quantize_1x128 = comm.quantize_1x128 = counting
    try:
        out = disp(xm, idx[lo:hi], w[lo:hi], local)
    finally:
        ops.quantize_1x128 = comm.quantize_1x128 = quantize
    (out * gy[lo:hi]).sum().backward()
    tag = f"fp8 experts {dispatcher_name} ep={layout.ep} gpn={layout.gpus_per_node}"
    check(f"{tag} input quantized once", [s for s in quantized if s[-1] == D] == [(hi - lo, D)], f"{quantized}")
    close(f"{tag} output", out, ref.detach()[lo:hi], rtol=1e-5, atol=1e-6)
    close(f"{tag} grad x", xm.grad, xr.grad[lo:hi], rtol=1e-5, atol=1e-6)
    close(f"{tag} grad gate_up", local.gate_up_proj.grad, full.gate_up_proj.grad[rows], rtol=1e-5, atol=1e-6)

    syncs = SyncCounter()
    xm = x[lo:hi].clone().requires_grad_()
    with ops.use_backend("triton"), recording() as launches, syncs:
        out = disp(xm, idx[lo:hi], w[lo:hi], local)
        out.float().sum().backward()
    check(f"{tag} triton launches recorded", len(launches) > 0)
    check(f"{tag} host syncs (Triton path)", sum(syncs.calls.values()) <= 1, f"{dict(syncs.calls)}")


def main():
    dist.init_process_group("gloo")
    layouts = [build_layout(ep=4, gpus_per_node=2, n_routed_experts=E, n_group=2),
               build_layout(dp=2, ep=2, gpus_per_node=1, n_routed_experts=E, n_group=2),
               build_layout(dp=2, ep=2, gpus_per_node=2, n_routed_experts=E)]
    check("ep=4 gpn=2 default dispatcher", layouts[0].dispatcher == "hierarchical" and layouts[0].ep_nodes == 2)
    check("ep=2 gpn=2 default dispatcher", layouts[2].dispatcher == "flat" and layouts[2].ep_nodes == 1)
    seed = 0
    for layout in layouts:
        for kind in ("uniform", "skewed", "router"):
            seed += 1
            bytes_seen = {}
            for name in ("flat", "hierarchical"):
                for fp8 in (False, True):
                    bytes_seen[name, fp8] = run_case(layout, name, kind, fp8, torch.float32, seed)
            for fp8 in (False, True):
                hier, flat = bytes_seen["hierarchical", fp8][0], bytes_seen["flat", fp8][0]
                check(f"hier <= flat ep={layout.ep} {kind} fp8={fp8}", hier <= flat, f"{hier} > {flat}")
    for i, name in enumerate(("flat", "hierarchical")):
        run_fp8_experts_case(layouts[0], name, 200 + i)
    bf16 = {fp8: run_case(layouts[0], "hierarchical", "uniform", fp8, torch.bfloat16, 99) for fp8 in (False, True)}
    for name in ("flat", "hierarchical"):
        run_case(layouts[0], name, "skewed", False, torch.float32, 98, amp=True)
    total = torch.tensor([bf16[False][0], bf16[True][0]], dtype=torch.float64)
    dist.all_reduce(total)
    check("fp8 payload <= 0.55 x bf16", total[0] > 0 and total[1] <= 0.55 * total[0], f"{total.tolist()}")

    finish_worker(FAILURES, "DIST_DISPATCH_OK")


if __name__ == "__main__":
    main()
