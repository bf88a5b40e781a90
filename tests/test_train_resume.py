"""Exact resume (fp32, CPU): a run stopped by SIGTERM, or killed by SIGKILL after a checkpoint, then
resumed, logs the same losses bit for bit as an uninterrupted run; a corrupt newest checkpoint is
skipped with a warning; `model.load(out_dir)` gives the trained model."""
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from model import load
from train_helpers import build_corpus, job_args, read_metrics, run_train, start_train

TOTAL, STOP_AFTER, EVERY = 24, 6, 6
COMPARED = ("loss", "mtp_loss", "grad_norm", "lr", "maxvio", "balance_loss", "tokens", "val_loss", "val_bpb")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def args(corpus, out_dir):
    return job_args(corpus, out_dir, f"train.steps={TOTAL}", f"checkpoint.every={EVERY}", "checkpoint.keep=2")


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("reference")
    proc = run_train(args(corpus, out_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out_dir


def assert_same_run(out_dir: Path, reference: Path):
    ours, ref = read_metrics(out_dir), read_metrics(reference)
    assert [r["step"] for r in ours] == [r["step"] for r in ref] == list(range(1, TOTAL + 1))
    for a, b in zip(ours, ref):
        for key in COMPARED:
            assert a.get(key) == b.get(key), (a["step"], key, a.get(key), b.get(key))


def wait_for(predicate, proc, timeout=180):
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"train.py ended early ({proc.returncode}):\n{out}\n{err}")
        assert time.time() < deadline, "timed out waiting for the training run"
        time.sleep(0.02)


def newest_step(out_dir: Path) -> int:
    return max(int(p.name.split("_")[1]) for p in (out_dir / "checkpoints").glob("step_*") if p.name[5:].isdigit())


def test_reference_run_layout(reference):
    ckpts = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert ckpts == [f"step_{TOTAL - EVERY}", f"step_{TOTAL}"]
    assert (reference / "config.yaml").is_file() and (reference / "tokenizer" / "tokenizer.json").is_file()
    records = read_metrics(reference)
    assert records[-1]["val_loss"] < records[0]["loss"]


def test_sigterm_then_resume_is_exact(corpus, reference, tmp_path):
    out_dir = tmp_path / "run"
    proc = start_train(args(corpus, out_dir))
    metrics = out_dir / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= STOP_AFTER, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    stopped = newest_step(out_dir)
    assert STOP_AFTER <= stopped < TOTAL and "stopped by signal" in out
    resumed = run_train(args(corpus, out_dir))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {out_dir / 'checkpoints' / f'step_{stopped}'}" in resumed.stdout
    assert_same_run(out_dir, reference)


def test_sigkill_after_checkpoint_then_resume_is_exact(corpus, reference, tmp_path):
    out_dir = tmp_path / "run"
    proc = start_train(args(corpus, out_dir))
    first = out_dir / "checkpoints" / f"step_{EVERY}" / "meta.json"
    wait_for(first.is_file, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    killed_at = len(read_metrics(out_dir))
    assert killed_at < TOTAL
    resumed = run_train(args(corpus, out_dir))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout
    assert_same_run(out_dir, reference)


def test_corrupt_newest_checkpoint_is_skipped(corpus, reference, tmp_path):
    out_dir = tmp_path / "run"
    shutil.copytree(reference, out_dir)
    newest = out_dir / "checkpoints" / f"step_{TOTAL}"
    data_file = next(newest.glob("*.distcp"))
    data_file.write_bytes(data_file.read_bytes()[:100])
    (out_dir / "checkpoints" / "step_30").mkdir()  # no meta.json: incomplete
    proc = run_train(args(corpus, out_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"skipping corrupt checkpoint {newest}" in proc.stderr
    assert f"skipping incomplete checkpoint {out_dir / 'checkpoints' / 'step_30'}" in proc.stderr
    assert f"resumed from {out_dir / 'checkpoints' / f'step_{TOTAL - EVERY}'}" in proc.stdout
    assert_same_run(out_dir, reference)


def test_model_load_gives_the_trained_model(corpus, reference):
    from data.dataset import eval_batches
    from eval.scoring import token_nll

    model = load(reference)
    batches = list(eval_batches(Path(corpus["val_dir"]), 32, 4, max_batches=2))
    nll = torch.cat([token_nll(model, b).flatten() for b in batches])
    assert float(nll.double().mean()) == pytest.approx(read_metrics(reference)[-1]["val_loss"], rel=1e-6)
    step_model = load(reference / "checkpoints" / f"step_{TOTAL - EVERY}")
    assert not torch.equal(step_model.lm_head.weight, model.lm_head.weight)


def test_preemption_signal_with_async_and_wall_time_saves_resumes_exactly(corpus, reference, tmp_path):
    out_dir = tmp_path / "run"
    extra = ["checkpoint.async=true", "checkpoint.every=0", "checkpoint.every_minutes=0.0005", "checkpoint.keep=3"]
    proc = start_train(args(corpus, out_dir) + extra)
    metrics = out_dir / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= STOP_AFTER, proc)
    proc.send_signal(signal.SIGUSR1)  # checkpoint.signal's default, Slurm's preemption notice
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    stopped = newest_step(out_dir)
    assert STOP_AFTER <= stopped < TOTAL and f"stopped by signal SIGUSR1 after step {stopped}" in out
    assert out.count("checkpoint saved:") >= 3  # by wall time (checkpoint.every=0), then the stop's save
    assert not list((out_dir / "checkpoints").glob("*.tmp"))
    resumed = run_train(args(corpus, out_dir) + extra)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {out_dir / 'checkpoints' / f'step_{stopped}'}" in resumed.stdout
    assert "changed config" not in resumed.stdout
    assert sorted(p.name for p in (out_dir / "config_starts").iterdir()) == ["000.yaml", "001.yaml"]
    assert_same_run(out_dir, reference)
