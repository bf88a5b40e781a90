"""`optim.offload=cpu` through the trainer (fp32, a small model, 20 steps at lr 3e-3).

The offloaded run (fp32 master weights and moments in host memory, DeepSpeed's CPU Adam doing the
step, as the banner says) follows the run without offload within 1e-4 relative in loss and
validation loss (measured: 4e-8; the two AdamW kernels round differently). A checkpoint written with
offload resumes without it and one written without offload resumes with it, each following the
run that wrote it within 1e-6. The first offloaded run builds DeepSpeed's op into
`.cache/torch_extensions` when it is not there yet (about 90 s); the others reuse it.
"""
import pytest

from train_helpers import assert_losses_close, build_corpus, copy_checkpoint, job_args, read_metrics, run_train

STEPS, EVERY = 20, 10
JOB = (f"train.steps={STEPS}", "optim.moments_dtype=fp32", "eval.every=10", f"checkpoint.every={EVERY}")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def train(corpus, out_dir, offload: str) -> str:
    proc = run_train(job_args(corpus, out_dir, *JOB, f"optim.offload={offload}"), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_offload_follows_plain_adamw_and_resumes_both_ways(corpus, tmp_path):
    out = train(corpus, tmp_path / "cpu", "cpu")
    assert "optimizer CPUAdamW (DeepSpeedCPUAdam), fp32 master weights in host memory" in out, out
    assert "optimizer AdamW" in train(corpus, tmp_path / "none", "none")
    offloaded, plain = read_metrics(tmp_path / "cpu"), read_metrics(tmp_path / "none")
    assert_losses_close(offloaded, plain, range(1, STEPS + 1), "offload vs none", rel=1e-4)

    for src, dst in (("cpu", "none"), ("none", "cpu")):
        resumed = copy_checkpoint(tmp_path / src, EVERY, tmp_path / f"{src}_to_{dst}")
        assert "resumed from" in train(corpus, resumed, dst)
        assert_losses_close(read_metrics(resumed), read_metrics(tmp_path / src), range(EVERY + 1, STEPS + 1),
                            f"{src} -> {dst}", rel=1e-6)
