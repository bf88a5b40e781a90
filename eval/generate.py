"""Greedy generation with MLA's compressed KV cache, and exact-match scoring of generated answers.

DeepSeek-V3 report section 4.4 evaluates math and code sets (GSM8K among them) by generation.
Decoding keeps only MLA's latent cache (c_kv and the shared RoPE key, DeepSeek-V2 section 2.1), so
each new token costs one position's forward pass. Generation ends at EOS, at a stop string or after
`max_new_tokens`; the text is cut before the first stop string. Answers are compared after
normalization, taking the text after GSM8K's `#### ` marker when there is one.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from model.mla import LatentKVCache

from .bpb import prefix_token
from .jsonl import iter_jsonl


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, prompt_ids: Sequence[int], max_new_tokens: int,
                    eos_id: Optional[int] = None, stop: Optional[Callable[[List[int]], bool]] = None,
                    use_cache: bool = True, device: Union[str, torch.device] = "cpu") -> List[int]:
    """Greedy continuation of `prompt_ids`: the generated ids (EOS included when it ends them).

    `stop` is called with the ids generated so far after each step; True ends generation. With
    `use_cache=False` every step recomputes the whole prefix (the reference the cache must equal).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not prompt_ids:
        raise ValueError("greedy_generate needs at least one prompt token")
    seq = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    cache = LatentKVCache() if use_cache else None
    step_input = seq
    out: List[int] = []
    for _ in range(max_new_tokens):
        h = model.hidden_states(step_input, cache=cache) if use_cache else model.hidden_states(seq)
        next_id = model.lm_head(h[:, -1])[0].argmax().view(1, 1)
        out.append(int(next_id))
        if out[-1] == eos_id or (stop is not None and stop(out)):
            break
        if use_cache:
            step_input = next_id
        else:
            seq = torch.cat([seq, next_id], dim=1)
    return out


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to (excluding) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop_strings:
        at = text.find(s) if s else -1
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


def generate_text(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int,
                  stop_strings: Sequence[str] = (), context_length: Optional[int] = None,
                  device: Union[str, torch.device] = "cpu") -> Tuple[str, List[int]]:
    """Greedy text continuation of `prompt` cut before the first stop string, and the generated ids.

    Special tokens (EOS, padding, FIM markers) are left out of the text. The prompt is left-truncated
    so that prompt + max_new_tokens fits in `context_length`.
    """
    ids = list(tokenizer.encode(prompt)) if prompt else [prefix_token(tokenizer)]
    if context_length is not None:
        room = context_length - max_new_tokens
        if room < 1:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) must be smaller than the context length "
                             f"({context_length})")
        ids = ids[-room:]
    eos_id = getattr(tokenizer, "eos_id", None)
    special = set(getattr(tokenizer, "special_ids", ())) | {eos_id}
    stop_strings = [s for s in stop_strings if s]

    def decode(gen: List[int]) -> str:
        return tokenizer.decode([t for t in gen if t not in special])

    def hit_stop(gen: List[int]) -> bool:
        return bool(stop_strings) and any(s in decode(gen) for s in stop_strings)

    generated = greedy_generate(model, ids, max_new_tokens, eos_id, hit_stop, device=device)
    return cut_at_stop(decode(generated), stop_strings), generated


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> str:
    """The text after the last GSM8K `####` marker (first line of it), else the whole text."""
    if "####" not in text:
        return text
    tail = text.rsplit("####", 1)[1].strip()
    return tail.splitlines()[0] if tail else ""


def normalize_answer(text: str) -> str:
    """Lower case, collapsed spaces, no `$`, thousands separators or final period; numbers canonical."""
    s = re.sub(r"\s+", " ", text.strip().lower().replace("$", ""))
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s).rstrip(".").strip()
    try:
        value = float(s)
    except ValueError:
        return s
    if math.isfinite(value) and value == int(value):
        return str(int(value))
    return repr(value) if math.isfinite(value) else s


def last_number(text: str) -> Optional[str]:
    """The last number in `text`, normalized, or None."""
    found = _NUMBER.findall(text)
    return normalize_answer(found[-1]) if found else None


def answer_matches(prediction: str, answer: str) -> Dict[str, bool]:
    """exact_match: normalized extracted answers are equal; exact_match_flexible: or, when the gold
    answer is a number, the prediction's last number equals it."""
    gold = normalize_answer(extract_answer(answer))
    strict = normalize_answer(extract_answer(prediction)) == gold
    return {"exact_match": strict, "exact_match_flexible": strict or last_number(prediction) == gold}


def read_gen_examples(path: Union[str, Path], limit: Optional[int] = None) -> List[Dict[str, Any]]:
    """Examples of a `.jsonl` file, one {"prompt": str, "answer": str, "stop": [str, ...] (optional)} a line."""
    examples = []
    for where, ex in iter_jsonl(path):
        if not isinstance(ex, dict) or not isinstance(ex.get("prompt"), str) or "answer" not in ex:
            raise ValueError(f"{where}: each line must be an object with a string 'prompt' and an 'answer'")
        stop = ex.get("stop", [])
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ValueError(f"{where}: 'stop' must be a list of strings")
        examples.append({"prompt": ex["prompt"], "answer": str(ex["answer"]), "stop": stop})
        if limit is not None and len(examples) >= limit:
            break
    return examples


def evaluate_gen(model: torch.nn.Module, tokenizer, examples: Sequence[Dict[str, Any]], max_new_tokens: int,
                 stop_strings: Sequence[str] = (), context_length: Optional[int] = None,
                 device: Union[str, torch.device] = "cpu",
                 progress: Optional[Callable[[int], None]] = None) -> Tuple[Dict[str, float], List[Dict[str, Any]]]:
    """Exact-match metrics of greedy generations, and one record per example (prompt, output, hits)."""
    if not examples:
        raise ValueError("no generation examples to evaluate")
    records, hits, n_generated = [], {"exact_match": 0, "exact_match_flexible": 0}, 0
    for ex in examples:
        stops = list(stop_strings) + list(ex.get("stop", []))
        text, ids = generate_text(model, tokenizer, ex["prompt"], max_new_tokens, stops, context_length, device)
        match = answer_matches(text, ex["answer"])
        for k in hits:
            hits[k] += match[k]
        n_generated += len(ids)
        records.append({"prompt": ex["prompt"], "answer": ex["answer"], "output": text, **match})
        if progress is not None:
            progress(1)
    n = len(examples)
    return {**{k: v / n for k, v in hits.items()}, "n": n, "generated_tokens": n_generated}, records
