"""Acceptance of rank-local construction: under expert parallelism each rank holds only its share.

One process and `torchrun --nproc_per_node=8` at parallel.ep=8 train the same job for one step (the
`tiny` model with 128 routed experts of width 512, so that the routed experts are ~95% of the
parameters) under `bench.peak_rss`, which reads each process's peak RSS (VmHWM) above the peak of
the same process after importing the trainer. Every rank must stay at or below 0.2x the one
process's figure: 1/8 of the experts plus the replicated dense part, their gradients and optimizer
state, and nothing of another rank's experts at any moment (building the whole model first and
slicing it afterwards measured 0.26x). ZeRO-1 is off (parallel.zero=false) in both, as it was when
that figure was taken: with its default (on when dp x ep > 1) the ep=8 ranks measured 0.23x, the
ZeRO-1 buffers' share, which is the optimizer's memory rather than the model's construction.
"""
import json
import subprocess
import sys

from train_helpers import ROOT, build_corpus, tiny_args, train_env

PRELOAD = "train,training.loop,training.inputs,training.distributed,parallel.pipeline_training,data.dataset"
RATIO = 0.2


def _job(corpus, out_dir, *extra):
    return tiny_args(corpus, out_dir, "model.n_routed_experts=128", "model.moe_intermediate_size=512", "train.steps=1",
                     "train.seq_len=16", "eval.batches=1", "parallel.zero=false", *extra)


def _peaks(out_dir):
    return [json.loads(p.read_text()) for p in sorted(out_dir.glob("peak_rss_*.json"))]


def test_each_expert_parallel_rank_holds_its_share(tmp_path):
    corpus = build_corpus(tmp_path / "corpus")
    (tmp_path / "rss_one").mkdir()
    (tmp_path / "rss_ep8").mkdir()
    measure = [sys.executable, "-m", "bench.peak_rss", "--preload", PRELOAD, "--out", str(tmp_path / "rss_one"),
               "--", "train.py"]
    one = subprocess.run([*measure, *_job(corpus, tmp_path / "one")], cwd=ROOT, env=train_env(),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8", "-m",
              "bench.peak_rss", "--preload", PRELOAD, "--out", str(tmp_path / "rss_ep8"), "--", "train.py"]
    ep = subprocess.run([*launch, *_job(corpus, tmp_path / "ep8", "parallel.ep=8")], cwd=ROOT, env=train_env(),
                        capture_output=True, text=True, timeout=600)
    assert ep.returncode == 0, ep.stdout[-3000:] + ep.stderr[-3000:]
    (single,), ranks = _peaks(tmp_path / "rss_one"), _peaks(tmp_path / "rss_ep8")
    assert sorted(r["rank"] for r in ranks) == list(range(8)) and all(r["rc"] == 0 for r in ranks)
    whole = single["peak_kib"] - single["base_kib"]
    shares = {r["rank"]: round((r["peak_kib"] - r["base_kib"]) / whole, 3) for r in ranks}
    print(f"one process: {whole / 1024:.0f} MiB above {single['base_kib'] / 1024:.0f} MiB; "
          f"ep=8 ranks / one process: {shares}")
    assert max(shares.values()) <= RATIO, (whole, shares)
