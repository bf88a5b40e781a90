"""Output head + cross-entropy without kept logits (model/head_loss.py), against the plain path
`F.cross_entropy(F.linear(h, W).float(), labels)`: loss and gradients, chunking, ignored labels, what
is saved for backward, `lm_loss(fused_head_loss=...)` on whole models, and the precision setting."""
import pytest
import torch
import torch.nn.functional as F

import model.head_loss as head_loss
from model import ModelConfig, Transformer, lm_loss
from model.head_loss import head_cross_entropy

N, D, V = 50, 64, 300


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inputs(n=N, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (n,), generator=gen)
    labels[[3, 17]] = -100
    return torch.randn(n, D, generator=gen), torch.randn(V, D, generator=gen) * 0.1, labels


def loss_and_grads(fused, h, w, labels, bf16, chunk=None, grad_scale=0.3):
    """(loss, dh, dW) of the fused or plain path, the loss scaled by `grad_scale` before backward."""
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if fused:
            loss = head_cross_entropy(h, w, labels, chunk_tokens=chunk)
        else:
            loss = F.cross_entropy(F.linear(h, w).float(), labels)
    (loss * grad_scale).backward()
    return loss, h.grad, w.grad


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("chunk", [None, 7])
def test_equals_plain_cross_entropy(bf16, chunk):
    h, w, labels = inputs()
    loss, dh, dw = loss_and_grads(True, h, w, labels, bf16, chunk)
    ref_loss, ref_dh, ref_dw = loss_and_grads(False, h, w, labels, bf16)
    assert loss.dtype == torch.float32 and dh.dtype == dw.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert rel(dh, ref_dh) < 1e-6
    assert not dh[[3, 17]].any(), "ignored tokens get no gradient"
    if bf16 and chunk is not None:  # see test_chunked_bf16_weight_gradient_is_as_accurate_as_plain
        assert rel(dw, ref_dw) < 2 ** -7
    else:
        assert rel(dw, ref_dw) < 1e-6


def test_chunked_bf16_weight_gradient_is_as_accurate_as_plain():
    """Under bf16, the plain path rounds the head-weight gradient GEMM to bf16 once; with chunks, each
    chunk's GEMM is rounded to bf16 and the chunks are summed in fp32. Both are within bf16 rounding
    of the exact (fp64) product of the same bf16 operands."""
    h, w, labels = inputs(n=512)
    dw = loss_and_grads(True, h, w, labels, True, chunk=64)[2]
    ref_dw = loss_and_grads(False, h, w, labels, True)[2]
    valid = labels != -100
    logits = (h.bfloat16() @ w.bfloat16().t()).double()
    d = torch.softmax(logits, dim=1)
    d[torch.arange(len(labels))[valid], labels[valid]] -= 1
    d = (d * valid.unsqueeze(1) * 0.3 / valid.sum()).float().bfloat16().double()
    exact = d.t() @ h.bfloat16().double()
    assert rel(dw, exact) < 2 ** -8
    assert rel(dw, exact) < 1.25 * rel(ref_dw, exact)


def test_ignored_labels_and_errors():
    h, w, labels = inputs()
    everything_ignored = torch.full_like(labels, -100)
    assert head_cross_entropy(h, w, everything_ignored).isnan()
    assert F.cross_entropy(h @ w.t(), everything_ignored).isnan()
    custom = torch.where(labels == -100, 7, labels)
    custom[[3, 17]] = 5
    ours = head_cross_entropy(h, w, custom, ignore_index=5)
    torch.testing.assert_close(ours, F.cross_entropy(h @ w.t(), custom, ignore_index=5), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="hidden"):
        head_cross_entropy(h, w.t(), labels)
    with pytest.raises(ValueError, match="labels"):
        head_cross_entropy(h, w, labels[:-1])
    with pytest.raises(ValueError, match="chunk_tokens"):
        head_cross_entropy(h, w, labels, chunk_tokens=0)
    with pytest.raises(TypeError, match="same dtype"):
        head_cross_entropy(h.double(), w, labels)


def saved_bytes(fn, params):
    """Bytes of the storages autograd saves for backward, parameters excluded."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("fused", [True, False])
def test_keeps_the_head_input_not_the_logits(fused):
    h, w, labels = inputs()
    h.requires_grad_()
    w.requires_grad_()

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                head_cross_entropy(h, w, labels, chunk_tokens=16)
            else:
                F.cross_entropy(F.linear(h, w).float(), labels)

    per_token = saved_bytes(run, [w]) / N
    if fused:  # bf16 head input, int64 label (+ the 8-byte token count)
        assert per_token <= 2 * D + 8 + 8 / N
    else:  # at least the fp32 log-softmax output
        assert per_token >= 4 * V


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                first_k_dense_replace=1, num_attention_heads=2, n_routed_experts=4, n_group=2, topk_group=1,
                num_experts_per_tok=2, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
                v_head_dim=8, max_position_embeddings=64)
    base.update(kw)
    return ModelConfig(**base)


def model_grads(model, tokens, bf16, fused, per_loss):
    """lm_loss outputs and the gradients of loss + 0.3 mtp_loss; with `per_loss`, each loss runs its
    own backward (the gradients are summed in fp32 by autograd's accumulation into .grad)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = lm_loss(model, tokens, fused_head_loss=fused)
    losses = [out["loss"], 0.3 * out["mtp_loss"]] if per_loss else [out["loss"] + 0.3 * out["mtp_loss"]]
    losses = [loss for loss in losses if loss.requires_grad]
    for i, loss in enumerate(losses):
        loss.backward(retain_graph=i + 1 < len(losses))
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("bf16, mtp, tied, chunked", [(False, 1, False, True), (False, 0, True, True),
                                                      (True, 1, False, False), (True, 2, True, False)])
def test_lm_loss_fused_equals_plain(monkeypatch, bf16, mtp, tied, chunked):
    """Whole models, fp32 or bf16 autocast, with and without MTP, tied or separate head weight.

    Under bf16 autocast with MTP, the plain path sums the heads' weight gradients in bf16 (autocast
    casts the weight once and that bf16 copy accumulates the gradients of all heads), the fused path
    in fp32: its head-weight gradient is the plain path's with one backward per loss (each head's
    gradient on its own) and differs from the plain single backward by that bf16 rounding. Every
    other gradient is the plain path's. Under bf16, one chunk (the default up to CHUNK_ELEMENTS /
    vocab tokens) gives the plain path's per-head numbers exactly."""
    if chunked:
        monkeypatch.setattr(head_loss, "CHUNK_ELEMENTS", 5 * 96)
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(num_nextn_predict_layers=mtp, tie_word_embeddings=tied))
    model.set_balance_loss_weight(0.0)  # its gradient would be added once per backward
    assert (model.lm_head.weight is model.embed_tokens.weight) == tied
    tokens = torch.randint(0, 96, (2, 17))
    tokens[0, -1] = -100  # an ignored label in every loss (the last token is never an input)
    out, grads = model_grads(model, tokens, bf16, fused=True, per_loss=False)
    ref, ref_grads = model_grads(model, tokens, bf16, fused=False, per_loss=False)
    for key in ("loss", "mtp_loss"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-6, atol=0)
    assert (out["mtp_loss"] != 0) == (mtp > 0)
    assert grads.keys() == ref_grads.keys() and ("lm_head.weight" in grads) != tied
    head = "embed_tokens.weight" if tied else "lm_head.weight"
    for name in ref_grads:
        if name != head:
            assert rel(grads[name], ref_grads[name]) < 1e-6, name
    assert rel(grads[head], ref_grads[head]) < (2 ** -7 if bf16 and mtp else 1e-6)
    if not tied:  # with a tied head, the embedding's own gradient depends on the body's roundings
        per_head = model_grads(model, tokens, bf16, fused=False, per_loss=True)[1]
        assert rel(grads[head], per_head[head]) < 1e-6
    model.fused_head_loss = True
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        torch.testing.assert_close(lm_loss(model, tokens)["loss"], ref["loss"], rtol=1e-6, atol=0)


def test_precision_setting_reaches_the_model():
    from training.config import compose_job, model_config
    from training.build import build_model

    for overrides, expected in ((["precision=fp8"], True), (["precision=bf16"], False), (["precision=fp32"], False),
                                (["precision=fp8", "precision.fused_head_loss=false"], False),
                                (["precision=bf16", "precision.fused_head_loss=true"], True)):
        cfg = compose_job(overrides + ["model.num_hidden_layers=1", "model.num_nextn_predict_layers=0"])
        assert cfg.precision.fused_head_loss is expected, overrides
        assert build_model(cfg, model_config(cfg), torch.device("cpu")).fused_head_loss is expected, overrides


def test_head_logprobs_equal_full_logits_chunk_by_chunk():
    """Validation and evaluation score through `head_logprobs`: per-token log-probabilities and greedy
    flags equal those of the full [N, V] logits (fp64 reference), for any chunk size."""
    from model.head_loss import head_logprobs
    torch.manual_seed(0)
    h, w = torch.randn(37, 48), torch.randn(300, 48) * 0.3
    labels = torch.randint(0, 300, (37,))
    labels[:5] = (h[:5].double() @ w.double().t()).argmax(dim=1)
    ref = torch.log_softmax(h.double() @ w.double().t(), dim=1)
    for chunk in (None, 1, 8, 64):
        logprob, greedy = head_logprobs(h, w, labels, chunk_tokens=chunk)
        torch.testing.assert_close(logprob.double(), ref.gather(1, labels[:, None]).squeeze(1), rtol=0, atol=1e-5)
        assert torch.equal(greedy, ref.argmax(dim=1) == labels) and greedy[:5].all()


def test_validation_and_evaluation_build_no_full_logits(monkeypatch):
    """Scoring (validation's token NLL, continuation and window scoring, lm_loss without gradient)
    never makes a tensor of [B, S, V] logits: no tensor with the vocabulary as its last dimension is
    larger than one chunk of the head."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from eval.bpb import windows_nll
    from eval.scoring import score_continuations, token_nll

    class LargestLogits(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if (torch.is_tensor(t) and t.ndim and t.shape[-1] == vocab
                        and t.untyped_storage().data_ptr() not in weights):
                    self.largest = max(self.largest, t.numel())
            return out

    chunk = 8
    monkeypatch.setattr(head_loss, "CHUNK_ELEMENTS", chunk * 4096)
    torch.manual_seed(0)
    from model.summary import load_model_config
    model = Transformer(load_model_config("tiny", ["num_hidden_layers=2"])[0]).eval()
    vocab = model.cfg.vocab_size
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    tokens = torch.randint(0, vocab, (4, 33))
    calls = [lambda: token_nll(model, tokens),
             lambda: score_continuations(model, [(list(range(1, 20)), list(range(20, 30)))] * 4, 32),
             lambda: windows_nll(model, [(list(range(1, 33)), 16)] * 4),
             lambda: torch.no_grad()(lm_loss)(model, tokens)]
    for call in calls:
        with LargestLogits() as mode:
            call()
        assert 0 < mode.largest <= chunk * vocab
