"""torchrun worker: pipeline / expert / ZeRO-1 data parallel training of a shrunken `tiny` model
against one process.

Every rank builds the same model from one seed; rank 0 also keeps an untouched copy as the
single-process reference and runs the same global batches on it (gradient accumulation over
micro-batches of the same size, in order, as train.py does on one process; AdamW from
training/optim.py). The parallel run splits each global batch over the dp x ep replicas and, with
--pp > 1, over micro-batches of a pipeline schedule (parallel/pipeline.py); gradients are reduced
by `parallel.expert_parallel.reduce_gradients` or, with --zero, by ZeRO-1 (parallel/data_parallel.py).
Each positional argument is one case (layout, schedule, ...: see CASE_KEYS; exact=1 sets every
tolerance to 0), all run in one launch.
Checked for every case, step by step: main and MTP losses (within --tol), every gradient element
(relative to the tensor's scale: within --grad-tol at the first step, within --later-grad-tol
afterwards, where AdamW's normalized first updates amplify round-off differences of near-zero
gradients into parameter differences of ~lr), the global router load (exactly), and at the end a
forward-only evaluation (whole batch, within 1e-5). Pipeline-only runs give bitwise the same
numbers as one process (tolerances 0 work). With --zero also: each rank's optimizer state
bytes (1/N of its replica group's state) and a torch.distributed.checkpoint of the sharded state that
one process loads into the unsharded optimizer and finds equal to the reference optimizer's state.
Prints "PARALLEL OK" on rank 0 when everything matched; raises otherwise.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import ModelConfig  # noqa: E402
from model.transformer import Transformer, lm_loss  # noqa: E402
from parallel.data_parallel import Zero1  # noqa: E402
from parallel.shard_group import chunk_range  # noqa: E402
from parallel.dispatch import make_dispatcher  # noqa: E402
from parallel.expert_parallel import apply_expert_parallel, is_expert_param, reduce_gradients  # noqa: E402
from parallel.mesh import build_layout  # noqa: E402
from parallel.pipeline import Pipeline  # noqa: E402
from training.optim import AdamW  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "configs" / "model" / "tiny.yaml"
SHRINK = dict(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
              num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=2, n_routed_experts=8,
              num_experts_per_tok=2, n_group=4, topk_group=2, q_lora_rank=16, kv_lora_rank=16,
              qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_nextn_predict_layers=1)
GAMMA = 1e-3


def tiny_config(**overrides) -> ModelConfig:
    import yaml

    values = yaml.safe_load(TINY.read_text())
    values.update(SHRINK, **overrides)
    return ModelConfig.from_dict(values)


def make_adamw(named, lr):
    return AdamW(named, lr=lr, betas=(0.9, 0.95), weight_decay=0.1, moments_dtype="fp32")


class Pieces:
    """Pieces of global tensors held by ranks: (name, start offset per dim, tensor), assembled on rank 0."""

    def __init__(self):
        self.items = []

    def add(self, name, tensor, offsets=None):
        self.items.append((name, list(offsets or [0] * tensor.dim()), tensor.detach().clone()))

    def gather(self):
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self.items)
        return [item for part in parts for item in part]


def compare_pieces(what, items, reference: dict, tol: float) -> float:
    """Every element of every reference tensor must be covered and match within tol x scale."""
    covered = {n: torch.zeros_like(t, dtype=torch.bool) for n, t in reference.items()}
    worst = 0.0
    for name, offsets, piece in items:
        if name not in reference:
            raise AssertionError(f"{what}: {name} is not a parameter of the single-process model")
        want = reference[name]
        for dim, (start, size) in enumerate(zip(offsets, piece.shape)):
            want = want.narrow(dim, start, size)
        err = float((piece.double() - want.double()).abs().max()) if piece.numel() else 0.0
        scale = max(1e-3, float(reference[name].double().abs().max()))
        if err > tol * scale:
            raise AssertionError(f"{what} {name}: max abs diff {err:.3e} > {tol} x scale {scale:.3e}")
        worst = max(worst, err / scale)
        region = covered[name]
        for dim, (start, size) in enumerate(zip(offsets, piece.shape)):
            region = region.narrow(dim, start, size)
        region.fill_(True)
    missing = [n for n, c in covered.items() if not bool(c.all())]
    if missing:
        raise AssertionError(f"{what}: no rank reported (all of) {missing[:6]}")
    return worst


def expert_offset(name, layout, cfg):
    return layout.ep_rank * (cfg.n_routed_experts // layout.ep) if is_expert_param(name) and layout.ep > 1 else 0


def grad_pieces(named, layout, cfg, zero):
    pieces = Pieces()
    if zero is None:
        for name, p in named:
            offsets = [expert_offset(name, layout, cfg)] + [0] * (p.dim() - 1)
            pieces.add(name, p.grad, offsets)
        return pieces
    for i, (name, shard) in enumerate(zip(zero.names, zero.shards)):
        p = zero.params[i]
        offsets = [expert_offset(name, layout, cfg)] + [0] * (p.dim() - 1)
        group = zero.experts if zero.expert[i] else zero.dense
        offsets[group.dim] += chunk_range(p.shape[group.dim], group.size, group.rank)[0]
        pieces.add(name, shard.grad, offsets)
    return pieces


def run(args, cfg, tmp):
    start = time.perf_counter()
    schedule = args.schedule
    layout = build_layout(pp=args.pp, dp=args.dp, ep=args.ep, gpus_per_node=args.gpn,
                          n_routed_experts=cfg.n_routed_experts, n_group=cfg.n_group)
    rank, replicas = dist.get_rank(), layout.dp * layout.ep
    replica = layout.dp_rank * layout.ep + layout.ep_rank
    torch.manual_seed(args.seed)
    model = Transformer(cfg)
    reference = copy.deepcopy(model) if rank == 0 else None
    if layout.ep > 1:
        apply_expert_parallel(model, layout, make_dispatcher("flat", layout.ep_group, layout.gpus_per_node))
    n_mb, mb, S = (args.microbatches if args.pp > 1 else 1), args.micro_batch, args.seq_len
    share = n_mb * mb
    if args.pp > 1:
        pipe = Pipeline(model, pp_group=layout.pp_group, schedule=schedule, n_microbatches=n_mb, micro_batch=mb,
                        seq_len=S, mtp_weight=args.mtp_weight)
        pipe.set_balance_loss_weight(cfg.aux_loss_alpha / n_mb)
        named = list(pipe.named_parameters())
    else:
        pipe, named = None, list(model.named_parameters())
    zero = Zero1(named, layout, lambda n: make_adamw(n, args.lr)) if args.zero else None
    opt = zero if zero is not None else make_adamw(named, args.lr)
    if rank == 0:
        ref_opt = make_adamw(reference.named_parameters(), args.lr)
    gen = torch.Generator().manual_seed(args.seed + 1)
    worst = {"loss": 0.0, "grad": 0.0, "later": 0.0}
    for step in range(args.steps):
        tokens = torch.randint(0, cfg.vocab_size, (replicas * share, S + 1), generator=gen)
        mine = tokens[replica * share:(replica + 1) * share]
        opt.zero_grad(set_to_none=True)
        if pipe is not None:
            out = pipe.step(mine)
        else:
            out = lm_loss(model, mine)
            (out["loss"] + args.mtp_weight * out["mtp_loss"]).backward()
        if zero is not None:
            zero.reduce_gradients()
        else:
            reduce_gradients(named, layout)
        losses = torch.stack([out["loss"].detach(), out["mtp_loss"].detach()]) / replicas
        dist.all_reduce(losses, group=layout.dense_grad_group)
        load = (pipe.expert_load() if pipe is not None else model.expert_load()).clone()
        dist.all_reduce(load, group=layout.dense_grad_group)
        ids = pipe.moe_layer_ids() if pipe is not None else list(range(load.shape[0]))
        load_pieces = Pieces()
        for i, row in zip(ids, load):
            load_pieces.add(f"moe.{i}", row)
        grads, loads = grad_pieces(named, layout, cfg, zero).gather(), load_pieces.gather()
        if rank == 0:
            ref_opt.zero_grad(set_to_none=True)
            parts = tokens.split(mb)
            reference.set_balance_loss_weight(cfg.aux_loss_alpha / len(parts))
            acc = {"loss": 0.0, "mtp_loss": 0.0}
            for part in parts:
                r = lm_loss(reference, part)
                ((r["loss"] + args.mtp_weight * r["mtp_loss"]) / len(parts)).backward()
                acc = {k: acc[k] + r[k].detach().double() / len(parts) for k in acc}
            ref = acc
            for k, key in enumerate(("loss", "mtp_loss")):
                err = abs(float(losses[k]) - float(ref[key]))
                if err > args.tol:
                    raise AssertionError(f"{schedule} step {step} {key}: {float(losses[k])} vs {float(ref[key])}")
                worst["loss"] = max(worst["loss"], err)
            ref_grads = {n: p.grad for n, p in reference.named_parameters()}
            tol = args.grad_tol if step == 0 else args.later_grad_tol
            step_worst = compare_pieces(f"{schedule} step {step} grad", grads, ref_grads, tol)
            worst["grad"] = max(worst["grad"], step_worst) if step == 0 else worst["grad"]
            worst["later"] = max(worst["later"], step_worst)
            ref_load = reference.expert_load()
            compare_pieces(f"{schedule} step {step} load", loads,
                           {f"moe.{i}": row for i, row in enumerate(ref_load)}, 0.0)
            ref_opt.step()
            reference.update_router_bias(GAMMA)
        opt.step()
        if pipe is not None:
            pipe.update_router_bias(GAMMA, load)
        else:
            model.update_router_bias(GAMMA, load)
    if pipe is not None:
        tokens = torch.randint(0, cfg.vocab_size, (replicas * share, S + 1), generator=gen)
        out = pipe.evaluate(tokens[replica * share:(replica + 1) * share])
        losses = torch.stack([out["loss"], out["mtp_loss"]]) / replicas
        dist.all_reduce(losses, group=layout.dense_grad_group)
        if rank == 0:
            reference.eval()
            with torch.no_grad():
                ref = lm_loss(reference, tokens)
            for k, key in enumerate(("loss", "mtp_loss")):
                if abs(float(losses[k]) - float(ref[key])) > max(args.tol, 1e-5):
                    raise AssertionError(f"{schedule} eval {key}: {float(losses[k])} vs {float(ref[key])}")
    note = ""
    if zero is not None:
        note = check_zero(zero, layout, named, ref_opt if rank == 0 else None, reference, tmp)
    if rank == 0:
        layout_note = f" layout={pipe.layout}" if pipe is not None else ""
        name = schedule if pipe is not None else "no pipeline"
        print(f"{name}: pp={layout.pp} dp={layout.dp} ep={layout.ep} zero={args.zero} steps={args.steps} "
              f"max |dloss|={worst['loss']:.2e} max rel |dgrad| step 0={worst['grad']:.2e} "
              f"later={worst['later']:.2e}{layout_note}{note} "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
    dist.barrier()


def check_zero(zero, layout, named, ref_opt, reference, path) -> str:
    """State bytes per rank and a DCP round trip of the sharded state into one unsharded optimizer."""
    import torch.distributed.checkpoint as dcp

    full = make_adamw(named, 1e-3).state_dict()
    full_bytes = sum(t.numel() * t.element_size() for key in ("exp_avg", "exp_avg_sq") for t in full[key].values())
    held = zero.state_bytes()
    expected = 0
    for i, p in enumerate(zero.params):
        group = zero.experts if zero.expert[i] else zero.dense
        lo, hi = chunk_range(p.shape[group.dim], group.size, group.rank)
        expected += 2 * 4 * p.numel() // p.shape[group.dim] * (hi - lo)
    if held != expected:
        raise AssertionError(f"rank {dist.get_rank()}: ZeRO-1 state holds {held} bytes, expected {expected}")
    fractions = [None] * dist.get_world_size()
    dist.all_gather_object(fractions, held / full_bytes)
    dcp.save({"optim": zero.state_dict()}, checkpoint_id=str(path))
    dist.barrier()
    if ref_opt is not None:
        loaded = make_adamw(reference.named_parameters(), 1e-3)
        state = {"optim": loaded.state_dict()}
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
        loaded.load_state_dict(state["optim"])
        want, got = ref_opt.state_dict(), loaded.state_dict()
        if int(got["step"]) != int(want["step"]):
            raise AssertionError(f"checkpoint step {int(got['step'])} != {int(want['step'])}")
        for key in ("exp_avg", "exp_avg_sq"):
            compare_pieces(f"checkpointed {key}", [(n, [0] * t.dim(), t) for n, t in got[key].items()],
                           want[key], 1e-4)
    dist.barrier()
    return f" state fraction per rank={[round(f, 4) for f in fractions]}"


CASE_KEYS = {"pp": int, "dp": int, "ep": int, "gpn": int, "zero": int, "schedule": str, "layers": int,
             "microbatches": int, "exact": int}


def parse_case(text: str, defaults: argparse.Namespace) -> argparse.Namespace:
    """'pp=2,ep=2,schedule=1f1b' -> a copy of the command-line args with those fields replaced."""
    case = copy.copy(defaults)
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in CASE_KEYS:
            raise SystemExit(f"unknown case key {key!r} in {text!r}; known: {sorted(CASE_KEYS)}")
        setattr(case, key, CASE_KEYS[key](value))
    case.zero = bool(case.zero)
    if case.exact:
        case.tol = case.grad_tol = case.later_grad_tol = 0.0
    return case


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cases", nargs="+", help="comma-separated key=value: " + ", ".join(CASE_KEYS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--micro-batch", dest="micro_batch", type=int, default=2)
    parser.add_argument("--seq-len", dest="seq_len", type=int, default=12)
    parser.add_argument("--mtp-weight", dest="mtp_weight", type=float, default=0.3)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--grad-tol", dest="grad_tol", type=float, default=1e-5)
    parser.add_argument("--later-grad-tol", dest="later_grad_tol", type=float, default=1e-2)
    parser.add_argument("--tmp", default="/tmp/moeforge_pipeline_test")
    args = parser.parse_args()
    defaults = argparse.Namespace(**vars(args), pp=2, dp=None, ep=1, gpn=None, zero=0, schedule="1f1b", layers=4,
                                  microbatches=4, exact=0)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        for i, text in enumerate(args.cases):
            case = parse_case(text, defaults)
            run(case, tiny_config(num_hidden_layers=case.layers), Path(args.tmp) / f"case{i}")
        if dist.get_rank() == 0:
            print("PARALLEL OK", flush=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
