"""torchrun worker: pipeline-parallel training of a shrunken `tiny` model against one process.

Every rank builds the same model from one seed; rank 0 also keeps an untouched copy as the
single-process reference and runs the same batches on it (whole batch at once). For each schedule
named on the command line it checks, step by step: the main and MTP losses (within --tol), all
gradients and router loads after the backward, and at the end a forward-only evaluation. Prints
"PIPELINE OK" on rank 0 when everything matched; raises otherwise.

Usage: torchrun --standalone --nproc_per_node=2 tests/dist_pipeline_train.py --schedules 1f1b zbv
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

T_IMPORT = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import ModelConfig  # noqa: E402
from model.transformer import Transformer, lm_loss  # noqa: E402
from parallel.pipeline import Pipeline  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "configs" / "model" / "tiny.yaml"
SHRINK = dict(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
              num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=2, n_routed_experts=8,
              num_experts_per_tok=2, n_group=4, topk_group=2, q_lora_rank=16, kv_lora_rank=16,
              qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_nextn_predict_layers=1)


def tiny_config(**overrides) -> ModelConfig:
    import yaml

    values = yaml.safe_load(TINY.read_text())
    values.update(SHRINK)
    values.update(overrides)
    return ModelConfig.from_dict(values)


def gather_named(tensors: dict) -> dict:
    """Union over the world of {name: tensor} dicts (on every rank)."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, {k: v.detach().clone() for k, v in tensors.items()})
    out = {}
    for part in parts:
        out.update(part)
    return out


def check_close(what: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> float:
    err = float((got.double() - want.double()).abs().max()) if got.numel() else 0.0
    scale = float(want.double().abs().max()) if want.numel() else 0.0
    if err > tol * max(1.0, scale):
        raise AssertionError(f"{what}: max abs diff {err:.3e} (scale {scale:.3e}) exceeds {tol}")
    return err


def run_schedule(schedule: str, args, cfg: ModelConfig) -> None:
    rank = dist.get_rank()
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model = Transformer(cfg)
    reference = copy.deepcopy(model) if rank == 0 else None
    n_mb, mb, S = args.microbatches, args.micro_batch, args.seq_len
    pipe = Pipeline(model, pp_group=dist.group.WORLD, schedule=schedule, n_microbatches=n_mb, micro_batch=mb,
                    seq_len=S, mtp_weight=args.mtp_weight)
    pipe.set_balance_loss_weight(cfg.aux_loss_alpha / n_mb)
    opt = torch.optim.AdamW(pipe.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    if rank == 0:
        reference.set_balance_loss_weight(cfg.aux_loss_alpha)
        ref_opt = torch.optim.AdamW(reference.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed + 1)
    worst = {"loss": 0.0, "grad": 0.0, "load": 0.0}
    for step in range(args.steps):
        tokens = torch.randint(0, cfg.vocab_size, (n_mb * mb, S + 1), generator=gen)
        opt.zero_grad(set_to_none=True)
        out = pipe.step(tokens)
        grads = gather_named({n: p.grad for n, p in pipe.named_parameters() if p.grad is not None})
        load = pipe.expert_load()
        loads = gather_named({f"moe.{i}": row for i, row in zip(pipe.moe_layer_ids(), load)})
        if rank == 0:
            ref_opt.zero_grad(set_to_none=True)
            ref = lm_loss(reference, tokens)
            (ref["loss"] + args.mtp_weight * ref["mtp_loss"]).backward()
            for key in ("loss", "mtp_loss"):
                worst["loss"] = max(worst["loss"], check_close(f"{schedule} step {step} {key}", out[key].detach(),
                                                               ref[key].detach(), args.tol))
            ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
            if set(ref_grads) != set(grads):
                raise AssertionError(f"{schedule}: gradient names differ: {sorted(set(ref_grads) ^ set(grads))[:8]}")
            for name, g in ref_grads.items():
                worst["grad"] = max(worst["grad"], check_close(f"{schedule} step {step} grad {name}", grads[name],
                                                               g, args.grad_tol))
            ref_load = reference.expert_load()
            if len(loads) != ref_load.shape[0]:
                raise AssertionError(f"{schedule}: {len(loads)} MoE layers report load, model has {ref_load.shape[0]}")
            for i in range(ref_load.shape[0]):
                worst["load"] = max(worst["load"], check_close(f"{schedule} load {i}", loads[f"moe.{i}"],
                                                               ref_load[i], 0.0))
            ref_opt.step()
            reference.update_router_bias(1e-3)
        opt.step()
        pipe.update_router_bias(1e-3)
    tokens = torch.randint(0, cfg.vocab_size, (n_mb * mb, S + 1), generator=gen)
    out = pipe.evaluate(tokens)
    if rank == 0:
        reference.eval()
        with torch.no_grad():
            ref = lm_loss(reference, tokens)
        for key in ("loss", "mtp_loss"):
            check_close(f"{schedule} eval {key}", out[key], ref[key], args.tol)
        print(f"{schedule}: steps={args.steps} max |dloss|={worst['loss']:.2e} max |dgrad|={worst['grad']:.2e} "
              f"layout={pipe.layout} ({time.perf_counter() - start:.1f} s)", flush=True)
    dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--schedules", nargs="+", default=["1f1b", "interleaved_1f1b", "zbv", "dualpipev"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--micro-batch", dest="micro_batch", type=int, default=2)
    parser.add_argument("--seq-len", dest="seq_len", type=int, default=12)
    parser.add_argument("--mtp-weight", dest="mtp_weight", type=float, default=0.3)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--grad-tol", dest="grad_tol", type=float, default=1e-5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    dist.init_process_group("gloo")
    if dist.get_rank() == 0:
        print(f"init {t0 - T_IMPORT:.1f}+{time.perf_counter() - t0:.1f} s", flush=True)
    try:
        cfg = tiny_config()
        for schedule in args.schedules:
            run_schedule(schedule, args, cfg)
        if dist.get_rank() == 0:
            print("PIPELINE OK", flush=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
