"""`precision.fp8_backend` (kernels/ops.py): FP8 never falls back silently where it cannot run."""
import pytest
import torch

from kernels import ops


def test_auto_on_a_gpu_without_fp8_tensor_cores_names_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(RuntimeError, match=r"A100-SXM4-80GB \(sm_80\) has no FP8 tensor cores"):
        ops.set_backend("auto", torch.device("cuda", 0))


def test_auto_on_a_gpu_where_triton_does_not_import_names_the_cause(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(ops, "triton_import_error", lambda: "ImportError: libcuda.so.1 missing")
    with pytest.raises(RuntimeError, match="H100 80GB HBM3: ImportError: libcuda.so.1 missing"):
        ops.set_backend("auto", torch.device("cuda", 0))


def test_backend_choices_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="fp8_backend=triton on cpu"):
        ops.set_backend("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="fp8_backend must be one of"):
        ops.set_backend("fast", torch.device("cpu"))
    try:
        ops.set_backend("reference", torch.device("cpu"))
        assert ops._impl(torch.zeros(1)) is ops.reference
    finally:
        ops.set_backend("auto", torch.device("cpu"))
    assert ops._impl(torch.zeros(1)) is ops.reference, "auto runs the reference on CPU tensors"
