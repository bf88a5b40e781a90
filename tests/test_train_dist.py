"""`torchrun --nproc_per_node=2 train.py`: two data-parallel ranks (gloo) train like one process that
accumulates the same two micro-batches (losses equal up to float summation order)."""
import subprocess
import sys

import pytest

from model import load
from train_helpers import ROOT, build_corpus, job_args, read_metrics, run_train, train_env

STEPS = 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def test_two_ranks_match_one_process(corpus, tmp_path):
    extra = (f"train.steps={STEPS}", "eval.every=3", "checkpoint.every=3")
    single = run_train(job_args(corpus, tmp_path / "single", *extra))
    assert single.returncode == 0, single.stdout + single.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           *job_args(corpus, tmp_path / "dp2", *extra)]
    dp = subprocess.run(cmd, cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    assert dp.returncode == 0, dp.stdout + dp.stderr
    assert "world 2 (dp 2)" in dp.stdout and "accumulation 1" in dp.stdout
    ours, ref = read_metrics(tmp_path / "dp2"), read_metrics(tmp_path / "single")
    assert [r["step"] for r in ours] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    for a, b in zip(ours, ref):
        assert ("val_loss" in a) == ("val_loss" in b) == (a["step"] % 3 == 0)
        for key in ("loss", "mtp_loss", "grad_norm", "val_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4), (a["step"], key)
        assert a["tokens"] == b["tokens"] and a["maxvio"] == pytest.approx(b["maxvio"], abs=1e-6)
    model = load(tmp_path / "dp2")
    assert model.cfg.hidden_size == 64
