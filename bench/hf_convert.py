"""Peak host memory of the streaming Hugging Face conversion, against the model's fp32 bytes.

Writes a random Hugging Face directory of the model (bf16 by default, streamed: the generator never
holds the model either), then runs `python -m model.hf import` of it and `python -m model.hf export`
of the resulting checkpoint, each in a fresh process under `bench.peak_rss`, and prints one JSON line
per direction: peak RSS (VmHWM, the whole process: interpreter and torch included) and, as the peer,
the model's parameter bytes in fp32, which a converter that builds the model holds at least once
(DeepSeek-V3 section 3.3 release format; the issue's target is a ratio under 0.5 for `small`).
`base_gib` is the peak of the same process after its imports.

    python -m bench.hf_convert [--model small] [model.field=value ...] [--dir DIR] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Dict

import torch

from model.hf import write_hf
from model.hf_names import hf_tensors
from model.transformer import Transformer
from training.config import compose_job, model_config

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def random_hf_dir(cfg, hf_dir: Path, dtype: torch.dtype) -> int:
    """A Hugging Face directory of `cfg` with Normal(0, 0.006) weights, written tensor by tensor;
    returns the model's parameter count."""
    with torch.device("meta"):
        model = Transformer(cfg)
    named = list(hf_tensors(model))  # the MTP modules' copies of embedding and head are the same tensors
    uses = Counter(id(t) for _, t in named)
    gen = torch.Generator().manual_seed(0)
    drawn: Dict[int, torch.Tensor] = {}

    def draw(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in drawn:
            drawn[id(t)] = torch.empty(t.shape).normal_(0, 0.006, generator=gen)
        return drawn[id(t)] if uses[id(t)] > 1 else drawn.pop(id(t))

    write_hf(hf_dir, cfg, [(n, t.shape) for n, t in named], ((n, draw(t)) for n, t in named), dtype)
    return sum(p.numel() for p in model.parameters())


def measured(*args: str) -> Dict[str, float]:
    """Peak RSS of `python -m model.hf ARGS` in a fresh process (GiB), and its post-import baseline."""
    cmd = [sys.executable, "-m", "bench.peak_rss", "--preload", "model.hf", "--", "model.hf", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    peak = json.loads(lines[-1].split(" ", 1)[1])
    return {"peak_gib": peak["peak_kib"] * 1024 / GIB, "base_gib": peak["base_kib"] * 1024 / GIB}


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hf_convert", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--dir", default=None, help="working directory (default: a temporary one, removed)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("overrides", nargs="*", help="model.<field>=<value>")
    args = parser.parse_args(argv)
    cfg = model_config(compose_job([f"model={args.model}", *args.overrides]))
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="hf_convert_"))
    try:
        n_params = random_hf_dir(cfg, work / "hf", getattr(torch, args.dtype))
        fp32_gib = n_params * 4 / GIB
        runs = {"import": measured("import", str(work / "hf"), str(work / "ckpt")),
                "export": measured("export", str(work / "ckpt"), str(work / "hf_back"), "--dtype", args.dtype)}
        for direction, m in runs.items():
            print(json.dumps({"bench": "hf_convert", "case": f"{direction} {args.model} ({args.dtype} files)",
                              "unit": "GiB peak RSS", "ours": round(m["peak_gib"], 3), "peer": "fp32 parameter bytes",
                              "peer_value": round(fp32_gib, 3), "ratio": round(m["peak_gib"] / fp32_gib, 3),
                              "base_gib": round(m["base_gib"], 3)}), flush=True)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
