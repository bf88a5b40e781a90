"""FP8 weights quantized once per optimizer step (kernels/weights.py, DeepSeek-V3 section 3.3).

Two micro-batches' forward and backward quantize each weight once; an optimizer step invalidates the
cache, and the outputs after the step equal those of a model built with the updated weights.
"""
import torch
from torch import nn

from kernels import fp8, weights
from model.fp8 import apply_fp8
from model.moe import MLP


def _model() -> nn.Module:
    torch.manual_seed(0)
    return apply_fp8(nn.ModuleDict({"proj": nn.Linear(256, 256, bias=False), "mlp": MLP(256, 384)}))


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model["mlp"](model["proj"](x))


def test_weights_quantized_once_per_optimizer_step():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs = [torch.randn(2, 8, 256) for _ in range(3)]
    start = weights.quantizations
    for x in xs[:2]:
        _run(model, x).square().sum().backward()
    assert weights.quantizations - start == 3, "proj, gate/up and down: once each for both micro-batches"
    opt.step()
    after_step = _run(model, xs[2])
    assert weights.quantizations - start == 6, "the step invalidates the cached FP8 weights"
    fresh = _model()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(_run(fresh, xs[2]), after_step), "outputs after the step use the updated weights"


def test_cached_weight_and_transposed_copy_are_the_quantized_weight():
    w = nn.Parameter(torch.randn(300, 200))
    cached = weights.fp8_weight(w, True)
    q, s = fp8.quantize_128x128(w.detach(), True)
    assert torch.equal(cached.data.view(torch.uint8), q.view(torch.uint8)) and torch.equal(cached.scale, s)
    assert torch.equal(cached.data_t.view(torch.uint8), q.t().contiguous().view(torch.uint8))
    assert torch.equal(cached.scale_t, s.t()) and cached.data_t.is_contiguous()
    assert weights.fp8_weight(w, True) is cached
    with torch.no_grad():
        w.mul_(2)
    assert weights.fp8_weight(w, True) is not cached, "an in-place change invalidates the cache"
    w.data.mul_(2)
    stale = weights.fp8_weight(w, True)
    weights.new_weights()
    assert weights.fp8_weight(w, True) is not stale, "new_weights() invalidates changes made through .data"
