"""Sigmoid group-limited routing (model/moe.py Router, MoE) against fp64 references of DeepSeek-V3 section 2.1.2."""
import torch

from model import ModelConfig, Transformer
from model.moe import MoE, Router, sequence_balance_loss

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                  first_k_dense_replace=1, num_attention_heads=2, n_routed_experts=32, n_shared_experts=1,
                  num_experts_per_tok=6, n_group=8, topk_group=3, routed_scaling_factor=2.5, q_lora_rank=None,
                  kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_nextn_predict_layers=0)


def make_router(bias_scale: float = 0.3) -> Router:
    router = Router(CFG)
    with torch.no_grad():
        router.weight.normal_(0, 0.3)
        router.e_score_correction_bias.uniform_(-bias_scale, bias_scale)
    return router


def reference_selection(scores: torch.Tensor, bias: torch.Tensor) -> list:
    """Per token, in fp64: keep the topk_group groups with the largest sum of their top-2 biased
    scores, then take the num_experts_per_tok largest biased scores among the kept experts."""
    per_group = CFG.n_routed_experts // CFG.n_group
    chosen = []
    for s in scores.double() + bias.double():
        groups = s.view(CFG.n_group, per_group)
        group_score = groups.topk(2, dim=1).values.sum(dim=1)
        kept = set(group_score.topk(CFG.topk_group).indices.tolist())
        candidates = [e for e in range(CFG.n_routed_experts) if e // per_group in kept]
        best = sorted(candidates, key=lambda e: -float(s[e]))[:CFG.num_experts_per_tok]
        chosen.append(sorted(best))
    return chosen


def test_selection_is_group_limited_and_matches_reference():
    router = make_router()
    x = torch.randn(300, CFG.hidden_size)
    idx, _, scores = router(x)
    per_group = CFG.n_routed_experts // CFG.n_group
    groups_reached = [len(set((row // per_group).tolist())) for row in idx]
    assert max(groups_reached) <= CFG.topk_group
    assert max(groups_reached) == CFG.topk_group  # the limit binds for some tokens
    expected_scores = torch.sigmoid(x.double() @ router.weight.detach().double().T)
    torch.testing.assert_close(scores.double(), expected_scores, atol=1e-6, rtol=0)
    assert [sorted(row.tolist()) for row in idx] == reference_selection(expected_scores, router.e_score_correction_bias)


def test_bias_selects_but_weight_comes_from_unbiased_score():
    router = make_router(bias_scale=0.0)
    x = torch.randn(200, CFG.hidden_size)
    favoured = 13
    idx_before, _, _ = router(x)
    assert not bool((idx_before == favoured).any(dim=1).all())
    with torch.no_grad():
        router.e_score_correction_bias[favoured] = 10.0
    idx, weight, _ = router(x)
    assert bool((idx == favoured).any(dim=1).all())
    s = torch.sigmoid(x.double() @ router.weight.detach().double().T)
    chosen = s.gather(1, idx)
    expected = chosen / chosen.sum(dim=1, keepdim=True) * CFG.routed_scaling_factor
    torch.testing.assert_close(weight.double(), expected, atol=1e-6, rtol=0)
    position = (idx == favoured).int().argmax(dim=1)
    favoured_weight = weight.gather(1, position[:, None]).squeeze(1).double()
    torch.testing.assert_close(favoured_weight, s[:, favoured] / chosen.sum(dim=1) * CFG.routed_scaling_factor,
                               atol=1e-6, rtol=0)


def test_gradients_reach_router_weight_never_bias():
    moe = MoE(CFG).train()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1)
        moe.gate.e_score_correction_bias.uniform_(0, 0.3)
    moe.aux_loss_weight = 0.0  # the gate weights alone must carry gradient to the router
    moe(torch.randn(2, 16, CFG.hidden_size)).pow(2).sum().backward()
    assert moe.gate.weight.grad is not None and float(moe.gate.weight.grad.abs().sum()) > 0
    bias = moe.gate.e_score_correction_bias
    assert not bias.requires_grad and bias.grad is None
    assert "gate.e_score_correction_bias" in moe.state_dict()
    assert "gate.e_score_correction_bias" not in dict(moe.named_parameters())
    model = Transformer(CFG)
    assert "layers.1.mlp.gate.e_score_correction_bias" in model.state_dict()


def reference_balance_loss(scores: torch.Tensor, idx: torch.Tensor, n_seq: int) -> float:
    """Eq. 17-20 in fp64, one sequence at a time: sum_i f_i P_i, f_i = E / (K T) * #{t: i in topk(t)},
    P_i = mean_t s_it / sum_j s_jt; averaged over sequences."""
    E, K = scores.shape[1], idx.shape[1]
    total = 0.0
    for s_TE, idx_TK in zip(scores.double().chunk(n_seq), idx.chunk(n_seq)):
        T = s_TE.shape[0]
        f = torch.zeros(E, dtype=torch.float64)
        for row in idx_TK:
            for e in row.tolist():
                f[e] += E / (K * T)
        P = (s_TE / s_TE.sum(dim=1, keepdim=True)).mean(dim=0)
        total += float((f * P).sum())
    return total / n_seq


def test_sequence_balance_loss_matches_fp64_reference():
    router = make_router()
    x = torch.randn(3 * 40, CFG.hidden_size)
    with torch.no_grad():
        idx, _, scores = router(x)
    loss = sequence_balance_loss(scores, idx, n_seq=3)
    assert abs(float(loss) - reference_balance_loss(scores, idx, 3)) < 1e-6


def test_attached_balance_loss_gradient_equals_explicit_sum():
    torch.manual_seed(3)
    moe = MoE(CFG).train()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(2, 16, CFG.hidden_size)
    weight = 0.37
    moe.aux_loss_weight = weight
    moe(x).sum().backward()
    attached = moe.gate.weight.grad.clone()
    moe.zero_grad()
    x_TD = x.reshape(-1, CFG.hidden_size)
    idx, w, scores = moe.gate(x_TD)
    y = moe.dispatcher(x_TD, idx, w, moe.experts) + moe.shared_experts(x_TD)
    (y.sum() + weight * sequence_balance_loss(scores, idx, 2)).backward()
    torch.testing.assert_close(attached, moe.gate.weight.grad, atol=1e-6, rtol=1e-5)


def test_bias_update_moves_plus_minus_gamma_by_load():
    router = make_router(bias_scale=0.0)
    load = torch.arange(CFG.n_routed_experts, dtype=torch.float32)
    load[5] = load.mean()
    before = router.e_score_correction_bias.clone()
    router.update_bias(0.001, load)
    delta = router.e_score_correction_bias - before
    expected = torch.where(load > load.mean(), -0.001, torch.where(load < load.mean(), 0.001, 0.0))
    torch.testing.assert_close(delta, expected)


def test_bias_update_uses_counted_load_and_resets():
    model = Transformer(CFG).train()
    tokens = torch.randint(0, CFG.vocab_size, (2, 16))
    router = model.moe_layers()[0].gate
    x_seen = []
    router.register_forward_hook(lambda m, args, out: x_seen.append(out[0]))
    model(tokens)
    counts = torch.bincount(x_seen[0].flatten(), minlength=CFG.n_routed_experts).float()
    torch.testing.assert_close(model.expert_load()[0], counts)
    before = router.e_score_correction_bias.clone()
    model.update_router_bias(0.01)
    torch.testing.assert_close(router.e_score_correction_bias - before,
                               0.01 * torch.sign(counts.mean() - counts))
    assert float(model.expert_load().abs().sum()) == 0
