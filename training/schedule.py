"""Token-based schedules of a run: learning rate, batch size ramp, MTP weight λ, bias update speed γ.

DeepSeek-V3 section 4.2 sets every schedule by tokens seen: the learning rate warms up linearly,
stays constant, decays by cosine to 0.1x, then holds two constant tails; the batch size grows from
3072 to 15360 sequences over the first 469B tokens; the MTP weight is 0.3 for the first 10T tokens
and 0.1 after; the bias update speed γ is 0.001 until the last 500B tokens and 0 after. Here every
threshold is a fraction of the run's planned tokens (`planned_tokens`, ramp included), so the same
shape fits a run of any length. The batch ramp is linear in tokens over a fraction of the nominal
tokens (steps x global_batch x seq_len), rounded down to a multiple of the batch unit (micro_batch x
dp, or dp when micro_batch is null) so that every rank gets whole micro-batches.
"""
from __future__ import annotations

import math
from typing import Callable

from omegaconf import DictConfig


class Schedules:
    """All schedules of one run. `t` arguments are tokens seen; `lr` takes the count at the end of the
    step (so the first warmup step is not wasted), the others the count before it."""

    def __init__(self, optim: DictConfig, train: DictConfig, batch_unit: int):
        self.optim, self.train, self.batch_unit = optim, train, batch_unit
        self.total_tokens = planned_tokens(train.steps, self.batch_size, train.seq_len)

    def batch_size(self, t: int) -> int:
        """Global sequences per optimizer step after `t` tokens. The ramp spans `batch_ramp_frac` of
        the run's nominal tokens (steps x global_batch x seq_len)."""
        tr = self.train
        ramp_tokens = tr.batch_ramp_frac * tr.steps * tr.global_batch * tr.seq_len
        if not tr.batch_ramp_start or t >= ramp_tokens:
            return tr.global_batch
        size = tr.batch_ramp_start + (tr.global_batch - tr.batch_ramp_start) * t / ramp_tokens
        return max(self.batch_unit, int(size) // self.batch_unit * self.batch_unit)

    def lr(self, t: int) -> float:
        """Warmup -> constant -> cosine to min_lr_ratio -> constant -> final_lr_ratio, by tokens."""
        o = self.optim
        x = t / self.total_tokens
        if x < o.warmup_frac:
            return o.lr * x / o.warmup_frac
        if x < o.decay_start_frac:
            return o.lr
        if x < o.decay_end_frac:
            progress = (x - o.decay_start_frac) / (o.decay_end_frac - o.decay_start_frac)
            return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
        if x < o.final_start_frac:
            return o.lr * o.min_lr_ratio
        return o.lr * o.final_lr_ratio

    def mtp_lambda(self, t: int) -> float:
        tr = self.train
        return tr.mtp_lambda if t < tr.mtp_lambda_switch_frac * self.total_tokens else tr.mtp_lambda_tail

    def bias_gamma(self, t: int) -> float:
        tr = self.train
        return tr.bias_gamma if t < tr.bias_gamma_switch_frac * self.total_tokens else tr.bias_gamma_tail


def planned_tokens(steps: int, batch_size: Callable[[int], int], seq_len: int) -> int:
    """Sum over steps of batch_size(tokens so far) x seq_len."""
    t = 0
    for _ in range(steps):
        t += batch_size(t) * seq_len
    return t
