"""Expert dispatch at world size 1 for scripts/gpu_check.py: run under `torchrun --nproc_per_node=1`.

A process group (NCCL on GPU, gloo on CPU) of one rank drives the flat and the hierarchical expert
dispatcher at ep = 1: every all-to-all sends to the rank itself. Loss and gradients of one step must
equal the single-process MoE (the local dispatcher) up to the summation order (fp32) or to the wire
format (bf16 rows; FP8 rows with their scales), and no byte may be counted as sent to another rank.
Prints one JSON line per (precision, dispatcher).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import ModelConfig  # noqa: E402
from model.transformer import Transformer, lm_loss  # noqa: E402
from parallel.expert_parallel import ExpertParallel  # noqa: E402
from parallel.mesh import build_layout  # noqa: E402
from training.distributed import init_distributed  # noqa: E402

CFG = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
                  num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, n_routed_experts=8,
                  num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=64, kv_lora_rank=64,
                  qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32, num_nextn_predict_layers=1)
# (loss, gradient) relative tolerances. FP8 rows are quantized for the wire and again as the experts'
# input, so the tiny model's expert gradients differ by ~10% from the single-quantized local path.
TOLERANCE = {"fp32": (1e-5, 1e-5), "bf16": (1e-2, 2e-2), "fp8": (1e-2, 0.25)}


def one_step(model: Transformer, tokens: torch.Tensor, precision: str):
    """(loss, {name: grad}) of one forward/backward under the precision's autocast."""
    autocast = (contextlib.nullcontext() if precision == "fp32"
                else torch.autocast(tokens.device.type, dtype=torch.bfloat16))
    with autocast:
        out = lm_loss(model, tokens)
        total = out["loss"] + 0.3 * out["mtp_loss"]
    total.backward()
    return float(total.detach()), {n: p.grad.detach().double() for n, p in model.named_parameters() if p.grad is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), required=True)
    args = parser.parse_args()
    d = init_distributed(args.device, timeout_s=120)
    if not dist.is_initialized() or dist.get_world_size() != 1:
        raise SystemExit("run under torchrun --nproc_per_node=1")
    backend = dist.get_backend()
    torch.manual_seed(0)
    base = Transformer(CFG).to(d.device)
    tokens = torch.randint(0, CFG.vocab_size, (4, 65), device=d.device)
    for precision in ("fp32", "bf16", "fp8"):
        reference = copy.deepcopy(base)
        if precision == "fp8":
            from model.fp8 import apply_fp8
            apply_fp8(reference)
        ref_loss, ref_grads = one_step(copy.deepcopy(reference), tokens, precision)
        for name in ("flat", "hierarchical"):
            model = copy.deepcopy(reference)
            layout = build_layout(ep=1, gpus_per_node=1, dispatcher=name, n_routed_experts=CFG.n_routed_experts,
                                  n_group=CFG.n_group, device_type=d.device.type)
            ep = ExpertParallel(model, layout, fp8=precision == "fp8")
            loss, grads = one_step(model, tokens, precision)
            diffs = {n: float((grads[n] - g).norm() / g.norm().clamp_min(1e-30)) for n, g in ref_grads.items()}
            worst = max(diffs.values())
            sent = ep.dispatcher.a2a_internode_bytes + ep.dispatcher.a2a_intranode_bytes
            loss_rel = abs(loss - ref_loss) / abs(ref_loss)
            loss_tol, grad_tol = TOLERANCE[precision]
            ok = set(grads) == set(ref_grads) and loss_rel <= loss_tol and worst <= grad_tol and sent == 0
            print(json.dumps({"check": "dispatch", "ok": ok, "dispatcher": name, "precision": precision,
                              "backend": backend, "world_size": 1, "loss_rel_diff": loss_rel,
                              "grad_max_rel_diff": worst, "worst_param": max(diffs, key=diffs.get),
                              "bytes_to_other_ranks": sent, "tolerance": [loss_tol, grad_tol]}), flush=True)
    d.shutdown()


if __name__ == "__main__":
    main()
