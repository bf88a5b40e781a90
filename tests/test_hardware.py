"""MFU's peak table and override, the memory metrics on CPU, deterministic mode, and a model without
MoE layers keeping its expert-load tensor on the model's device (what NCCL all-reduces)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.config import ModelConfig
from model.transformer import Transformer
from training import hardware
from training.hardware import PEAK_TFLOPS, device_kind, memory_metrics, peak_tflops

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, kind", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200"), ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA H800", "H800 SXM"),
    ("NVIDIA H800 PCIe", "H800 PCIe"), ("NVIDIA B200", "B200"), ("NVIDIA GB200", "GB200"),
    ("NVIDIA A100-SXM4-80GB", None), ("Tesla V100", None)])
def test_device_names(name, kind):
    assert device_kind(name) == kind


def test_fp8_peaks_are_twice_bf16_and_every_device_has_each_precision():
    for kind, peaks in PEAK_TFLOPS.items():
        assert set(peaks) == {"bf16", "fp8", "fp32"}, kind
        assert peaks["fp8"] == pytest.approx(2 * peaks["bf16"], rel=1e-3), kind
    assert PEAK_TFLOPS["H100 SXM"]["bf16"] == 989.4 and PEAK_TFLOPS["B200"]["fp8"] == 4500.0


def test_peak_on_a_gpu_by_precision_and_override(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    gpu = torch.device("cuda", 0)
    assert peak_tflops(gpu, "bf16") == 756.0 and peak_tflops(gpu, "fp8") == 1513.0
    assert peak_tflops(gpu, "fp8", override=1000) == 1000.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert peak_tflops(gpu, "bf16") is None and peak_tflops(gpu, "bf16", override=312) == 312.0


def test_cpu_peak_scales_with_threads():
    assert peak_tflops(torch.device("cpu"), "fp32", threads=2) == pytest.approx(0.2)
    assert peak_tflops(torch.device("cpu"), "bf16", threads=4) == pytest.approx(1.8)


def test_cpu_memory_metric_is_the_peak_rss():
    code = ("import torch; from training.hardware import memory_metrics, peak_rss_gib\n"
            "block = torch.ones(768 << 20, dtype=torch.uint8); del block\n"
            "now = int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS:')).split()[1]) / 2**20\n"
            "print(list(memory_metrics(torch.device('cpu')).items())[0][1], now)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    peak, now = map(float, proc.stdout.split())
    assert peak > 0.75 and now < peak - 0.5  # the 768 MiB block was freed, its peak stays


def test_cuda_memory_metrics_read_and_reset_the_allocator_peaks(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 3 << 30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d: 5 << 29)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: calls.append(d))
    got = memory_metrics(torch.device("cuda", 0))
    assert got == {"mem_peak_gib": 3.0, "mem_reserved_gib": 2.5} and calls == [torch.device("cuda", 0)]


def test_deterministic_switch(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    hardware.use_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    try:
        hardware.use_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


def test_model_without_moe_keeps_expert_load_on_its_device():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                      num_hidden_layers=2, first_k_dense_replace=2, num_attention_heads=2, q_lora_rank=None,
                      kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                      n_group=1, topk_group=1, num_experts_per_tok=2, num_nextn_predict_layers=0)
    model = Transformer(cfg).to("meta")
    assert model.moe_layers() == [] and model.expert_load().device.type == "meta"
