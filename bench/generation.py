"""`python -m bench.generation`: per-token greedy decoding time with MLA's latent KV cache against
recomputing the whole prefix for every new token, at 512 tokens of context.

MLA caches only the compressed c_kv and the shared RoPE key per position (DeepSeek-V2 section 2.1,
DeepSeek-V3 section 2.1.1); a cached step runs one position through the network. The model is a
random `configs/model/<name>.yaml` (default tiny, MTP off) in eval mode; the prompt is `context`
random tokens. Each timed run generates `new_tokens` tokens; the per-token time is the mean over
the steps after the first (the first step reads the whole prompt in both ways). The two ways run
alternately, `repeats` times after a warm-up, and the medians are compared; their tokens must be
equal (the command fails otherwise). Both use the same number of CPU threads, 1 by default: a
decoding step is a chain of small operations that a second thread does not speed up, and whose
synchronization makes timings erratic on a busy machine. Prints one JSON line:
{"bench": "generation", "case": ..., "unit": "s/token", "ours": cached, "peer": "full prefix recompute",
 "peer_value": recompute, "ratio": cached/recompute, "outputs_equal": true}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import List, Tuple

import torch

from eval.generate import greedy_generate
from model.summary import load_model_config
from model.transformer import Transformer

PEER = "full prefix recompute"


def timed_generate(model: torch.nn.Module, prompt: List[int], new_tokens: int, use_cache: bool,
                   device: torch.device) -> Tuple[List[int], float]:
    """(generated ids, mean seconds per token over the steps after the first)."""
    stamps: List[float] = []

    def stamp(_: List[int]) -> bool:
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return False

    out = greedy_generate(model, prompt, new_tokens, stop=stamp, use_cache=use_cache, device=device)
    return out, (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def measure(config: str = "tiny", context: int = 512, new_tokens: int = 16, repeats: int = 3,
            device: str = "cpu", seed: int = 0) -> dict:
    """Median per-token seconds of cached and recomputed decoding, and whether their tokens agree."""
    if new_tokens < 2:
        raise ValueError(f"--new-tokens must be >= 2 (the first step is not timed), got {new_tokens}")
    cfg, _ = load_model_config(config, ["num_nextn_predict_layers=0"])
    if context + new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"--context {context} + --new-tokens {new_tokens} exceeds the {config} model's "
                         f"max_position_embeddings {cfg.max_position_embeddings}")
    torch.manual_seed(seed)
    dev = torch.device(device)
    model = Transformer(cfg).to(dev).eval()
    prompt = torch.randint(0, cfg.vocab_size, (context,), generator=torch.Generator().manual_seed(seed)).tolist()
    timed_generate(model, prompt, 2, True, dev)
    timed_generate(model, prompt, 2, False, dev)
    times = {True: [], False: []}
    outputs = {}
    for r in range(repeats):
        for use_cache in ((True, False) if r % 2 == 0 else (False, True)):
            outputs[use_cache], seconds = timed_generate(model, prompt, new_tokens, use_cache, dev)
            times[use_cache].append(seconds)
    cached, recompute = statistics.median(times[True]), statistics.median(times[False])
    where = f"{torch.get_num_threads()}threads" if dev.type == "cpu" else dev.type
    return {"bench": "generation", "case": f"greedy_{config}_ctx{context}_{new_tokens}tok_{where}",
            "unit": "s/token", "ours": cached, "peer": PEER, "peer_value": recompute,
            "ratio": cached / recompute, "outputs_equal": outputs[True] == outputs[False]}


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.generation", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="configs/model/<name>.yaml (default tiny)")
    p.add_argument("--context", type=int, default=512, help="prompt tokens (default 512)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads for both ways (default 1: batch-1 decoding is a chain of small ops)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        result = measure(args.model, args.context, args.new_tokens, args.repeats, args.device)
    except (FileNotFoundError, ValueError) as err:
        print(f"bench.generation: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    if not result["outputs_equal"]:
        print("bench.generation: cached and recomputed generations differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
