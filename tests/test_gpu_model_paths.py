"""Model-side CUDA paths, checked on CPU: MLA's values padded for flash attention give the unpadded
result, and the routed experts' bf16 weight cast is shared by the micro-batches in flight."""
import pytest
import torch

from model.mla import attention
from model.moe import GroupedExperts


@pytest.mark.parametrize("S, T, start", [(16, 16, 0), (4, 12, 8)])
def test_padded_values_give_the_same_attention_and_gradients(S, T, start):
    torch.manual_seed(0)
    q = torch.randn(2, 3, S, 24, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, T, 24, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, T, 16, dtype=torch.float64, requires_grad=True)
    outs, grads = [], []
    for pad in (False, True):
        out = attention(q, k, v, 24 ** -0.5, start, pad_v=pad)
        outs.append(out)
        grads.append(torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    assert outs[1].shape == outs[0].shape == (2, 3, S, 16)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _saved_bf16_weight_storages(experts, micro_batches):
    """Forward each micro-batch under bf16 autocast (backwards deferred, as a pipeline does); returns
    the distinct storages of bf16 tensors shaped like an expert weight saved for backward, and the losses."""
    shapes = {tuple(experts.gate_up_proj.shape), tuple(experts.down_proj.shape)}
    storages, losses = set(), []

    def pack(t):
        base = t if t._base is None else t._base
        if t.dtype == torch.bfloat16 and tuple(base.shape) in shapes:
            storages.add(base.untyped_storage().data_ptr())
        return t

    counts = torch.tensor([3, 0, 5, 4])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        for x in micro_batches:
            losses.append(experts(x, counts).float().square().sum())
    return storages, losses


def test_expert_weight_cast_once_for_all_micro_batches_in_flight():
    torch.manual_seed(0)
    experts = GroupedExperts(4, 16, 8)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    micro = [torch.randn(12, 16, requires_grad=True) for _ in range(3)]  # as inside a model: dx needs W
    storages, losses = _saved_bf16_weight_storages(experts, micro)
    assert len(storages) == 2  # one bf16 copy of gate_up_proj and one of down_proj for all 3 micro-batches
    for loss in losses:  # one backward per micro-batch, as a pipeline schedule runs them
        loss.backward()
    grads = [experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()]

    reference = GroupedExperts(4, 16, 8)
    reference.load_state_dict(experts.state_dict())
    for x in micro:  # one micro-batch at a time: each its own cast
        _, (loss,) = _saved_bf16_weight_storages(reference, [x])
        loss.backward()
    assert torch.equal(grads[0], reference.gate_up_proj.grad) and torch.equal(grads[1], reference.down_proj.grad)

    with torch.no_grad():
        experts.down_proj.mul_(2)  # an optimizer step: the cached copy is stale
    stale, (loss,) = _saved_bf16_weight_storages(experts, micro[:1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = experts(micro[0], torch.tensor([3, 0, 5, 4])).float().square().sum()
    assert torch.equal(loss, want) and len(stale) == 2


def test_pipeline_activations_cross_stages_in_the_wire_dtype():
    """Stage outputs (and the carried embedding) leave in bf16 and are widened on arrival: the next
    stage computes exactly what it computes from fp32 inputs holding the same bf16 values, and the
    schedule's buffers are declared bf16, so activations and their gradients travel in half the bytes."""
    from model.config import ModelConfig
    from model.transformer import Transformer
    from parallel.pipeline_stages import StageModule, split_layers

    cfg = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                      num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, n_routed_experts=4,
                      num_experts_per_tok=2, n_group=1, topk_group=1, q_lora_rank=16, kv_lora_rank=16,
                      qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_nextn_predict_layers=1)
    model = Transformer(cfg)
    layout = split_layers(2, 2)
    first, last = (StageModule(model, s, 2, layout[s], carry_embedding=True, local_mtp_embedding=False,
                               wire_dtype=torch.bfloat16) for s in range(2))
    tokens = torch.randint(0, 96, (2, 9))
    h, e = first(tokens[:, :-1], labels=tokens[:, 1:])
    assert h.dtype == e.dtype == torch.bfloat16
    ins, outs = last.io_shapes(2, 8)[0], first.io_shapes(2, 8)[1]
    assert [t.dtype for t in ins + outs] == [torch.bfloat16] * 4
    got = last(h, e, labels=tokens[:, 1:])
    want = last(h.float(), e.float(), labels=tokens[:, 1:])
    assert torch.equal(got, want) and got.dtype == torch.float32
    got.sum().backward()
    assert model.embed_tokens.weight.grad is not None
