"""Helpers of the trainer tests: a small prepared corpus, a very small model, train.py in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]

# A 2-layer model (1 dense + 1 MoE block, 8 experts in 2 groups, top-2, one MTP module): a train
# step of 4 x 32 tokens takes milliseconds.
SMALL_MODEL = ["model.num_hidden_layers=2", "model.first_k_dense_replace=1", "model.hidden_size=64",
               "model.intermediate_size=128", "model.moe_intermediate_size=32", "model.num_attention_heads=2",
               "model.q_lora_rank=32", "model.kv_lora_rank=16", "model.qk_nope_head_dim=16",
               "model.qk_rope_head_dim=8", "model.v_head_dim=16", "model.n_routed_experts=8", "model.n_group=2",
               "model.topk_group=1", "model.num_experts_per_tok=2", "model.max_position_embeddings=64"]


def build_corpus(root: Path, vocab_size: int = 512) -> Dict[str, str]:
    """Tokenizer + train/val shards from the first 40 files of the standard library, under `root`."""
    from data.builtin import stdlib_files
    from data.prepare import prepare
    from data.tokenizer import train_tokenizer

    _, files = stdlib_files()
    files = files[:40]
    tok = train_tokenizer(files[:-4], vocab_size, root / "tokenizer")
    prepare(files[:-4], tok, root / "train", workers=1, progress=False)
    prepare(files[-4:], tok, root / "val", workers=1, progress=False)
    return {"train_dir": str(root / "train"), "val_dir": str(root / "val"), "tokenizer": str(root / "tokenizer"),
            "vocab_size": tok.vocab_size}


def job_args(corpus: Dict[str, str], out_dir: Path, *extra: str) -> List[str]:
    """Overrides of a small fp32 CPU job on `corpus` writing to `out_dir` (later `extra` win)."""
    return ["data=shards", f"data.train_dir={corpus['train_dir']}", f"data.val_dir={corpus['val_dir']}",
            f"data.tokenizer={corpus['tokenizer']}", f"model.vocab_size={corpus['vocab_size']}", *SMALL_MODEL,
            "precision=fp32", "train.seq_len=32", "train.global_batch=4", "train.micro_batch=2",
            "data.shuffle_tokens=2048", "train.device=cpu", "optim.lr=3e-3", "optim.warmup_frac=0.1", "logging.every=1",
            "logging.wandb.mode=disabled", "eval.every=5", "eval.batches=2", "eval.batch_size=4",
            f"out_dir={out_dir}", *extra]


def tiny_args(corpus: Dict[str, str], out_dir: Path, *extra: str) -> List[str]:
    """Overrides of a short CPU job of the `tiny` model (with the corpus' vocabulary) on `corpus`."""
    return ["data=shards", f"data.train_dir={corpus['train_dir']}", f"data.val_dir={corpus['val_dir']}",
            f"data.tokenizer={corpus['tokenizer']}", "model=tiny", f"model.vocab_size={corpus['vocab_size']}",
            "train.device=cpu", "train.seq_len=64", "train.global_batch=8", "train.micro_batch=null",
            "eval.batches=2", "eval.batch_size=8", "logging.every=1", "logging.wandb.mode=disabled",
            "data.shuffle_tokens=2048", f"out_dir={out_dir}", *extra]


def train_env() -> Dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", WANDB_SILENT="true")


def start_train(args: List[str], env: Dict[str, str] = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env or train_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_train(args: List[str], env: Dict[str, str] = None, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env or train_env(),
                          capture_output=True, text=True, timeout=timeout)


def read_metrics(out_dir: Path) -> List[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_losses_close(ours: List[dict], ref: List[dict], steps, what: str, rel: float = 0.0,
                        abs_tol: float = 0.0) -> float:
    """`ours` logs exactly `steps`, and its loss, MTP loss and validation loss (where either logs one,
    both must) are within `abs_tol` + `rel` x |ref| of `ref`'s at the same step; returns the largest
    relative difference."""
    by_step = {r["step"]: r for r in ref}
    assert [r["step"] for r in ours] == list(steps), what
    worst = 0.0
    for a in ours:
        b = by_step[a["step"]]
        for key in ("loss", "mtp_loss", "val_loss"):
            assert (key in a) == (key in b), (what, a["step"], key)
            if key in b:
                assert abs(a[key] - b[key]) <= abs_tol + rel * abs(b[key]), (what, a["step"], key, a[key], b[key])
                worst = max(worst, abs(a[key] - b[key]) / abs(b[key]))
    return worst


def copy_checkpoint(src_out_dir: Path, step: int, out_dir: Path) -> Path:
    """A new `out_dir` holding only checkpoint `step` of the run in `src_out_dir` (to resume from it)."""
    import shutil

    (out_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(src_out_dir / "checkpoints" / f"step_{step}", out_dir / "checkpoints" / f"step_{step}")
    return out_dir
