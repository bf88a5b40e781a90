"""torchrun worker (4 ranks, gloo): a whole Transformer under expert parallelism against one process.

Launched by tests/test_parallel_expert_parallel.py with a scratch directory as argument. For each
layout (ep=4 on 2 simulated nodes with the hierarchical and the flat dispatcher, dp=2 x ep=2 with one
rank per node) every rank builds the same seeded model, keeps its experts, trains 3 AdamW steps on its
share of a fixed global batch (gradients reduced by `reduce_gradients`, router bias updated from the
all-reduced load) and must follow the single-process run on the whole batch: losses within 1e-5 and
gradients (dense and this rank's experts) within 1e-4 relative. Then the ep=4 model is saved with DCP
and loaded back with ep=2 and with ep=1 (one process, no process group): the loaded expert tensors
must equal the saved ones exactly, and the next loss on one process must equal the ep=4 loss.
Prints DIST_EP_OK when all pass.
"""
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from dist_launch import finish_worker  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402

from model.config import ModelConfig  # noqa: E402
from model.transformer import Transformer, lm_loss  # noqa: E402
from parallel.dispatch import make_dispatcher  # noqa: E402
from parallel.expert_parallel import (apply_expert_parallel, global_expert_load, is_expert_param,  # noqa: E402
                                      reduce_gradients, shard_expert_state)
from parallel.mesh import build_layout  # noqa: E402

CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                  num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=2, n_routed_experts=8,
                  num_experts_per_tok=3, n_group=2, topk_group=1, q_lora_rank=32, kv_lora_rank=32,
                  qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=64)
BATCH, SEQ, STEPS, MTP_WEIGHT, GAMMA = 4, 17, 3, 0.3, 0.01
FAILURES = []


def check(name, ok, detail=""):
    if not ok:
        FAILURES.append(f"rank {dist.get_rank()}: {name} {detail}")


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def step(model, tokens):
    out = lm_loss(model, tokens)
    (out["loss"] + MTP_WEIGHT * out["mtp_loss"]).backward()
    return out


def reference(base, batch):
    """Single process, whole batch: per-step losses and gradients, final model."""
    model = copy.deepcopy(base)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for tokens in batch:
        optim.zero_grad()
        out = step(model, tokens)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        history.append((float(out["loss"]), float(out["mtp_loss"]), grads, model.expert_load().clone()))
        optim.step()
        model.update_router_bias(GAMMA)
    return model, history


def run_layout(base, batch, ref_history, layout, dispatcher_name):
    model = copy.deepcopy(base)
    dispatcher = make_dispatcher(dispatcher_name, layout.ep_group, layout.gpus_per_node)
    apply_expert_parallel(model, layout, dispatcher)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    replica = layout.dp_rank * layout.ep + layout.ep_rank
    share = BATCH // (layout.dp * layout.ep)
    rows = layout.expert_range(CFG.n_routed_experts)
    tag = f"{dispatcher_name} dp={layout.dp} ep={layout.ep} gpn={layout.gpus_per_node}"
    for i, tokens in enumerate(batch):
        optim.zero_grad()
        out = step(model, tokens[replica * share:(replica + 1) * share])
        reduce_gradients(model.named_parameters(), layout)
        losses = torch.stack([out["loss"].detach(), out["mtp_loss"].detach()])
        dist.all_reduce(losses, group=layout.dense_grad_group)
        losses /= layout.dp * layout.ep
        ref_loss, ref_mtp, ref_grads, ref_load = ref_history[i]
        check(f"{tag} step {i} loss", abs(float(losses[0]) - ref_loss) < 1e-5, f"{float(losses[0])} vs {ref_loss}")
        check(f"{tag} step {i} mtp loss", abs(float(losses[1]) - ref_mtp) < 1e-5)
        for name, p in model.named_parameters():
            want = ref_grads[name][rows.start:rows.stop] if is_expert_param(name) else ref_grads[name]
            err = rel_err(p.grad, want)
            check(f"{tag} step {i} grad {name}", p.grad.shape == want.shape and err < 1e-4, f"rel err {err:.2e}")
        load = global_expert_load(model, layout.dense_grad_group)
        check(f"{tag} step {i} global load", torch.equal(load, ref_load), f"{load} vs {ref_load}")
        optim.step()
        model.update_router_bias(GAMMA, load)
    check(f"{tag} traffic counted", dispatcher.a2a_internode_bytes > 0 or layout.ep_nodes == 1)
    return model


def gather_experts(model, layout):
    """Full expert tensors of an EP model, by name (all_gather over the EP group)."""
    full = {}
    for name, t in model.state_dict().items():
        if is_expert_param(name):
            parts = [torch.empty_like(t) for _ in range(layout.ep)]
            dist.all_gather(parts, t.contiguous(), group=layout.ep_group)
            full[name] = torch.cat(parts)
    return full


def check_resharding(base, ep4_model, ep4_layout, ckpt, next_tokens):
    state = {"model": shard_expert_state(ep4_model.state_dict(), ep4_layout)}
    dcp.save(state, checkpoint_id=ckpt)
    saved = gather_experts(ep4_model, ep4_layout)
    ep4_next = lm_loss(ep4_model, next_tokens[dist.get_rank():dist.get_rank() + 1])["loss"].detach()
    ep4_losses = [torch.zeros(()) for _ in range(4)]
    dist.all_gather(ep4_losses, ep4_next)

    ep2 = build_layout(dp=2, ep=2, gpus_per_node=1, n_routed_experts=CFG.n_routed_experts, n_group=CFG.n_group)
    model2 = apply_expert_parallel(copy.deepcopy(base), ep2, make_dispatcher("hierarchical", ep2.ep_group, 1))
    dcp.load({"model": shard_expert_state(model2.state_dict(), ep2)}, checkpoint_id=ckpt)
    rows = ep2.expert_range(CFG.n_routed_experts)
    for name, t in model2.state_dict().items():
        want = saved[name][rows.start:rows.stop] if is_expert_param(name) else ep4_model.state_dict()[name]
        check(f"ep=4 -> ep=2 {name}", torch.equal(t, want))
    dist.barrier()
    if dist.get_rank() == 0:
        model1 = copy.deepcopy(base)
        sd = model1.state_dict()
        dcp.load({"model": sd}, checkpoint_id=ckpt, no_dist=True)
        model1.load_state_dict(sd)
        for name, t in model1.state_dict().items():
            want = saved[name] if is_expert_param(name) else ep4_model.state_dict()[name]
            check(f"ep=4 -> ep=1 {name}", torch.equal(t, want))
        for r in range(4):
            loss1 = float(lm_loss(model1, next_tokens[r:r + 1])["loss"])
            check(f"ep=1 resumed loss of sequence {r}", abs(loss1 - float(ep4_losses[r])) < 1e-5,
                  f"{loss1} vs {float(ep4_losses[r])}")
    dist.barrier()


def main():
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    base = Transformer(CFG)
    gen = torch.Generator().manual_seed(1)
    batch = [torch.randint(0, CFG.vocab_size, (BATCH, SEQ), generator=gen) for _ in range(STEPS + 1)]
    _, ref_history = reference(base, batch[:STEPS])
    layouts = [("hierarchical", dict(ep=4, gpus_per_node=2)), ("flat", dict(ep=4, gpus_per_node=2)),
               ("hierarchical", dict(dp=2, ep=2, gpus_per_node=1))]
    trained = {}
    for name, sizes in layouts:
        layout = build_layout(**sizes, dispatcher=name, n_routed_experts=CFG.n_routed_experts, n_group=CFG.n_group)
        trained[name, layout.ep] = (run_layout(base, batch[:STEPS], ref_history, layout, name), layout)
    check_resharding(base, *trained["hierarchical", 4], sys.argv[1], batch[STEPS])

    finish_worker(FAILURES, "DIST_EP_OK")


if __name__ == "__main__":
    main()
