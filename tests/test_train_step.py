"""Trainer numerics in one process: AdamW vs torch's, gradient accumulation, clipping, skipped steps,
and the token-based schedules."""
import contextlib
import copy
import math

import pytest
import torch
from omegaconf import OmegaConf

from model import ModelConfig, Transformer, lm_loss
from training.config import OptimConfig, TrainConfig
from training.distributed import Dist
from training.optim import AdamW, clip_grads, decays, grad_norm
from training.schedule import Schedules
from training.step import train_step

CPU = Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"))


def small_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                first_k_dense_replace=1, num_attention_heads=2, n_routed_experts=4, n_group=2, topk_group=1,
                num_experts_per_tok=2, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
                v_head_dim=8, max_position_embeddings=64, num_nextn_predict_layers=1)
    base.update(kw)
    return ModelConfig(**base)


def step(model, opt, batches, **kw):
    args = dict(mtp_lambda=0.3, gamma=1e-3, alpha=1e-4, grad_clip=1.0, autocast=contextlib.nullcontext, dist=CPU)
    args.update(kw)
    return train_step(model, opt, batches, **args)


def test_adamw_matches_torch_with_fp32_moments():
    torch.manual_seed(0)
    model = Transformer(small_cfg())
    ref = copy.deepcopy(model)
    ours = AdamW(model.named_parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, moments_dtype="fp32")
    named = list(ref.named_parameters())
    decay = [p for n, p in named if p.ndim >= 2 and n != "embed_tokens.weight"]
    rest = [p for n, p in named if not (p.ndim >= 2 and n != "embed_tokens.weight")]
    theirs = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                               lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    tokens = torch.randint(0, 96, (2, 17))
    for _ in range(4):  # both optimizers get the same gradients: the comparison is of the update rule alone
        lm_loss(model, tokens)["loss"].backward()
        for p, q in zip(model.parameters(), ref.parameters()):
            q.grad = None if p.grad is None else p.grad.clone()
        for opt in (ours, theirs):
            opt.step()
            opt.zero_grad()
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_adamw_bf16_moments_and_decay_groups():
    torch.manual_seed(0)
    model = Transformer(small_cfg())
    opt = AdamW(model.named_parameters(), lr=1e-2)
    for p in model.parameters():
        assert opt.state[p]["exp_avg"].dtype == torch.bfloat16 and "master" not in opt.state[p]
    assert not decays("embed_tokens.weight", model.embed_tokens.weight, False)
    assert decays("embed_tokens.weight", model.embed_tokens.weight, True)
    assert decays("lm_head.weight", model.lm_head.weight, False)
    assert not decays("norm.weight", model.norm.weight, False)


def test_clip_matches_torch():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn_like(p) * 3
        q.grad = p.grad.clone()
    norm = float(grad_norm(a))
    ref_norm = torch.nn.utils.clip_grad_norm_(b, 1.0)
    assert math.isclose(norm, float(ref_norm), rel_tol=1e-6)
    clip_grads(a, norm, 1.0)
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad)


def test_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    m1 = Transformer(small_cfg())
    m2 = copy.deepcopy(m1)
    o1 = AdamW(m1.named_parameters(), lr=1e-2, moments_dtype="fp32")
    o2 = AdamW(m2.named_parameters(), lr=1e-2, moments_dtype="fp32")
    tokens = torch.randint(0, 96, (4, 17))
    r1 = step(m1, o1, [tokens])
    r2 = step(m2, o2, list(tokens.split(2)))
    assert math.isclose(r1.loss, r2.loss, rel_tol=1e-6) and math.isclose(r1.mtp_loss, r2.mtp_loss, rel_tol=1e-6)
    assert math.isclose(r1.grad_norm, r2.grad_norm, rel_tol=1e-4)
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)
    for a, b in zip(m1.moe_layers(), m2.moe_layers()):
        assert torch.equal(a.gate.e_score_correction_bias, b.gate.e_score_correction_bias)
        assert a.gate.e_score_correction_bias.abs().max() == pytest.approx(1e-3)


def test_non_finite_step_changes_nothing():
    torch.manual_seed(0)
    model = Transformer(small_cfg())
    opt = AdamW(model.named_parameters(), lr=1e-2)
    tokens = torch.randint(0, 96, (2, 17))
    step(model, opt, [tokens])
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    moments = {n: t.clone() for n, t in opt.state_dict()["exp_avg"].items()}
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: out * float("nan"))
    result = step(model, opt, [tokens])
    hook.remove()
    assert result.skipped and math.isnan(result.loss)
    assert int(opt.step_count) == 1
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
        assert p.grad is None
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert float(model.expert_load().sum()) == 0.0
    for n, t in opt.state_dict()["exp_avg"].items():
        assert torch.equal(t, moments[n])
    clean = step(model, opt, [tokens])
    assert not clean.skipped and int(opt.step_count) == 2
    assert any(not torch.equal(p, params[n]) for n, p in model.named_parameters())


def schedules(**train_kw) -> Schedules:
    optim = OmegaConf.structured(OptimConfig(lr=1.0, warmup_frac=0.1, decay_start_frac=0.5, decay_end_frac=0.9,
                                             min_lr_ratio=0.1, final_start_frac=0.95, final_lr_ratio=0.03))
    train = OmegaConf.structured(TrainConfig(**{"steps": 100, "seq_len": 10, "global_batch": 8, "micro_batch": 2,
                                                **train_kw}))
    return Schedules(optim, train, batch_unit=2)


def test_lr_schedule_shape():
    s = schedules()
    total = s.total_tokens
    assert total == 100 * 8 * 10
    assert s.lr(0.05 * total) == pytest.approx(0.5)
    assert s.lr(0.1 * total) == pytest.approx(1.0) and s.lr(0.49 * total) == pytest.approx(1.0)
    assert s.lr(0.7 * total) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s.lr(0.92 * total) == pytest.approx(0.1)
    assert s.lr(0.97 * total) == pytest.approx(0.03)
    lrs = [s.lr(t) for t in range(int(0.1 * total), total, 80)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_lambda_gamma_and_batch_ramp():
    s = schedules(mtp_lambda_switch_frac=0.5, bias_gamma_switch_frac=0.8, batch_ramp_start=2, batch_ramp_frac=0.5)
    total = s.total_tokens
    assert s.mtp_lambda(0) == 0.3 and s.mtp_lambda(total // 2) == 0.1
    assert s.bias_gamma(int(0.79 * total)) == 1e-3 and s.bias_gamma(int(0.8 * total) + 1) == 0.0
    sizes = [s.batch_size(t) for t in range(0, 8000, 100)]
    assert sizes[0] == 2 and sizes[-1] == 8
    assert all(b % 2 == 0 for b in sizes) and sizes == sorted(sizes)
    expected, t = 0, 0
    for _ in range(100):
        expected += s.batch_size(t) * 10
        t += s.batch_size(t) * 10
    assert total == expected < 100 * 8 * 10
