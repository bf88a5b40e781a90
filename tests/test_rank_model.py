"""Rank-local construction (parallel/rank_model.py, model/init.py): every layout starts from the
weights of one process, bit for bit, and a rank materializes only its own parameters.

The reference is the one-process model built by `Transformer(cfg, seed=...)`; each rank of
pp=2 x ep=2 (1f1b and dualpipev), ep=4 and pp=2 x ep=4 (interleaved) is built on its own, as the
trainer builds it, and compared tensor by tensor with the slice of the reference it should hold.
"""
import pytest
import torch

from model.config import ModelConfig
from model.transformer import Transformer
from parallel.rank_model import build_rank_model
from training.config import compose_job, model_config

SEED = 1234
LAYOUTS = [(1, 1, "1f1b"), (2, 2, "1f1b"), (2, 2, "dualpipev"), (1, 4, "1f1b"), (2, 4, "interleaved_1f1b")]


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return model_config(compose_job(["model=tiny"]))


@pytest.fixture(scope="module")
def reference(cfg):
    return Transformer(cfg, seed=SEED).state_dict()


@pytest.mark.parametrize("pp,ep,schedule", LAYOUTS)
def test_every_rank_starts_from_the_one_process_weights(cfg, reference, pp, ep, schedule):
    held = {}
    for pp_rank in range(pp):
        for ep_rank in range(ep):
            rank = build_rank_model(cfg, seed=SEED, pp=pp, pp_rank=pp_rank, ep=ep, ep_rank=ep_rank,
                                    schedule=schedule)
            own = rank.named_parameters()
            for name, p in own.items():
                ref = reference[name]
                if ".mlp.experts." in name:
                    n = ref.shape[0] // ep
                    ref = ref[ep_rank * n:(ep_rank + 1) * n]
                    held.setdefault(name, set()).add(ep_rank)
                else:
                    held.setdefault(name, set()).add(0)
                assert p.device.type == "cpu" and torch.equal(p, ref), (pp_rank, ep_rank, name)
            # nothing of another rank's parameters holds memory here
            others = [n for n, p in rank.model.named_parameters() if n not in own and p.device.type != "meta"]
            assert not others, (pp_rank, ep_rank, others[:5])
            buffers = dict(rank.model.named_buffers())
            for name, b in buffers.items():
                part = name.split(".")[0] if not name.startswith("layers.") else ".".join(name.split(".")[:2])
                assert (b.device.type == "meta") == (part not in rank.parts and part != "rotary"), name
    # together the ranks hold every parameter, each expert slice once
    assert set(held) == {n for n, _ in Transformer(cfg, seed=0).named_parameters()}
    assert all(len(r) == (ep if ".mlp.experts." in n else 1) for n, r in held.items())


def test_initial_values_depend_on_seed_and_name_only(cfg):
    a = Transformer(cfg, seed=SEED)
    torch.manual_seed(7)
    b = build_rank_model(cfg, seed=SEED).model
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = Transformer(cfg, seed=SEED + 1)
    assert not torch.equal(a.layers["1"].mlp.experts.down_proj, c.layers["1"].mlp.experts.down_proj)
    # distinct draws per tensor and per expert, at the configured std
    w = a.layers["1"].mlp.experts.gate_up_proj
    assert not torch.equal(w[0], w[1])
    assert not torch.equal(a.layers["0"].self_attn.q_a_proj.weight[:8, :8], a.layers["1"].self_attn.q_a_proj.weight[:8, :8])
    assert abs(w.std().item() - cfg.initializer_range) < 1e-4
    assert torch.equal(a.layers["1"].mlp.gate.e_score_correction_bias, torch.zeros(cfg.n_routed_experts))


def test_fp8_and_meta_builds(cfg):
    fp8 = build_rank_model(cfg, seed=SEED, pp=2, pp_rank=1, ep=2, ep_rank=1, fp8=True)
    plain = build_rank_model(cfg, seed=SEED, pp=2, pp_rank=1, ep=2, ep_rank=1)
    assert type(fp8.model.layers["3"].mlp.experts).__name__ == "FP8GroupedExperts"
    assert all(torch.equal(p, plain.named_parameters()[n]) for n, p in fp8.named_parameters().items())
    meta = build_rank_model(cfg, seed=SEED, device="meta", pp=2, pp_rank=1, ep=2, ep_rank=1)
    assert all(p.device.type == "meta" for p in meta.model.parameters())
    assert meta.numel() == plain.numel()
    assert meta.model.layers["3"].mlp.experts.gate_up_proj.shape[0] == cfg.n_routed_experts // 2
