"""Config errors: bad overrides exit at once with one line naming the setting and write nothing;
cross-field checks name the settings involved."""
import time

import pytest

from train_helpers import run_train
from training import config as job_config
from training.config import ConfigError, compose_job, validate


@pytest.mark.parametrize("override, named", [("train.stepz=3", "train.stepz"),
                                             ("model.n_group=3", "model.n_group"),
                                             ("precision=fp7", "precision/fp7")])
def test_bad_override_fails_fast_and_writes_nothing(tmp_path, override, named):
    out_dir = tmp_path / "run"
    start = time.perf_counter()
    proc = run_train([override, f"out_dir={out_dir}"], timeout=120)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "config error" in lines[0], proc.stderr
    assert not out_dir.exists()
    assert elapsed < 60


@pytest.mark.parametrize("overrides, world, named", [
    (["train.global_batch=10", "train.micro_batch=4"], 1, "train.global_batch (10) must be a multiple of train.micro_batch"),
    (["train.global_batch=8", "train.micro_batch=2"], 3, "train.micro_batch x data-parallel size = 2 x 3"),
    (["train.global_batch=10"], 4, "train.global_batch (10) must be a multiple of the data-parallel size 4"),
    (["train.seq_len=2048"], 1, "train.seq_len (2048) exceeds model.max_position_embeddings (1024)"),
    (["parallel.pp=2"], 2, "1F1B needs at least parallel.pp = 2 micro-batches"),
    (["parallel.pp=4", "parallel.schedule=zbv", "train.micro_batch=2"], 4,
     "model.num_hidden_layers (4) must be >= the number of pipeline stages"),
    (["parallel.pp=2", "train.micro_batch=4", "train.batch_ramp_start=8"], 2, "set train.batch_ramp_start=0"),
    (["parallel.ep=3"], 3, "model.n_routed_experts (16) must be divisible by parallel.ep (3)"),
    (["parallel.dp=2"], 1, "parallel.dp=2 but world size 1"),
    (["parallel.pp=2", "parallel.schedule=dualpipev", "parallel.stages_per_rank=3", "train.micro_batch=2"], 2,
     "exactly 2 stages per rank"),
    (["parallel.dispatcher=ring"], 1, "parallel.dispatcher='ring' is not allowed"),
    (["optim.decay_start_frac=0.9", "optim.decay_end_frac=0.5"], 1, "must be ordered"),
    (["logging.wandb.mode=sometimes"], 1, "logging.wandb.mode='sometimes'"),
    (["data=shards"], 1, "data=shards needs data.train_dir"),
    (["train.batch_ramp_start=64"], 1, "train.batch_ramp_start (64)"),
    (["precision=fp32", "precision.param_dtype=bf16"], 1, "precision.param_dtype=bf16 needs bf16 compute"),
    (["precision.param_dtype=fp16"], 1, "precision.param_dtype='fp16' is not allowed"),
    (["optim.offload=cpu"], 1, "set optim.moments_dtype=fp32 (got bf16)"),
    (["optim.offload=nvme"], 1, "optim.offload='nvme' is not allowed"),
])
def test_cross_field_checks(overrides, world, named):
    cfg = compose_job(overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world)
    assert named in str(err.value)


def test_fp8_needs_its_module(monkeypatch):
    cfg = compose_job(["precision=fp8"])
    monkeypatch.setattr(job_config.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="precision=fp8 needs model/fp8.py"):
        validate(cfg, 1)


def test_defaults_validate_and_two_ranks_share_the_batch():
    cfg = compose_job([])
    mcfg = validate(cfg, 1)
    assert (cfg.model.hidden_size, mcfg.vocab_size, cfg.data.name, cfg.precision.name) == (256, 4096, "stdlib", "bf16")
    assert job_config.data_parallel_size(compose_job(["train.global_batch=32"]), 2) == 2


def test_null_micro_batch_is_each_ranks_whole_share():
    cfg = compose_job(["parallel.ep=2"])
    validate(cfg, 4)
    assert cfg.train.micro_batch is None and cfg.train.global_batch == 16
    assert job_config.micro_batch_size(cfg, 4) == 4 and job_config.batch_unit(cfg, 4) == 4
    explicit = compose_job(["train.micro_batch=2"])
    validate(explicit, 4)
    assert job_config.micro_batch_size(explicit, 4) == 2 and job_config.batch_unit(explicit, 4) == 8
