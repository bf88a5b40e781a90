"""`torchrun --nproc_per_node=4 train.py parallel.ep=4 parallel.gpus_per_node=2` (2 simulated nodes,
hierarchical dispatch, gloo) trains like one process on the same global batches, logs the all-to-all
bytes, and its checkpoint resumes on one process (ep=1) with the same next losses."""
import shutil
import subprocess
import sys

import pytest

from train_helpers import ROOT, build_corpus, job_args, read_metrics, run_train, train_env

STEPS = 6
EXTRA = (f"train.steps={STEPS}", "train.global_batch=8", "train.micro_batch=2", "eval.every=3",
         "checkpoint.every=3", "optim.moments_dtype=fp32")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def _close(ours, ref, steps):
    by_step = {r["step"]: r for r in ref}
    assert [r["step"] for r in ours] == list(steps)
    for a in ours:
        b = by_step[a["step"]]
        for key in ("loss", "mtp_loss", "val_loss"):
            assert (key in a) == (key in b)
            if key in b:
                assert abs(a[key] - b[key]) < 1e-5, (a["step"], key, a[key], b[key])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), a["step"]
        assert a["tokens"] == b["tokens"] and a["maxvio"] == pytest.approx(b["maxvio"], abs=1e-6)


def test_expert_parallel_train_matches_one_process_and_resumes_on_one(corpus, tmp_path):
    single = run_train(job_args(corpus, tmp_path / "single", *EXTRA))
    assert single.returncode == 0, single.stdout + single.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
           str(ROOT / "train.py"), *job_args(corpus, tmp_path / "ep4", *EXTRA, "parallel.ep=4",
                                              "parallel.gpus_per_node=2")]
    ep = subprocess.run(cmd, cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    assert ep.returncode == 0, ep.stdout + ep.stderr
    ours, ref = read_metrics(tmp_path / "ep4"), read_metrics(tmp_path / "single")
    _close(ours, ref, range(1, STEPS + 1))
    assert all(r["a2a_internode_bytes"] > 0 and r["a2a_intranode_bytes"] > 0 for r in ours)
    assert "a2a_internode_bytes" not in ref[0]

    resumed = tmp_path / "ep1"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "ep4" / "checkpoints" / "step_3", resumed / "checkpoints" / "step_3")
    one = run_train(job_args(corpus, resumed, *EXTRA))
    assert one.returncode == 0, one.stdout + one.stderr
    assert "resumed from" in one.stdout
    _close(read_metrics(resumed), ours, range(4, STEPS + 1))
