"""Zero-bubble pipeline schedules (zbv, dualpipev) split each stage's backward into an input step and
a weight step with torch's stage_backward_input / stage_backward_weight. Under FP8 every backward
GEMM must still run once (and each MLA recompute once), with the gradients of a plain backward, and
gradient hooks (fp32 accumulation of bf16 parameters) must see each parameter's gradient once."""
import pytest
import torch
from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

from kernels import linear, ops
from model.config import ModelConfig
from model.fp8 import apply_fp8
from model.mla import MLA
from model.transformer import Transformer
from parallel.pipeline_stages import StageModule

CFG = ModelConfig(vocab_size=64, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
                  num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=2, n_routed_experts=4,
                  num_experts_per_tok=2, n_group=1, topk_group=1, q_lora_rank=128, kv_lora_rank=128,
                  qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32, num_nextn_predict_layers=0)


@pytest.fixture
def counted(monkeypatch):
    """Counts of FP8 GEMM calls by kind, and of MLA attention (re)computations."""
    counts = {"gemm": 0, "grouped": 0, "mla": 0}
    for name, key in (("fp8_gemm", "gemm"), ("fp8_gemm_grouped_m", "grouped"), ("fp8_gemm_grouped_k", "grouped")):
        original = getattr(ops, name)

        def wrapper(*args, _original=original, _key=key, **kwargs):
            counts[_key] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(ops, name, wrapper)
    attend = MLA.attend

    def counting_attend(self, *args, **kwargs):
        counts["mla"] += 1
        return attend(self, *args, **kwargs)
    monkeypatch.setattr(MLA, "attend", counting_attend)
    return counts


def _middle_stage():
    torch.manual_seed(0)
    model = apply_fp8(Transformer(CFG))  # stage 1 of 3: a dense block in, MoE block [1] out
    return StageModule(model, 1, 3, [1], carry_embedding=False, local_mtp_embedding=False)


def _run(stage, counts, split, phases):
    """Forward + backward (plain, or split as the zero-bubble schedules do); returns the GEMM counts,
    the input gradient, and per parameter the sum of the gradients its hooks saw (what fp32
    accumulation of bf16 parameters adds up) and its .grad."""
    x = torch.randn(2, 128, 128, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    grad_out = torch.randn(2, 128, 128, generator=torch.Generator().manual_seed(2))
    seen = {}
    handles = []
    for name, p in stage.named_parameters():
        p.grad = None
        handles.append(p.register_hook(lambda g, name=name: seen.__setitem__(name, seen.get(name, 0) + g)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = stage(x, labels=None)
    before = dict(counts)
    if not split:
        h.backward(grad_out)
    else:
        params = list(stage.parameters())
        with linear.backward_phase("input") if phases else torch.enable_grad():
            _, groups = stage_backward_input([h], [grad_out], [x], iter(params))
        with linear.backward_phase("weight") if phases else torch.enable_grad():
            stage_backward_weight(iter(params), groups)
    used = {k: counts[k] - before[k] for k in counts}
    for h in handles:
        h.remove()
    grads = {n: p.grad.clone() for n, p in stage.named_parameters() if p.grad is not None}
    return used, x.grad.clone(), grads, seen


def test_split_backward_runs_every_fp8_gemm_once(counted):
    stage = _middle_stage()
    full, dx_full, grads_full, seen_full = _run(stage, counted, split=False, phases=False)
    split, dx_split, grads_split, seen_split = _run(stage, counted, split=True, phases=True)
    # plain backward: Dgrad + Wgrad of MLA's 4 projections and o_proj (10) plus the 4 projections'
    # Fprop GEMMs of the one MLA recompute (14); 4 grouped GEMMs per SwiGLU (routed and shared experts)
    assert full == {"gemm": 14, "grouped": 8, "mla": 1}
    assert split == full
    torch.testing.assert_close(dx_split, dx_full, rtol=0, atol=0)
    assert grads_split.keys() == grads_full.keys()
    for name, g in grads_full.items():
        torch.testing.assert_close(grads_split[name], g, rtol=1e-6, atol=1e-9, msg=name)
        torch.testing.assert_close(seen_split[name], g, rtol=1e-6, atol=1e-9, msg=f"hooks of {name}")


def test_without_phases_torch_runs_the_fp8_backward_twice(counted):
    stage = _middle_stage()
    full = _run(stage, counted, split=False, phases=False)[0]
    doubled = _run(stage, counted, split=True, phases=False)[0]
    # every grouped GEMM and o_proj's Dgrad + Wgrad run twice; the MLA recompute (parameters not
    # inputs of its node) runs once either way
    assert doubled == {"gemm": full["gemm"] + 2, "grouped": 2 * full["grouped"], "mla": full["mla"]}
