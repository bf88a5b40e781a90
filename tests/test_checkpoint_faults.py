"""Checkpoint faults in one process: silent corruption caught by checksums, an unreadable file
(DCP's CheckpointException, a BaseException) skipped, a full disk failing one save with older
checkpoints intact, asynchronous saves writing the state of the moment they were called, and the
resumed config compared with the saved one."""
import errno
import json
import warnings
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemWriter

from training import checkpoint
from training.checkpointer import Checkpointer
from training.config import ConfigError
from training.run_config import check_resume, keep_config


def state(value: float):
    return {"model": {"w": torch.full((64, 256), value), "b": torch.arange(8.0) + value},
            "optim": {"m": torch.full((64,), -value)}, "train": {"step": torch.tensor(int(value))}}


def empty():
    return {"model": {"w": torch.zeros(64, 256), "b": torch.zeros(8)}, "optim": {"m": torch.zeros(64)}}


def load(out_dir: Path):
    target = empty()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = checkpoint.load_latest(out_dir, target)
    return found, target, [str(w.message) for w in caught]


def save_steps(out_dir: Path, *steps: int, keep: int = 3):
    for s in steps:
        checkpoint.write(out_dir, s, state(float(s)), {"hidden_size": 8}, {}, keep=keep)


def test_checksums_catch_a_same_size_overwrite(tmp_path):
    save_steps(tmp_path, 1, 2)
    newest = checkpoint.step_dir(tmp_path, 2)
    meta = json.loads((newest / "meta.json").read_text())
    assert set(meta["files"]) == {".metadata", "__0_0.distcp", "model_config.json"}
    assert all(len(e["sha256"]) == 64 for e in meta["files"].values())
    largest = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(4096)  # same size, weights silently changed
    largest.write_bytes(bytes(data))
    (found, train), target, warned = load(tmp_path)
    assert found == checkpoint.step_dir(tmp_path, 1) and int(train["step"]) == 1
    assert torch.equal(target["model"]["w"], state(1.0)["model"]["w"])
    assert any(f"skipping corrupt checkpoint {newest}: {largest.name} does not match its checksum" in w
               for w in warned), warned


def test_reader_exception_falls_back_and_names_the_file(tmp_path):
    save_steps(tmp_path, 1, 2)
    newest = checkpoint.step_dir(tmp_path, 2)
    meta = json.loads((newest / "meta.json").read_text())
    for entry in meta["files"].values():
        del entry["sha256"]  # a checkpoint without checksums: only DCP's reader can notice
    (newest / "meta.json").write_text(json.dumps(meta))
    data_file = next(newest.glob("*.distcp"))
    data = bytearray(data_file.read_bytes())
    data[:200] = bytes(200)
    data_file.write_bytes(bytes(data))
    (found, _), target, warned = load(tmp_path)
    assert found == checkpoint.step_dir(tmp_path, 1)
    assert torch.equal(target["optim"]["m"], state(1.0)["optim"]["m"])
    assert any(f"skipping corrupt checkpoint {newest}: loading failed" in w and data_file.name in w for w in warned)


def test_every_checkpoint_corrupt_means_a_fresh_start(tmp_path):
    save_steps(tmp_path, 1)
    (checkpoint.step_dir(tmp_path, 1) / ".metadata").write_bytes(b"garbage")
    found, _, warned = load(tmp_path)
    assert found is None and any(".metadata has 7 bytes" in w for w in warned)


class FullDiskWriter(FileSystemWriter):
    def write_data(self, plan, planner):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_fails_the_save_once_and_keeps_older_checkpoints(tmp_path):
    save_steps(tmp_path, 1, 2, keep=2)
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.write(tmp_path, 3, state(3.0), {}, {}, keep=2, make_writer=FullDiskWriter)
    message = str(err.value)
    assert "\n" not in message and "checkpoint step_3 was not saved" in message
    assert "No space left on device" in message and "older checkpoints are intact (step_1, step_2)" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_1", "step_2"]
    (found, _), target, warned = load(tmp_path)
    assert found == checkpoint.step_dir(tmp_path, 2) and not warned


def test_async_save_writes_the_state_of_the_call(tmp_path, monkeypatch):
    saved = []
    ckpt = Checkpointer(tmp_path, keep=2, asynchronous=True, pin_memory=False,
                        on_saved=lambda path, seconds: saved.append(path.name))
    live = state(1.0)
    ckpt.save(1, live, {}, {})
    live["model"]["w"].add_(100.0)  # training goes on while the write is in flight
    ckpt.save(2, live, {}, {})  # waits for step 1 first
    live["model"]["w"].add_(100.0)
    ckpt.wait()
    assert saved == ["step_1", "step_2"]
    (found, _), target, _ = load(tmp_path)
    assert found.name == "step_2" and torch.equal(target["model"]["w"], state(1.0)["model"]["w"] + 100.0)
    real = checkpoint.write
    monkeypatch.setattr(checkpoint, "write", lambda *a, **k: real(*a, **k, make_writer=FullDiskWriter))
    ckpt.save(3, state(3.0), {}, {})  # returns at once; the failure surfaces at the next wait
    with pytest.raises(checkpoint.CheckpointError, match="step_3 was not saved"):
        ckpt.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_1", "step_2"]


def test_config_comparison(tmp_path):
    from training.config import compose_job
    from omegaconf import OmegaConf

    def cfg(*overrides):
        return OmegaConf.to_container(compose_job(list(overrides)), resolve=True)

    saved = cfg()
    assert check_resume(saved, cfg("out_dir=elsewhere"), Path("ck")) is None
    warning = check_resume(saved, cfg("optim.lr=1e-3", "data.fim_rate=0.5"), Path("ck"))
    assert warning == "warning: resuming ck with a changed config: data.fim_rate 0.1 -> 0.5, optim.lr 0.003 -> 0.001"
    with pytest.raises(ConfigError) as err:
        check_resume(saved, cfg("model.hidden_size=128", "model.rope_theta=500.0", "optim.lr=1e-3"), Path("ck"))
    assert str(err.value) == ("ck was saved with other parameter shapes: model.hidden_size 256 -> 128; "
                              "resume with the saved values or use another out_dir")
    assert keep_config(tmp_path, "a: 1\n").name == "000.yaml"
    assert keep_config(tmp_path, "a: 2\n").name == "001.yaml"
    assert (tmp_path / "config_starts" / "000.yaml").read_text() == "a: 1\n"
    assert (tmp_path / "config.yaml").read_text() == "a: 2\n"


def test_optional_entries(tmp_path):
    save_steps(tmp_path, 1)
    without = empty()
    found = checkpoint.load_latest(tmp_path, without, optional=("ema",))  # neither side has an EMA
    assert found is not None and "ema" not in without
    with_ema = {**empty(), "ema": {"w": torch.zeros(64, 256)}}
    found = checkpoint.load_latest(tmp_path, with_ema, optional=("ema",))  # the checkpoint has none
    assert found is not None and "ema" not in with_ema and torch.equal(with_ema["model"]["b"], state(1.0)["model"]["b"])
