"""Host synchronizations of the FP8 path (DeepSeek-V3 section 3.3 run on a GPU that never waits for the CPU).

A torch function mode counts every call that makes the host wait for a CUDA device: reading values
(`.item()`, `.tolist()`, `.cpu()`, `.numpy()`, `bool/int/float(tensor)`), copying Python data to
the device (`torch.tensor(list)`), and operations whose output size depends on values (`nonzero`,
`bincount`, `unique`, `masked_select`, boolean-mask indexing, `repeat_interleave` with tensor
repeats and no `output_size`, `.to("cpu")`). The FP8 layers run on the CPU with the Triton backend and the
kernel launches recorded instead of run (`kernels.triton.launch.recording`), so the host code is
exactly the GPU path's. One MoE layer's forward and backward may synchronize at most once (the
token counts an all-to-all needs; none on one process); a dense FP8 layer never.
"""
import collections
from pathlib import Path

import torch
import yaml
from torch.overrides import TorchFunctionMode

from kernels import ops
from kernels.triton.launch import recording
from model import ModelConfig
from model.block import Block
from model.fp8 import apply_fp8
from model.rope import RotaryEmbedding

ROOT = Path(__file__).resolve().parents[1]
READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero",
         "bincount", "unique", "unique_consecutive", "masked_select", "argwhere"}


class SyncCounter(TorchFunctionMode):
    """Counts calls that synchronize with a CUDA device, by name."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in READS:
            self.calls[name] += 1
        elif name == "tensor" and args and isinstance(args[0], (list, tuple, int, float)):
            self.calls["torch.tensor(python data)"] += 1
        elif name == "repeat_interleave" and len(args) > 1 and isinstance(args[1], torch.Tensor) \
                and kwargs.get("output_size") is None:
            self.calls["repeat_interleave without output_size"] += 1
        elif name == "__getitem__" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                           for i in (args[1] if isinstance(args[1], tuple) else (args[1],))):
            self.calls["boolean-mask indexing"] += 1
        elif name == "to" and any(isinstance(a, str) and a == "cpu" for a in list(args[1:]) + list(kwargs.values())):
            self.calls["to(cpu)"] += 1
        return func(*args, **kwargs)


def tiny_config(**overrides) -> ModelConfig:
    values = yaml.safe_load((ROOT / "configs/model/tiny.yaml").read_text())
    values.update(overrides)
    return ModelConfig.from_dict(values)


def count_layer_syncs(layer_idx: int) -> collections.Counter:
    """Syncs of one FP8 block's forward and backward (bf16 autocast, Triton backend, launches recorded)."""
    cfg = tiny_config(num_hidden_layers=2)
    block = apply_fp8(Block(cfg, layer_idx))
    rope = RotaryEmbedding(cfg)(64)
    x = torch.randn(2, 64, cfg.hidden_size, requires_grad=True)
    counter = SyncCounter()
    with ops.use_backend("triton"), recording() as launches, torch.autocast("cpu", torch.bfloat16), counter:
        block(x, rope).float().sum().backward()
    assert launches, "the FP8 kernels were not reached"
    return counter.calls


def test_dense_fp8_layer_never_synchronizes():
    calls = count_layer_syncs(0)
    assert sum(calls.values()) == 0, f"dense FP8 layer synchronizes: {dict(calls)}"


def test_moe_fp8_layer_synchronizes_at_most_once():
    calls = count_layer_syncs(1)
    assert sum(calls.values()) <= 1, f"MoE FP8 layer synchronizes {sum(calls.values())} times: {dict(calls)}"


def test_counter_sees_the_synchronizing_calls():
    counter = SyncCounter()
    x = torch.arange(6)
    with counter:
        x.sum().item(), x.tolist(), x.nonzero(), torch.bincount(x), x[x > 2], torch.tensor([1, 2])
        torch.repeat_interleave(x, x), bool(x[1] > 0), x.cpu()
    assert sum(counter.calls.values()) == 9, dict(counter.calls)
