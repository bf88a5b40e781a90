"""Evaluate a checkpoint: bits per byte, multiple choice by log-likelihood, or greedy generation.

    python -m eval <checkpoint_or_hf_dir> --task bpb|choice|gen --data <file> [--limit N]
        [--batch-size B] [--max-new-tokens N] [--stride S] [--context-length L] [--tokenizer PATH]

Prints one JSON line of results on stdout; a progress bar goes to stderr. The evaluations are those
of DeepSeek-V3's base-model comparison (report section 4.4); see eval/bpb.py, eval/choice.py and
eval/generate.py for the data formats.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

from tqdm import tqdm

from .bpb import evaluate_bpb, read_texts
from .choice import evaluate_choice, read_choice_examples
from .generate import evaluate_gen, read_gen_examples
from .loading import DTYPES, load_for_eval


def _positive(name: str, value: Optional[int]) -> None:
    if value is not None and value < 1:
        raise ValueError(f"--{name} must be >= 1, got {value}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="out_dir, out_dir/checkpoints/step_N, or a Hugging Face directory")
    p.add_argument("--task", required=True, choices=["bpb", "choice", "gen"])
    p.add_argument("--data", required=True, type=Path,
                   help="bpb: a text file (or .jsonl of {'text'}); choice: .jsonl of {'context','choices','label'}; "
                        "gen: .jsonl of {'prompt','answer'}")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples (documents for bpb)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (bpb, choice)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="gen: tokens generated at most")
    p.add_argument("--stop", action="append", default=[], help="gen: a stop string (repeatable)")
    p.add_argument("--stride", type=int, default=None, help="bpb: window step in tokens (default context/2)")
    p.add_argument("--context-length", type=int, default=None,
                   help="tokens the model reads at once (default: the model's max_position_embeddings)")
    p.add_argument("--delimiter", default=" ", help="choice: text between context and choice (default a space)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer directory or file (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--samples", type=Path, default=None, help="write per-example results to this .jsonl")
    p.add_argument("--ema", action="store_true",
                   help="evaluate the checkpoint's EMA of the weights (trained with train.ema_decay > 0)")
    return p


def run(args: argparse.Namespace) -> dict:
    """Evaluate as the parsed command line says; returns the result dict."""
    for name in ("limit", "batch_size", "max_new_tokens", "stride", "context_length"):
        _positive(name.replace("_", "-"), getattr(args, name))
    if not args.data.is_file():
        raise FileNotFoundError(f"--data {args.data} is not a file")
    model, tok = load_for_eval(args.checkpoint, args.tokenizer, args.device, args.dtype, ema=args.ema)
    device = next(model.parameters()).device
    context_length = args.context_length or model.cfg.max_position_embeddings
    start = time.perf_counter()
    samples: List[dict] = []
    if args.task == "bpb":
        texts = read_texts(args.data, args.limit)
        with tqdm(desc="bpb windows", unit="window", file=sys.stderr) as bar:
            result = evaluate_bpb(model, tok, texts, context_length, args.stride, args.batch_size, device,
                                  progress=bar.update)
    elif args.task == "choice":
        examples = read_choice_examples(args.data, args.limit)
        total = sum(len(ex["choices"]) for ex in examples)
        with tqdm(total=total, desc="choice", unit="choice", file=sys.stderr) as bar:
            result, lls = evaluate_choice(model, tok, examples, context_length, args.batch_size, args.delimiter,
                                          device, progress=bar.update)
        samples = [{**ex, "loglikelihoods": ll} for ex, ll in zip(examples, lls)]
    else:
        examples = read_gen_examples(args.data, args.limit)
        with tqdm(total=len(examples), desc="gen", unit="example", file=sys.stderr) as bar:
            result, samples = evaluate_gen(model, tok, examples, args.max_new_tokens, args.stop, context_length,
                                           device, progress=bar.update)
    if args.samples is not None:
        args.samples.parent.mkdir(parents=True, exist_ok=True)
        args.samples.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return {"task": args.task, "checkpoint": str(args.checkpoint), "data": str(args.data), "ema": args.ema, **result,
            "context_length": context_length, "seconds": round(time.perf_counter() - start, 3)}


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"python -m eval: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
