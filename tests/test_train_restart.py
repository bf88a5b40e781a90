"""A killed rank under `torchrun --max-restarts=1` (CPU, gloo, 2 ranks): one worker is SIGKILLed after a
checkpoint; the job restarts, resumes from the newest checkpoint and logs exactly the losses of an
uninterrupted 2-rank run. A restart whose world size does not divide train.global_batch is refused
with a message naming the world sizes that would work."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train_helpers import ROOT, build_corpus, job_args, read_metrics, train_env

TOTAL, EVERY = 12, 4
COMPARED = ("loss", "mtp_loss", "grad_norm", "lr", "tokens", "val_loss")


def torchrun(args, max_restarts: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={max_restarts}", "--monitor-interval=0.2", str(ROOT / "train.py"), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def workers(agent_pid: int):
    """Pids of the torchrun agent's child processes (its workers)."""
    out = []
    for task in Path(f"/proc/{agent_pid}/task").iterdir():
        out += [int(p) for p in (task / "children").read_text().split()]
    return out


def args(corpus, out_dir):
    return job_args(corpus, out_dir, f"train.steps={TOTAL}", f"checkpoint.every={EVERY}", "checkpoint.keep=3",
                    "eval.every=4", "parallel.timeout_s=30")


def test_killed_rank_restarts_and_resumes_exactly(tmp_path):
    corpus = build_corpus(tmp_path / "corpus")
    reference = torchrun(args(corpus, tmp_path / "reference"))
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out[-4000:]

    out_dir = tmp_path / "killed"
    job = torchrun(args(corpus, out_dir), max_restarts=1)
    first = out_dir / "checkpoints" / f"step_{EVERY}" / "meta.json"
    deadline = time.time() + 240
    while not first.is_file():
        assert job.poll() is None and time.time() < deadline, job.communicate()[0][-4000:]
        time.sleep(0.05)
    victims = workers(job.pid)
    assert len(victims) == 2
    os.kill(victims[1], signal.SIGKILL)
    killed_at = len(read_metrics(out_dir))
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 0, out[-4000:]
    assert killed_at < TOTAL
    assert "train.py: rank 0: a collective failed, another rank died or did not answer within " \
           "parallel.timeout_s=30 s" in out, out[-4000:]
    resumed = [line for line in out.splitlines() if "train.py: resumed from" in line]
    assert len(resumed) == 1, out[-4000:]
    newest_before_restart = resumed[0].split("resumed from ")[1].split(" (step")[0]
    assert Path(newest_before_restart).name.startswith("step_") and int(Path(newest_before_restart).name[5:]) >= EVERY
    ours, ref = read_metrics(out_dir), read_metrics(tmp_path / "reference")
    assert [r["step"] for r in ours] == [r["step"] for r in ref] == list(range(1, TOTAL + 1))
    for a, b in zip(ours, ref):
        for key in COMPARED:
            assert a.get(key) == b.get(key), (a["step"], key, a.get(key), b.get(key))


def test_restart_with_a_world_size_that_does_not_divide_the_batch():
    from training.config import ConfigError, compose_job, validate

    cfg = compose_job(["train.global_batch=16"])
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=3)
    assert "world sizes that divide it: 1, 2, 4, 8, 16" in str(err.value)
