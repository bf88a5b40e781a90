"""Log-likelihood scoring shared by evaluation and the trainer's validation.

Continuation scoring follows the convention of multiple-choice evaluation by perplexity used for
DeepSeek-V3's base-model results (report section 4.4): the log-likelihood of a continuation given its
context, summed over the continuation's tokens.

Bits per byte (DeepSeek-V3 section 4.4: Pile-test is reported in BPB so that models with different
tokenizers compare): BPB = sum of token NLL in nats / (ln 2 * number of UTF-8 bytes of the text).
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from model.head_loss import head_logprobs


@torch.no_grad()
def token_nll(model: torch.nn.Module, tokens_BT: torch.Tensor) -> torch.Tensor:
    """NLL in nats (fp32) of tokens[:, 1:] given their prefixes: [B, T-1] (head chunk by chunk)."""
    h_BSD = model.hidden_states(tokens_BT[:, :-1])
    logprob, _ = head_logprobs(h_BSD.flatten(0, 1), model.lm_head.weight, tokens_BT[:, 1:].flatten())
    return -logprob.view(tokens_BT.shape[0], -1)


@torch.no_grad()
def positions_logprobs(model: torch.nn.Module, inputs_BS: torch.Tensor,
                       picks: Sequence[Tuple[int, int, Sequence[int]]]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """For each (row, start, targets): the log-probabilities of `targets` predicted at positions
    start .. start + len(targets) - 1 of that row, and whether each is the greedy choice. One
    forward of the trunk; the head runs chunk by chunk over the picked positions only."""
    h_BSD = model.hidden_states(inputs_BS)
    h_ND = torch.cat([h_BSD[row, start:start + len(t)] for row, start, t in picks])
    labels = torch.tensor([x for _, _, t in picks for x in t], dtype=torch.long, device=h_ND.device)
    logprob, greedy = head_logprobs(h_ND, model.lm_head.weight, labels)
    sizes = [len(t) for _, _, t in picks]
    return list(logprob.split(sizes)), list(greedy.split(sizes))


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    """Total NLL in nats over a text of `n_bytes` UTF-8 bytes -> bits per byte."""
    if n_bytes <= 0:
        raise ValueError(f"bits_per_byte needs a positive byte count, got {n_bytes}")
    return nll_nats / (math.log(2) * n_bytes)


def _pad_right(rows: Sequence[Sequence[int]], pad_id: int = 0) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)


@torch.no_grad()
def score_continuations(model: torch.nn.Module, requests: Sequence[Tuple[Sequence[int], Sequence[int]]],
                        context_length: int, batch_size: int = 8, device: Union[str, torch.device] = "cpu",
                        progress: Optional[Callable[[int], None]] = None) -> List[Tuple[float, bool]]:
    """Log-likelihood of each continuation given its context, as token ids: [(logprob, is_greedy)].

    The model sees (context + continuation)[-(context_length + 1):][:-1] (left truncation when too
    long), so every continuation token is predicted from the tokens before it. `is_greedy` says
    whether greedy decoding would have produced the whole continuation. Requests are batched longest
    first with right padding (causal attention and per-token routing make padding invisible).
    """
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise ValueError(f"request {i}: context and continuation must both hold tokens "
                             f"(got {len(ctx)} and {len(cont)})")
        if len(cont) > context_length:
            raise ValueError(f"request {i}: continuation of {len(cont)} tokens is longer than the "
                             f"context length {context_length}")
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    results: List[Optional[Tuple[float, bool]]] = [None] * len(requests)
    for lo in range(0, len(order), batch_size):
        batch = order[lo:lo + batch_size]
        inputs = [(list(requests[i][0]) + list(requests[i][1]))[-(context_length + 1):][:-1] for i in batch]
        picks = [(row, len(inputs[row]) - len(requests[i][1]), list(requests[i][1])) for row, i in enumerate(batch)]
        logprobs, greedy = positions_logprobs(model, _pad_right(inputs).to(device), picks)
        for row, i in enumerate(batch):
            results[i] = (float(logprobs[row].double().sum()), bool(greedy[row].all()))
        if progress is not None:
            progress(len(batch))
    return results  # type: ignore[return-value]
