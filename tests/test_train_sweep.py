"""One short multirun of tiny (-m, two learning rates, a profiled window, W&B offline) checks: two job
folders with their metrics, per-layer expert load, launches.jsonl (overrides, git commit); training.plot
writes valid PNGs from it; the profiler trace opens; W&B got the figures, the router-bias histogram and
the checkpoint artifact. Refusals: hydra.*, unknown +key, a sweep without -m."""
import json
import subprocess

import pytest
import torch

import train
from test_train_logging import wandb_records
from train_helpers import ROOT, build_corpus, read_metrics, run_train, train_env

STEPS = 4


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """`train.py -m optim.lr=1e-3,2e-3` on model=tiny (4 steps of 4 x 16 tokens): (base out_dir, process)."""
    root = tmp_path_factory.mktemp("sweep")
    corpus = build_corpus(root / "corpus")
    base = root / "runs"
    args = ["-m", "optim.lr=1e-3,2e-3", "model=tiny", "data=shards", f"data.train_dir={corpus['train_dir']}",
            f"data.val_dir={corpus['val_dir']}", f"data.tokenizer={corpus['tokenizer']}",
            f"model.vocab_size={corpus['vocab_size']}", "precision=fp32", f"train.steps={STEPS}",
            "train.seq_len=16", "train.global_batch=4", "data.shuffle_tokens=0", "train.device=cpu",
            "logging.every=1", "logging.wandb.mode=offline", "logging.wandb.artifacts=true", "eval.every=2",
            "eval.batches=1",
            "eval.batch_size=2", "checkpoint.every=0", "profile.steps=2:3", f"out_dir={base}"]
    env = {k: v for k, v in train_env().items() if k != "WANDB_MODE"}
    done = run_train(args, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return base, done


def test_multirun_writes_one_folder_per_job_with_metrics_and_launch_record(sweep):
    base, done = sweep
    assert "multirun job 0 (1 of 2): optim.lr=0.001" in done.stdout
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    for job, lr in ((0, 1e-3), (1, 2e-3)):
        records = read_metrics(base / str(job))
        assert [r["step"] for r in records] == list(range(1, STEPS + 1))
        assert max(r["lr"] for r in records) == pytest.approx(lr)
        assert "val_loss" in records[-1]
        n_moe = 3 + 1  # tiny: 4 layers, the first dense, + the MTP block
        for r in records:
            load = torch.tensor(r["expert_load"], dtype=torch.float64)
            assert load.shape == (n_moe, 16)
            # every token goes to 4 experts: 4 x 16 tokens per main layer, 4 x 15 in the MTP block
            assert load.sum(dim=1).tolist() == [4 * 16 * 4] * 3 + [4 * 15 * 4]
            expected = load.max(dim=1).values / load.mean(dim=1) - 1
            assert r["maxvio_layers"] == pytest.approx(expected.tolist(), abs=1e-4)
            assert r["maxvio"] == pytest.approx(max(r["maxvio_layers"]), abs=1e-4)
        launch = [json.loads(line) for line in (base / str(job) / "launches.jsonl").read_text().splitlines()]
        assert len(launch) == 1 and launch[0]["job"] == job
        assert f"optim.lr={lr}" in launch[0]["overrides"] and "-m" in launch[0]["argv"]
        if head.returncode == 0:
            assert launch[0]["git"]["commit"] == head.stdout.strip()
            assert isinstance(launch[0]["git"]["dirty"], bool)
    assert not (base / "metrics.jsonl").exists()


def test_plot_writes_valid_pngs(sweep):
    from PIL import Image

    from training.plot import main

    out = sweep[0] / "0"
    assert main([str(out)]) == 0
    names = {p.name for p in (out / "plots").iterdir()}
    assert names == {f"{n}.png" for n in ("loss", "lr", "grad_norm", "throughput", "maxvio", "expert_load")}
    for path in (out / "plots").iterdir():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as image:
            image.verify()
            assert min(image.size) >= 200


def test_profile_trace_opens(sweep):
    for job in (0, 1):
        traces = list((sweep[0] / str(job) / "profile").glob("trace_rank0_steps2-3.json"))
        assert len(traces) == 1
        events = json.loads(traces[0].read_text())["traceEvents"]
        names = {e.get("name", "") for e in events}
        assert any("aten::mm" in n or "aten::addmm" in n for n in names)
        assert all("ph" in e for e in events)


def test_wandb_gets_figures_bias_histogram_and_checkpoint_artifact(sweep):
    runs = list((sweep[0] / "0" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    media, artifacts = {}, []
    for record in wandb_records(runs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            for item in record.history.item:  # media are flattened: "plots/loss/_type": "image-file"
                key = item.key or "/".join(item.nested_key)
                if key.endswith("/_type"):
                    media.setdefault(key[:-len("/_type")], []).append(json.loads(item.value_json))
        elif kind == "artifact":
            artifacts.append((record.artifact.type, [f.path for f in record.artifact.manifest.contents]))
    for name in ("loss", "lr", "grad_norm", "throughput", "maxvio", "expert_load"):
        assert media[f"plots/{name}"] == ["image-file"] * 2  # validation at steps 2 and 4
    assert media["router_bias"] == ["histogram"] * 2
    assert len(artifacts) == 1 and artifacts[0][0] == "model"
    assert "meta.json" in artifacts[0][1]


@pytest.mark.parametrize("override, named", [
    ("hydra.run.dir=/tmp/x", "hydra.run.dir=/tmp/x: hydra.* overrides have no effect"),
    ("hydra/launcher=basic", "hydra/launcher=basic: hydra.* overrides have no effect"),
    ("+foo=1", "+foo=1: the job config has no key 'foo'"),
    ("++model.foo=1", "++model.foo=1: the job config has no key 'model.foo'"),
    ("optim.lr=1e-3,2e-3", "optim.lr=1e-3,2e-3 is a sweep; add -m"),
    ("profile.steps=4:2", "profile.steps='4:2': give A:B"),
])
def test_refused_with_one_line(override, named, capsys):
    assert train.main([override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err


def test_multirun_cfg_lists_each_job():
    from training.sweep import plan_jobs

    jobs = plan_jobs(["--multirun", "train.steps=1,2", "optim.lr=1e-3,2e-3", "out_dir=/tmp/s"])
    assert [j.overrides for j in jobs] == [[f"train.steps={s}", f"optim.lr={lr}", "out_dir=/tmp/s"]
                                           for s in (1, 2) for lr in (0.001, 0.002)]
    assert [j.cfg.out_dir for j in jobs] == [f"/tmp/s/{i}" for i in range(4)]
    assert [(j.cfg.train.steps, j.cfg.optim.lr) for j in jobs] == [(1, 1e-3), (1, 2e-3), (2, 1e-3), (2, 2e-3)]
