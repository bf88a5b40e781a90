"""Expert-parallel dispatch traffic: flat vs hierarchical all-to-all, BF16 vs FP8 payload.

DeepSeek-V3 section 3.2.2: with node-limited routing a token crosses the inter-node network once per
target node (at most M), then fans out inside the node. `python -m bench.dispatch` spawns `--ep`
gloo processes on this machine (nodes of `--gpus-per-node` ranks are simulated: bytes between ranks
of different nodes count as inter-node), routes random tokens with the model's Router (groups = nodes,
`--topk-groups` kept), and prints one JSON line per case (bytes summed over all ranks, one forward):

- hierarchical / flat inter-node dispatch bytes against the minimum (one hidden row per token per
  target node other than its own, plus its scales in FP8), and hierarchical against flat;
- FP8 payload against BF16; inter-node combine bytes against their minimum; intra-node bytes;
- routing metadata (expert ids, gate weights, counts) next to the payload, nodes reached per token;
- milliseconds per forward+backward (CPU/gloo, indicative only).
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.config import ModelConfig
from model.moe import GroupedExperts, Router
from parallel.comm import fp8_row_bytes
from parallel.dispatch import internode_minimum_bytes, make_dispatcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _routing(args, rank: int):
    cfg = ModelConfig(hidden_size=args.dim, n_routed_experts=args.experts, num_experts_per_tok=args.topk,
                      n_group=args.ep // args.gpus_per_node, topk_group=args.topk_groups, vocab_size=32,
                      intermediate_size=32, moe_intermediate_size=args.inter, num_hidden_layers=1,
                      first_k_dense_replace=0, num_attention_heads=1)
    torch.manual_seed(0)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, 0.0, 0.02)
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(args.tokens, args.dim, generator=gen).to(torch.bfloat16)
    idx, weight, _ = router(x)
    return x, idx, weight.detach()


def _measure(args, rank: int, name: str, fp8: bool, x, idx, weight, experts) -> Dict[str, float]:
    disp = make_dispatcher(name, None, args.gpus_per_node, fp8=fp8)
    times = []
    for i in range(args.warmup + args.iters):
        disp.reset_traffic()
        xi = x.clone().requires_grad_()
        t0 = time.perf_counter()
        disp(xi, idx, weight, experts).float().sum().backward()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    nodes = disp.last_nodes_per_token.float()
    stats = torch.tensor([disp.traffic.get(k) for k in (
        "dispatch_internode", "dispatch_intranode", "combine_internode", "meta_internode")] +
        [float(nodes.sum()), float(nodes.max()), float(nodes.numel())], dtype=torch.float64)
    dist.all_reduce(stats[:5])
    dist.all_reduce(stats[5:6], op=dist.ReduceOp.MAX)
    dist.all_reduce(stats[6:])
    keys = ["dispatch_internode", "dispatch_intranode", "combine_internode", "meta_internode",
            "nodes_sum", "nodes_max", "tokens"]
    out = dict(zip(keys, stats.tolist()))
    out["ms"] = 1000 * statistics.median(times[args.warmup:])
    return out


def _worker(rank: int, args, port: int, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.ep)
    x, idx, weight = _routing(args, rank)
    experts = GroupedExperts(args.experts // args.ep, args.dim, args.inter).to(torch.bfloat16)
    torch.nn.init.normal_(experts.gate_up_proj, 0.0, 0.02)
    torch.nn.init.normal_(experts.down_proj, 0.0, 0.02)
    results = {(n, f): _measure(args, rank, n, f, x, idx, weight, experts)
               for n in ("flat", "hierarchical") for f in (False, True)}
    experts_per_node = args.experts // (args.ep // args.gpus_per_node)
    my_node = rank // args.gpus_per_node
    minimum = torch.tensor([internode_minimum_bytes(idx, experts_per_node, my_node, row) for row in
                            (2 * args.dim, fp8_row_bytes(args.dim))], dtype=torch.float64)
    dist.all_reduce(minimum)
    if rank == 0:
        queue.put((results, minimum.tolist()))
    dist.barrier()
    dist.destroy_process_group()


def _line(case: str, unit: str, ours: float, peer: str, peer_value: float) -> str:
    return json.dumps({"bench": "dispatch", "case": case, "unit": unit, "ours": ours, "peer": peer,
                       "peer_value": peer_value, "ratio": ours / peer_value if peer_value else None})


def report(args, results, minimum) -> List[str]:
    """The JSON lines of the benchmark from the measured totals."""
    shape = (f"ep={args.ep} ({args.ep // args.gpus_per_node} nodes x {args.gpus_per_node}), E={args.experts}, "
             f"top-{args.topk}, {args.topk_groups} of {args.ep // args.gpus_per_node} nodes, "
             f"D={args.dim}, {args.tokens} tokens/rank")
    h16, h8 = results["hierarchical", False], results["hierarchical", True]
    f16, f8 = results["flat", False], results["flat", True]
    min16, min8 = minimum
    return [
        _line(f"hierarchical bf16 inter-node dispatch bytes, {shape}", "bytes", h16["dispatch_internode"],
              "minimum (one row per token per remote target node)", min16),
        _line(f"hierarchical fp8 inter-node dispatch bytes, {shape}", "bytes", h8["dispatch_internode"],
              "minimum (one fp8 row + scales per token per remote target node)", min8),
        _line(f"flat bf16 inter-node dispatch bytes, {shape}", "bytes", f16["dispatch_internode"],
              "minimum (one row per token per remote target node)", min16),
        _line(f"hierarchical vs flat inter-node dispatch bytes bf16, {shape}", "bytes",
              h16["dispatch_internode"], "flat all-to-all", f16["dispatch_internode"]),
        _line(f"hierarchical vs flat inter-node dispatch bytes fp8, {shape}", "bytes",
              h8["dispatch_internode"], "flat all-to-all", f8["dispatch_internode"]),
        _line(f"fp8 vs bf16 inter-node dispatch payload (hierarchical), {shape}", "bytes",
              h8["dispatch_internode"], "bf16 payload", h16["dispatch_internode"]),
        _line(f"hierarchical bf16 inter-node combine bytes, {shape}", "bytes", h16["combine_internode"],
              "minimum (one row per token per remote target node)", min16),
        _line(f"intra-node dispatch bytes bf16, {shape}", "bytes", h16["dispatch_intranode"],
              "flat all-to-all", f16["dispatch_intranode"]),
        _line(f"inter-node routing metadata, hierarchical, {shape}", "bytes", h16["meta_internode"],
              "bf16 inter-node dispatch payload", h16["dispatch_internode"]),
        _line(f"nodes reached per token (mean), {shape}", "nodes", h16["nodes_sum"] / h16["tokens"],
              "topk_group bound", args.topk_groups),
        _line(f"nodes reached per token (max), {shape}", "nodes", h16["nodes_max"], "topk_group bound",
              args.topk_groups),
        _line(f"forward+backward time bf16 (CPU gloo, simulated nodes), {shape}", "ms", h16["ms"],
              "flat all-to-all", f16["ms"]),
        _line(f"forward+backward time fp8 payload (CPU gloo, simulated nodes), {shape}", "ms", h8["ms"],
              "flat all-to-all", f8["ms"]),
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ep", type=int, default=8)
    parser.add_argument("--gpus-per-node", type=int, default=2)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--topk-groups", type=int, default=2)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args(argv)
    if args.ep % args.gpus_per_node or args.experts % args.ep:
        parser.error("--ep must be a multiple of --gpus-per-node and --experts a multiple of --ep")
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(args, _free_port(), queue), nprocs=args.ep, join=True)
    results, minimum = queue.get()
    for line in report(args, results, minimum):
        print(line, flush=True)


if __name__ == "__main__":
    main()
