"""`init_from=` (training/init_from.py) and the streaming Hugging Face export it starts from.

Train `tiny` (fp32) for 20 steps, export its checkpoint with `python -m model.hf export`, then start
new runs from that directory. The reference is the trained model loaded by `model.load` (the whole
checkpoint through DCP, not the code under test) and evaluated on the batch every fresh run starts
with: one process and pp=2 x ep=2 (each rank reading only its layers and experts from the
safetensors files) must give its loss as their first loss, and the FP8 release format (weights
quantized per 128x128 block with `weight_scale_inv`) within 2%. A moeforge checkpoint works as
init_from too, and a run whose out_dir holds a checkpoint resumes instead, saying so.
"""
import json
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

from test_hf import quantize_blocks
from train_helpers import ROOT, build_corpus, read_metrics, run_train, tiny_args, train_env

from model import load
from model.transformer import lm_loss
from training.config import compose_job, validate
from training.inputs import prepare_inputs, train_batches

JOB = ("precision=fp32", "eval.every=0")


def _fp8_release(hf_dir, out):
    """`hf_dir` in DeepSeek's FP8 release format: every projection weight as float8_e4m3fn blocks
    with a `weight_scale_inv` per 128x128 block, the rest as it is."""
    out.mkdir()
    weights, index = {}, json.loads((hf_dir / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        for name, w in load_file(str(hf_dir / shard)).items():
            if name.endswith("proj.weight") and w.dim() == 2:
                weights[name], weights[name + "_scale_inv"] = quantize_blocks(w)
            else:
                weights[name] = w
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((hf_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (out / "config.json").write_text(json.dumps(config))
    return sum(n.endswith("_scale_inv") for n in weights)


def _first_loss(out_dir):
    return read_metrics(out_dir)[0]["loss"]


def test_runs_start_from_the_exported_model(tmp_path):
    corpus = build_corpus(tmp_path / "corpus")
    trained = tmp_path / "trained"
    first = run_train(tiny_args(corpus, trained, *JOB, "train.steps=20"))
    assert first.returncode == 0, first.stderr[-3000:]
    hf = tmp_path / "hf"
    export = subprocess.run([sys.executable, "-m", "model.hf", "export", str(trained), str(hf)], cwd=ROOT,
                            env=train_env(), capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]

    # the reference: the trained model on the first batch of a fresh run with this job
    cfg = compose_job(tiny_args(corpus, tmp_path / "ref", *JOB))
    batch = train_batches(cfg, prepare_inputs(cfg, validate(cfg)), 0, 1).next_batch(cfg.train.global_batch)
    with torch.no_grad():
        reference = float(lm_loss(load(trained), batch)["loss"])
    untrained = read_metrics(trained)[0]["loss"]
    assert reference < untrained - 0.5, (reference, untrained)

    from_hf = run_train(tiny_args(corpus, tmp_path / "from_hf", *JOB, f"init_from={hf}", "train.steps=1"))
    assert from_hf.returncode == 0, from_hf.stderr[-3000:]
    assert f"initialized from {hf}" in from_hf.stdout
    assert abs(_first_loss(tmp_path / "from_hf") - reference) <= 1e-5 * reference

    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "train.py"]
    layout = subprocess.run([*launch, *tiny_args(corpus, tmp_path / "pp2_ep2", *JOB, f"init_from={hf}",
                                                 "train.steps=1", "parallel.pp=2", "parallel.ep=2",
                                                 "train.micro_batch=1")],
                            cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    assert layout.returncode == 0, layout.stdout[-2000:] + layout.stderr[-3000:]
    assert abs(_first_loss(tmp_path / "pp2_ep2") - reference) <= 1e-5 * reference

    assert _fp8_release(hf, tmp_path / "fp8") >= 20
    from_fp8 = run_train(tiny_args(corpus, tmp_path / "from_fp8", *JOB, f"init_from={tmp_path / 'fp8'}",
                                   "train.steps=1"))
    assert from_fp8.returncode == 0, from_fp8.stderr[-3000:]
    fp8_loss = _first_loss(tmp_path / "from_fp8")
    assert abs(fp8_loss - reference) <= 0.02 * reference and fp8_loss != reference, (fp8_loss, reference)

    from_ckpt = run_train(tiny_args(corpus, tmp_path / "from_ckpt", *JOB, f"init_from={trained}", "train.steps=1"))
    assert from_ckpt.returncode == 0, from_ckpt.stderr[-3000:]
    assert abs(_first_loss(tmp_path / "from_ckpt") - reference) <= 1e-5 * reference

    again = run_train(tiny_args(corpus, tmp_path / "from_hf", *JOB, f"init_from={hf}", "train.steps=2"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming wins" in again.stdout and "resumed from" in again.stdout
    assert [r["step"] for r in read_metrics(tmp_path / "from_hf")] == [1, 2]
