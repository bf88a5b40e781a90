"""`python -m bench.model_vs_hf`: training speed of our model against transformers' DeepseekV3ForCausalLM.

Both models get the same config (`configs/model/tiny.yaml` without MTP, which transformers lacks:
hidden 256, 4 layers, 16 routed experts top-4) and the same weights (ours exported and loaded with
`from_pretrained`). A step is forward + cross-entropy + backward on batch x seq tokens, in train
mode; ours also computes its sequence-wise balance loss, as it does when training. For fp32 and
bf16 (all weights in that dtype), after warm-up, the two models are timed alternately, the order
swapped every round, and the medians are compared. Prints one JSON line per case:
{"bench": "model_vs_hf", "case": "fwd_bwd_fp32", "unit": "tokens/s", "ours": x, "peer": ..., "peer_value": y, "ratio": x/y}.

`--profile` adds, per dtype, where a step's time goes: self CPU time of the ATen ops under
torch.profiler, in ms per step, grouped into GEMMs, the cross-entropy's log-softmax, attention's
softmax, memory movement (copies, casts, fills, indexing, concatenation) and everything else
(elementwise math, reductions, routing), one row per group (ratio = ours / peer: lower is better).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F

from model.hf import export_hf
from model.summary import load_model_config
from model.transformer import Transformer

PEER = "transformers DeepseekV3ForCausalLM"


def build_pair(config: str = "tiny", seed: int = 0):
    """(ours, transformers') fp32 models with identical weights, in train mode, MTP off."""
    from transformers import DeepseekV3ForCausalLM
    cfg, _ = load_model_config(config, ["num_nextn_predict_layers=0"])
    torch.manual_seed(seed)
    ours = Transformer(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(ours, tmp)
        peer = DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    return ours.train(), peer.train()


def step_fn(model: torch.nn.Module, tokens: torch.Tensor, is_peer: bool) -> Callable[[], None]:
    """One forward + cross-entropy + backward on `tokens` (inputs [:, :-1], labels [:, 1:])."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def step() -> None:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=inputs, use_cache=False).logits if is_peer else model(inputs)
        F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()).backward()
    return step


def time_pair(steps: Dict[str, Callable[[], None]], warmup: int, repeats: int) -> Dict[str, float]:
    """Median seconds per step of each callable, timed alternately (order swapped every round)."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


OP_GROUPS = {
    "gemm": ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::_grouped_mm"),
    "cross_entropy_log_softmax": ("aten::_log_softmax", "aten::_log_softmax_backward_data", "aten::nll_loss",
                                  "aten::nll_loss_forward", "aten::nll_loss_backward"),
    "attention_softmax": ("aten::_softmax", "aten::_softmax_backward_data"),
    "memory_movement": ("aten::copy_", "aten::fill_", "aten::zero_", "aten::_to_copy", "aten::clone", "aten::cat",
                        "aten::index", "aten::index_select", "aten::index_put_", "aten::_index_put_impl_",
                        "aten::index_add_", "aten::index_copy_", "aten::scatter_", "aten::scatter_add_",
                        "aten::gather", "aten::stack", "aten::contiguous", "aten::empty", "aten::empty_strided"),
}


def profile_groups(step: Callable[[], None], steps: int) -> Dict[str, float]:
    """Self CPU ms per step of each op group (OP_GROUPS, plus "other") over `steps` profiled steps."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    group_of = {op: group for group, ops in OP_GROUPS.items() for op in ops}
    totals = {group: 0.0 for group in list(OP_GROUPS) + ["other"]}
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            totals[group_of.get(event.key, "other")] += event.self_cpu_time_total / 1e3 / steps
    return totals


def profile_rows(name: str, steps: Dict[str, Callable[[], None]], n_steps: int) -> List[Dict]:
    """One JSON row per op group: ms per step of ours and the peer."""
    ours, peer = profile_groups(steps["ours"], n_steps), profile_groups(steps["peer"], n_steps)
    return [{"bench": "model_vs_hf", "case": f"profile_{name}_{group}", "unit": "ms/step (self CPU)",
             "ours": round(ours[group], 2), "peer": PEER, "peer_value": round(peer[group], 2),
             "ratio": round(ours[group] / peer[group], 3) if peer[group] else None} for group in ours]


def run(dtypes: Sequence[str], batch: int, seq: int, warmup: int, repeats: int, threads: int,
        config: str = "tiny", profile: bool = False) -> List[Dict]:
    torch.set_num_threads(threads)
    ours, peer = build_pair(config)
    tokens = torch.randint(0, ours.cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(1))
    rows = []
    for name in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        ours.to(dtype)
        peer.to(dtype)
        steps = {"ours": step_fn(ours, tokens, False), "peer": step_fn(peer, tokens, True)}
        seconds = time_pair(steps, warmup, repeats)
        n_tokens = batch * seq
        mine, theirs = n_tokens / seconds["ours"], n_tokens / seconds["peer"]
        rows.append({"bench": "model_vs_hf", "case": f"fwd_bwd_{name}", "unit": "tokens/s",
                     "ours": round(mine, 2), "peer": PEER, "peer_value": round(theirs, 2),
                     "ratio": round(mine / theirs, 3)})
        if profile:
            rows.extend(profile_rows(name, steps, repeats))
    return rows


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.model_vs_hf", description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--config", default="tiny", help="model config name under configs/model/")
    parser.add_argument("--profile", action="store_true", help="also print where a step's time goes, by op group")
    args = parser.parse_args(argv)
    dtypes = [d for d in args.dtypes.split(",") if d]
    for d in dtypes:
        if d not in ("fp32", "bf16"):
            parser.error(f"--dtypes: {d!r} is not one of fp32, bf16")
    for row in run(dtypes, args.batch, args.seq, args.warmup, args.repeats, args.threads, args.config, args.profile):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
