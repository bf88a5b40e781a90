"""EMA of the weights (train.ema_decay): equal to an fp64 average of the weights after each applied
step, saved in checkpoints, restored on resume, and used by `model.load(ema=True)`,
`python -m eval DIR --ema` and `python -m model.hf export --ema`."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from model import load
from train_helpers import ROOT, build_corpus, job_args, train_env
from training.config import compose_job, validate
from training.distributed import init_distributed
from training.inputs import prepare_inputs
from training.loop import Trainer

DECAY, STEPS = 0.75, 5


def trainer_for(corpus, out_dir, *extra):
    cfg = compose_job(job_args(corpus, out_dir, f"train.ema_decay={DECAY}", "checkpoint.async=false", *extra))
    mcfg = validate(cfg, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, mcfg, init_distributed("cpu"), prepare_inputs(cfg, mcfg))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ema")
    corpus = build_corpus(root / "corpus")
    trainer = trainer_for(corpus, root / "run")
    params = dict(trainer.model.named_parameters())
    reference = {n: p.detach().double().clone() for n, p in params.items()}
    for _ in range(STEPS):
        assert not trainer.step().skipped
        for n, p in params.items():
            reference[n] = DECAY * reference[n] + (1 - DECAY) * p.detach().double()
    trainer.save()
    trainer.checkpointer.close()
    trainer.inputs.tokenizer.save(root / "run" / "tokenizer")  # as train.py does
    average = {n: t.clone() for n, t in trainer.ema.state_dict().items()}
    weights = {n: p.detach().clone() for n, p in params.items()}
    trainer.ema.close()
    return corpus, root / "run", reference, average, weights


def test_ema_matches_an_fp64_average_of_the_weights(trained):
    _, _, reference, average, weights = trained
    for name, ref in reference.items():
        torch.testing.assert_close(average[name].double(), ref, rtol=0, atol=1e-6)
    moved = [n for n in weights if not torch.equal(weights[n], average[n])]
    assert len(moved) > len(weights) // 2  # the EMA is not the weights


def test_checkpoint_holds_the_ema_and_resume_restores_it(trained):
    corpus, out_dir, _, average, weights = trained
    ema_model = load(out_dir, ema=True)
    plain = load(out_dir)
    for name, p in ema_model.named_parameters():
        assert torch.equal(p, average[name]), name
        assert torch.equal(dict(plain.named_parameters())[name], weights[name])
    resumed = trainer_for(corpus, out_dir)
    assert resumed.resume() is not None
    for name, avg in resumed.ema.state_dict().items():
        assert torch.equal(avg, average[name]), name
    resumed.ema.close()


def test_eval_and_export_use_the_ema(trained, tmp_path):
    corpus, out_dir, _, average, _ = trained
    env = train_env()
    val_text = tmp_path / "val.txt"
    val_text.write_text("def f(x):\n    return x + 1\n" * 20)
    results = []
    for flag in ([], ["--ema"]):
        proc = subprocess.run([sys.executable, "-m", "eval", str(out_dir), "--task", "bpb", "--data", str(val_text),
                               "--device", "cpu", *flag], cwd=ROOT, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        results.append(json.loads(proc.stdout.splitlines()[-1]))
    assert results[1]["ema"] is True and results[0]["bpb"] != results[1]["bpb"]
    proc = subprocess.run([sys.executable, "-m", "model.hf", "export", str(out_dir), str(tmp_path / "hf"), "--ema"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    tensors = {}
    for shard in (tmp_path / "hf").glob("*.safetensors"):
        tensors.update(load_file(shard))
    assert torch.equal(tensors["lm_head.weight"], average["lm_head.weight"])
    no_ema = subprocess.run([sys.executable, "-m", "eval", str(tmp_path / "hf"), "--task", "bpb", "--data",
                             str(val_text), "--ema"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert no_ema.returncode == 2 and "holds no EMA weights" in no_ema.stderr
