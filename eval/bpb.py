"""Bits per byte of a text under a language model, with a sliding window for long texts.

DeepSeek-V3 report section 4.4 reports language modelling (Pile-test) in bits per byte so that
models with different tokenizers compare. Each document is tokenized whole and preceded by a
prefix token (BOS, else EOS), so that its first token is scored too. When the document is longer
than the context, the model reads windows of `context_length` tokens that advance by `stride`:
every token is scored exactly once, by the first window that reaches it, and so sees at least
`context_length - stride` tokens of context (all of them inside the first window).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .scoring import bits_per_byte, positions_logprobs


def sliding_windows(n_targets: int, context_length: int, stride: int) -> List[Tuple[int, int, int]]:
    """Windows over a sequence seq[0..n_targets] whose targets are seq[1..n_targets].

    Returns (start, end, n_scored): the model reads seq[start:end] and the last `n_scored` of its
    predictions (targets seq[end - n_scored + 1 .. end]) are scored. The windows' scored targets
    partition 1..n_targets in order.
    """
    if context_length < 1:
        raise ValueError(f"context length must be >= 1, got {context_length}")
    if not 1 <= stride <= context_length:
        raise ValueError(f"stride must be between 1 and the context length {context_length}, got {stride}")
    windows: List[Tuple[int, int, int]] = []
    done, end = 0, min(context_length, n_targets)
    while done < n_targets:
        windows.append((max(0, end - context_length), end, end - done))
        done, end = end, min(end + stride, n_targets)
    return windows


def window_requests(seq: Sequence[int], context_length: int, stride: int) -> List[Tuple[List[int], int]]:
    """(input tokens, n_scored) for each window over `seq` (seq[0] is the prefix token)."""
    return [(list(seq[start:end + 1]), n) for start, end, n in sliding_windows(len(seq) - 1, context_length, stride)]


@torch.no_grad()
def windows_nll(model: torch.nn.Module, windows: Sequence[Tuple[Sequence[int], int]], batch_size: int = 8,
                device: Union[str, torch.device] = "cpu",
                progress: Optional[Callable[[int], None]] = None) -> List[float]:
    """NLL in nats of the last `n_scored` tokens of each window (window = inputs + its last target).

    A window of k+1 tokens feeds its first k to the model; prediction j targets token j+1. Windows
    are batched longest first with right padding; sums are accumulated in fp64.
    """
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
    out = [0.0] * len(windows)
    for lo in range(0, len(order), batch_size):
        batch = order[lo:lo + batch_size]
        width = max(len(windows[i][0]) for i in batch) - 1
        inputs = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            toks = torch.as_tensor(windows[i][0][:-1], dtype=torch.long)
            inputs[row, :len(toks)] = toks
        picks = [(row, len(windows[i][0]) - 1 - windows[i][1], list(windows[i][0][-windows[i][1]:]))
                 for row, i in enumerate(batch)]
        logprobs, _ = positions_logprobs(model, inputs.to(device), picks)
        for row, i in enumerate(batch):
            out[i] = -float(logprobs[row].double().sum())
        if progress is not None:
            progress(len(batch))
    return out


def prefix_token(tokenizer) -> int:
    """The token that conditions the first token of a document: BOS, else EOS."""
    for name in ("bos_id", "eos_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to condition a text's first token on")


def evaluate_bpb(model: torch.nn.Module, tokenizer, texts: Sequence[str], context_length: int,
                 stride: Optional[int] = None, batch_size: int = 8, device: Union[str, torch.device] = "cpu",
                 progress: Optional[Callable[[int], None]] = None) -> Dict[str, float]:
    """Bits per UTF-8 byte over `texts` (each scored separately, every token exactly once).

    `stride` defaults to half the context length. Returns bpb, the total NLL in nats, the number of
    scored tokens and bytes, and the window settings.
    """
    stride = max(1, context_length // 2) if stride is None else stride
    prefix = prefix_token(tokenizer)
    windows: List[Tuple[List[int], int]] = []
    n_tokens = n_bytes = 0
    for text in texts:
        ids = list(tokenizer.encode(text))
        n_tokens += len(ids)
        n_bytes += len(text.encode("utf-8"))
        if ids:
            windows.extend(window_requests([prefix] + ids, context_length, stride))
    nll = sum(windows_nll(model, windows, batch_size, device, progress))
    return {"bpb": bits_per_byte(nll, n_bytes), "nll": nll, "nll_per_token": nll / max(n_tokens, 1),
            "tokens": n_tokens, "bytes": n_bytes, "documents": len(texts), "windows": len(windows),
            "context_length": context_length, "stride": stride}


def read_texts(path: Union[str, Path], limit: Optional[int] = None) -> List[str]:
    """Documents of a bpb data file: a `.jsonl` of {"text": ...} (one document a line) or any other
    file read whole as one UTF-8 document."""
    path = Path(path)
    if path.suffix != ".jsonl":
        return [path.read_text(encoding="utf-8")]
    texts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{path}:{n}: a bpb .jsonl line must be an object with a string field 'text'")
        texts.append(record["text"])
        if limit is not None and len(texts) >= limit:
            break
    return texts
