"""FP8 vs BF16 training loss: the relative gap of DeepSeek-V3's FP8 recipe (section 3.3, target < 0.25%).

Two runs of the same model from the same initialization on the same batches (the built-in
standard-library corpus, `data.builtin.stdlib_corpus`, cached under .cache/data like `train.py`'s
default job): one under bf16 autocast, one with `model.fp8.apply_fp8` on top. AdamW (β 0.9/0.95,
wd 0.1, clip 1.0), linear warmup then cosine decay, MTP weight 0.3, router bias update γ = 0.001.
The figure is the main cross-entropy averaged over the last 20% of steps; ratio = fp8 / bf16, so the
relative gap is ratio - 1.

At this scale two runs that differ by anything (1e-4 relative noise on the initial weights, or bf16
vs fp32 experts) end 0.5-1% apart: training is chaotic (discrete routing) and the batches are small.
So the comparison is repeated on `--replicas` pairs (replica r > 0 perturbs the initial weights of
both runs alike), the losses are averaged, and the spread between bf16 replicas is printed as the
noise floor the gap has to be read against. Runs go to two processes of one thread each (on CPU the
reference kernels run; ~6 minutes per replica on 2 cores). Progress goes to stderr, one JSON line
per case to stdout.

    python -m bench.fp8_loss [--steps 300] [--batch 4] [--seq-len 64] [--replicas 2]
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import List, Tuple

import torch
import yaml

from model import ModelConfig, Transformer, lm_loss
from model.fp8 import apply_fp8

ROOT = Path(__file__).resolve().parents[1]
PERTURBATION = 1e-4


def batches(cfg: ModelConfig, steps: int, batch: int, seq_len: int, seed: int) -> List[torch.Tensor]:
    """`steps` batches [batch, seq_len + 1] of the built-in corpus (no FIM), the same for both runs.

    The steps x batch sequences are taken from the packed stream, then shuffled, so that every batch
    mixes documents (consecutive stream sequences mostly come from one file).
    """
    from data.builtin import stdlib_corpus
    from data.dataset import PackedDataset
    from data.tokenizer import load_tokenizer

    corpus = stdlib_corpus(ROOT / ".cache" / "data", cfg.vocab_size)
    data = PackedDataset(corpus.train_dir, seq_len, seed=seed, tokenizer_info=load_tokenizer(corpus.tokenizer_dir),
                         fim_rate=0.0)
    pool = data.next_batch(steps * batch)
    order = torch.randperm(steps * batch, generator=torch.Generator().manual_seed(seed))
    return list(pool[order].split(batch))


def train(cfg: ModelConfig, data: List[torch.Tensor], fp8: bool, lr: float, seed: int,
          replica: int = 0) -> Tuple[List[float], float]:
    """(main-loss curve, seconds) of one run, on one thread. Replica r > 0 starts from the same
    initial weights times (1 + 1e-4 * noise drawn from seed r)."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = Transformer(cfg).train()
    if replica:
        gen = torch.Generator().manual_seed(replica)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + PERTURBATION * torch.randn(p.shape, generator=gen))
    if fp8:
        apply_fp8(model)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    steps, warmup = len(data), max(1, len(data) // 10)
    losses, t0 = [], time.perf_counter()
    for step, tokens in enumerate(data):
        scale = (step + 1) / warmup if step < warmup else \
            0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = lm_loss(model, tokens)
        (out["loss"] + 0.3 * out["mtp_loss"]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_bias(0.001)
        losses.append(out["loss"].item())
        if step % 50 == 0 or step == steps - 1:
            print(f"{'fp8' if fp8 else 'bf16'} replica {replica} step {step} loss {losses[-1]:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return losses, time.perf_counter() - t0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replicas", type=int, default=2,
                        help="pairs of runs, replica r > 0 from initial weights perturbed by 1e-4 relative noise; "
                             "losses are averaged, and with >= 2 the spread between bf16 replicas (the noise "
                             "floor of this comparison) is reported too")
    parser.add_argument("--curves", help="also write the loss curves to this JSON file")
    args = parser.parse_args(argv)
    if args.steps < 5:
        raise SystemExit(f"--steps must be >= 5 (the last 20% are averaged), got {args.steps}")
    cfg = ModelConfig.from_dict(yaml.safe_load((ROOT / "configs" / "model" / f"{args.model}.yaml").read_text()))
    data = batches(cfg, args.steps, args.batch, args.seq_len, args.seed)
    runs = [(name, r) for r in range(args.replicas) for name in ("bf16", "fp8")]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [pool.submit(train, cfg, data, name == "fp8", args.lr, args.seed, r) for name, r in runs]
        results = dict(zip(runs, (job.result() for job in jobs)))
    if args.curves:
        Path(args.curves).write_text(json.dumps({f"{n}/{r}": c for (n, r), (c, _) in results.items()}))
    tail = max(1, args.steps // 5)
    last = {key: sum(curve[-tail:]) / tail for key, (curve, _) in results.items()}
    for r in range(args.replicas):
        print(f"replica {r}: fp8 {last['fp8', r]:.5f} bf16 {last['bf16', r]:.5f} "
              f"gap {100 * (last['fp8', r] / last['bf16', r] - 1):+.3f}%", file=sys.stderr)
    mean = {name: sum(last[name, r] for r in range(args.replicas)) / args.replicas for name in ("bf16", "fp8")}
    case = (f"{args.model}, {args.steps} steps x {args.batch}x{args.seq_len} tokens, stdlib corpus, mean main loss "
            f"over the last {tail} steps, {args.replicas} replica(s)")
    print(json.dumps({"bench": "fp8_loss", "case": case, "unit": "loss", "ours": round(mean["fp8"], 5),
                      "peer": "bf16 autocast", "peer_value": round(mean["bf16"], 5),
                      "ratio": round(mean["fp8"] / mean["bf16"], 5)}), flush=True)
    if args.replicas >= 2:
        others = sum(last["bf16", r] for r in range(1, args.replicas)) / (args.replicas - 1)
        print(json.dumps({"bench": "fp8_loss", "case": f"noise floor: bf16 from perturbed initial weights "
                          f"(replicas 1..{args.replicas - 1}) vs bf16 replica 0, same data", "unit": "loss",
                          "ours": round(others, 5), "peer": "bf16 replica 0", "peer_value": round(last["bf16", 0], 5),
                          "ratio": round(others / last["bf16", 0], 5)}), flush=True)
    seconds = {name: sum(results[name, r][1] for r in range(args.replicas)) / args.replicas for name in ("bf16", "fp8")}
    print(json.dumps({"bench": "fp8_loss", "case": f"{args.model}, seconds per step, one CPU thread (reference kernels)",
                      "unit": "s/step", "ours": round(seconds["fp8"] / args.steps, 3), "peer": "bf16 autocast",
                      "peer_value": round(seconds["bf16"] / args.steps, 3),
                      "ratio": round(seconds["fp8"] / seconds["bf16"], 3)}), flush=True)


if __name__ == "__main__":
    main()
