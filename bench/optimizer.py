"""Optimizer step on the host: DeepSpeed's CPU Adam against torch's AdamW, and the GPU bytes offload saves.

`optim.offload=cpu` (training/cpu_adam.py, parallel/data_parallel.py) keeps each rank's ZeRO-1 shard
(fp32 master weights and moments, DeepSeek-V3 section 3.3.2's optimizer state) in host memory and
steps it with `DeepSpeedCPUAdam`. `python -m bench.optimizer` prints JSON lines, for each case:

- `<case>/step`: seconds per AdamW step of one rank's shard (fp32 weights, gradients and moments on
  the CPU, the same tensors and hyper-parameters), `CPUAdamW` (DeepSpeed's kernel) against
  `torch.optim.AdamW` (its default single-tensor path) and `torch.optim.AdamW(fused=True)`; median
  of `--steps` steps after one warm-up step, both at torch's thread count;
- `<case>/gpu_gib_saved`: GiB of GPU memory per rank that offload frees (master weights and moments
  of the shard, `parallel.data_parallel.state_bytes_per_element`), against the GPU optimizer state
  without offload, and the host memory the shard needs.

Cases: `small` trained with ZeRO-1 over one 8-GPU node (a 1/8 shard of the model), and `v2_lite` on
one 8-GPU node (ep=8, ZeRO-1: a 1/8 shard, about 2 billion elements, 32 GB of host state). The
v2_lite shard does not fit in a shared 24 GiB machine, so it is measured on a `--v2-lite-slice`
(default 1/16) of the shard and the time is scaled by the inverse (the step is linear in the
elements); the JSON line says so. Timings on a shared CPU are noisy: the two optimizers alternate.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from typing import Callable, List

import torch
from torch import nn

from model.flops import param_counts
from model.summary import load_model_config
from parallel.data_parallel import state_bytes_per_element

GIB = 2 ** 30
HYPER = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
CHUNK = 1 << 22  # elements per tensor of the synthetic shard (a 1024 x 4096 weight)


def shard_tensors(elements: int) -> List[nn.Parameter]:
    """fp32 CPU parameters summing to `elements`, each with a random gradient."""
    out = []
    gen = torch.Generator().manual_seed(0)
    while elements > 0:
        n = min(CHUNK, elements)
        p = nn.Parameter(torch.randn(n, generator=gen) * 0.02)
        p.grad = torch.randn(n, generator=gen) * 1e-3
        out.append(p)
        elements -= n
    return out


def time_steps(make: Callable, elements: int, steps: int) -> float:
    """Median seconds of `steps` steps (after one warm-up) of the optimizer `make(params)` builds."""
    params = shard_tensors(elements)
    opt = make(params)
    opt.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    del opt, params
    gc.collect()
    return statistics.median(times)


def cpu_adamw(params):
    from training.cpu_adam import CPUAdamW

    return CPUAdamW([(f"w{i}.weight", p) for i, p in enumerate(params)], **HYPER)


def emit(case: str, unit: str, ours: float, peer: str, peer_value: float, **extra) -> None:
    print(json.dumps({"bench": "optimizer", "case": case, "unit": unit, "ours": round(ours, 4), "peer": peer,
                      "peer_value": round(peer_value, 4), "ratio": round(ours / peer_value, 4) if peer_value else None,
                      **extra}), flush=True)


def run_case(name: str, model: str, ranks: int, slice_: int, steps: int) -> None:
    cfg, _ = load_model_config(model)
    shard = -(-param_counts(cfg)["total_params"] // ranks)
    measured = shard // slice_
    note = {"shard_elements": shard, "measured_elements": measured, "threads": torch.get_num_threads()}
    if slice_ > 1:
        note["scaled"] = f"measured on 1/{slice_} of the shard, times x{slice_}"
    ours, torch_loop, torch_fused = [], [], []
    for _ in range(2):  # alternate, so that a load change on a shared machine hits both
        ours.append(time_steps(cpu_adamw, measured, steps))
        torch_loop.append(time_steps(lambda ps: torch.optim.AdamW(ps, **HYPER), measured, steps))
        torch_fused.append(time_steps(lambda ps: torch.optim.AdamW(ps, fused=True, **HYPER), measured, steps))
    ds = min(ours) * slice_
    emit(f"{name}/step", "s", ds, "torch.optim.AdamW", min(torch_loop) * slice_, **note)
    emit(f"{name}/step_vs_fused", "s", ds, "torch.optim.AdamW(fused=True)", min(torch_fused) * slice_, **note)
    for param_dtype in ("bf16", "fp32"):
        without = state_bytes_per_element(param_dtype, "bf16", offload=False)
        offloaded = state_bytes_per_element(param_dtype, "fp32", offload=True)
        saved = (without["device"] - offloaded["device"]) * shard / GIB
        emit(f"{name}/gpu_gib_saved/params_{param_dtype}", "GiB", saved, "GPU optimizer state without offload "
             "(bf16 moments)", without["device"] * shard / GIB, host_gib=offloaded["host"] * shard / GIB,
             shard_elements=shard)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ranks", type=int, default=8, help="ZeRO-1 ranks the model's state is split over")
    ap.add_argument("--small-slice", type=int, default=1, help="measure 1/N of the small shard")
    ap.add_argument("--v2-lite-slice", type=int, default=16, help="measure 1/N of the v2_lite shard")
    args = ap.parse_args(argv)
    run_case("small", "small", args.ranks, args.small_slice, args.steps)
    run_case("v2_lite", "v2_lite", args.ranks, args.v2_lite_slice, args.steps)


if __name__ == "__main__":
    main()
