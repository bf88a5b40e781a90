"""Multiple choice by log-likelihood, the way DeepSeek-V3's base models are compared on HellaSwag,
ARC, MMLU and similar sets (report section 4.4: perplexity-based evaluation).

Each choice is appended to the context (after `delimiter`, a space by default, as in
lm-evaluation-harness) and scored by the summed log-likelihood of its tokens. `acc` picks the
highest sum; `acc_norm` divides each sum by the choice's length in characters and `acc_bytes` by its
length in UTF-8 bytes, the two normalizations lm-evaluation-harness reports under those names.
Tokenization also follows that harness: trailing spaces of the context move to the continuation,
and the continuation's tokens are those of the whole text after the context's tokens.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .bpb import prefix_token
from .jsonl import iter_jsonl
from .scoring import score_continuations


def encode_pair(tokenizer, context: str, continuation: str) -> Tuple[List[int], List[int]]:
    """(context ids, continuation ids) for scoring `continuation` after `context`.

    An empty context becomes the prefix token (BOS, else EOS).
    """
    if context == "":
        return [prefix_token(tokenizer)], list(tokenizer.encode(continuation))
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = list(tokenizer.encode(context + continuation))
    context_ids = list(tokenizer.encode(context))
    return context_ids, whole[len(context_ids):]


def read_choice_examples(path: Union[str, Path], limit: Optional[int] = None) -> List[Dict[str, Any]]:
    """Examples of a `.jsonl` file, one {"context": str, "choices": [str, ...], "label": int} a line
    (`label` may also be the text of the right choice)."""
    examples = []
    for where, ex in iter_jsonl(path):
        if not isinstance(ex, dict) or not isinstance(ex.get("context"), str):
            raise ValueError(f"{where}: each line must be an object with a string 'context'")
        choices = ex.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
        label = ex.get("label")
        if isinstance(label, str) and label in choices:
            label = choices.index(label)
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
            raise ValueError(f"{where}: 'label' must be an index into 'choices' (0..{len(choices) - 1}) "
                             f"or one of the choices, got {ex.get('label')!r}")
        examples.append({"context": ex["context"], "choices": choices, "label": label})
        if limit is not None and len(examples) >= limit:
            break
    return examples


def choice_loglikelihoods(model: torch.nn.Module, tokenizer, examples: Sequence[Dict[str, Any]],
                          context_length: int, batch_size: int = 8, delimiter: str = " ",
                          device: Union[str, torch.device] = "cpu",
                          progress: Optional[Callable[[int], None]] = None) -> List[List[float]]:
    """Summed log-likelihood of every choice of every example: [n_examples][n_choices]."""
    requests, owners = [], []
    for i, ex in enumerate(examples):
        for choice in ex["choices"]:
            requests.append(encode_pair(tokenizer, ex["context"], delimiter + choice))
            owners.append(i)
    scores = score_continuations(model, requests, context_length, batch_size, device, progress)
    out: List[List[float]] = [[] for _ in examples]
    for i, (logprob, _) in zip(owners, scores):
        out[i].append(logprob)
    return out


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda j: values[j])


def choice_metrics(examples: Sequence[Dict[str, Any]], loglikelihoods: Sequence[Sequence[float]]) -> Dict[str, float]:
    """acc (summed log-likelihood), acc_norm (per character), acc_bytes (per UTF-8 byte), n."""
    hits = {"acc": 0, "acc_norm": 0, "acc_bytes": 0}
    for ex, lls in zip(examples, loglikelihoods):
        chars = [ll / len(c) for ll, c in zip(lls, ex["choices"])]
        nbytes = [ll / len(c.encode("utf-8")) for ll, c in zip(lls, ex["choices"])]
        hits["acc"] += _argmax(lls) == ex["label"]
        hits["acc_norm"] += _argmax(chars) == ex["label"]
        hits["acc_bytes"] += _argmax(nbytes) == ex["label"]
    n = len(examples)
    if n == 0:
        raise ValueError("no multiple-choice examples to evaluate")
    return {**{k: v / n for k, v in hits.items()}, "n": n}


def evaluate_choice(model: torch.nn.Module, tokenizer, examples: Sequence[Dict[str, Any]], context_length: int,
                    batch_size: int = 8, delimiter: str = " ", device: Union[str, torch.device] = "cpu",
                    progress: Optional[Callable[[int], None]] = None) -> Tuple[Dict[str, float], List[List[float]]]:
    """Metrics and the per-choice log-likelihoods of a multiple-choice set."""
    lls = choice_loglikelihoods(model, tokenizer, examples, context_length, batch_size, delimiter, device, progress)
    return choice_metrics(examples, lls), lls
