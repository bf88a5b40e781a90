"""The CUDA paths of start-up, checked on CPU with torch.cuda and torch.distributed stubbed: the GPU a
rank picks (one visible GPU per rank or all of them), CUDA initialized on it before any DeviceMesh,
the process group's timeout and bound device, and every mesh group connected when built."""
from types import SimpleNamespace

import pytest
import torch

from parallel import mesh
from training import distributed
from training.config import ConfigError, compose_job, validate


@pytest.mark.parametrize("local_rank, count, index", [(0, 1, 0), (5, 1, 0), (3, 8, 3), (0, 8, 0)])
def test_cuda_index(local_rank, count, index):
    assert distributed.cuda_index(local_rank, count) == index


def test_cuda_index_names_the_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=3 but this process sees 2 GPUs \(CUDA_VISIBLE_DEVICES=0,1\)"):
        distributed.cuda_index(3, 2)


@pytest.fixture(autouse=True)
def no_rendezvous(monkeypatch):
    """init_process_group is stubbed below; so are torchrun's store and the checkpoint group."""
    monkeypatch.setattr(distributed, "_store", lambda rank, world, timeout: None)
    monkeypatch.setattr(distributed.dist, "new_group", lambda **kw: "checkpoint group")


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as a process that sees one GPU; records set_device and init."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(torch.cuda, "init", lambda: calls.append(("init",)))
    return calls


def test_one_visible_gpu_per_rank(fake_cuda, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    got = {}
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: got.update(kw))
    d = distributed.init_distributed("auto", timeout_s=42)
    assert d.device == torch.device("cuda", 0) and (d.rank, d.local_rank, d.world) == (3, 3, 4)
    assert fake_cuda == [("set_device", 0), ("init",)]  # initialized: DeviceMesh will not pick LOCAL_RANK's GPU
    assert got["backend"] == "nccl" and got["device_id"] == torch.device("cuda", 0)
    assert got["timeout"].total_seconds() == 42


def test_cpu_process_group_gets_the_timeout_and_no_device(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    got = {}
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: got.update(kw))
    distributed.init_distributed("cpu", timeout_s=7.5)
    assert got["backend"] == "gloo" and got["device_id"] is None and got["timeout"].total_seconds() == 7.5


def test_timeout_setting_is_checked():
    assert compose_job([]).parallel.timeout_s == 600
    with pytest.raises(ConfigError, match="parallel.timeout_s must be > 0"):
        validate(compose_job(["parallel.timeout_s=0"]), 1)


def test_every_mesh_group_is_connected_once(monkeypatch):
    pp, dense = object(), object()
    layout = SimpleNamespace(pp_group=pp, dp_group=dense, ep_group=None, dense_grad_group=dense)
    seen = []
    monkeypatch.setattr(mesh.dist, "all_reduce", lambda t, group: seen.append((group, t.device, t.numel())))
    mesh.connect_groups(layout, "cpu")
    assert seen == [(pp, torch.device("cpu"), 1), (dense, torch.device("cpu"), 1)]


def test_one_process_under_torchrun_gets_a_process_group(monkeypatch):
    got = {}
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: got.update(kw))
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    distributed.init_distributed("cpu")
    assert got == {}  # plain `python train.py`: no process group
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert distributed.init_distributed("cpu").world == 1 and got["backend"] == "gloo"
