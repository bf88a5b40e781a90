"""EleutherAI lm-evaluation-harness adapter: our checkpoints as the lm-eval model `moeforge`.

Importing this module registers the model, so after `import eval.harness`

    lm_eval.simple_evaluate(model="moeforge", model_args="path=<dir>", tasks=[...])

evaluates a training checkpoint or Hugging Face directory with our own model code, and

    python -m eval.harness <lm_eval's own CLI arguments> --model moeforge --model_args path=<dir>

is lm_eval's command line with the model available (local task files work with `--include_path`;
set HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 where there is no hub access). Scoring is that of
`eval/` (DeepSeek-V3 report section 4.4: perplexity-based multiple choice, generation, BPB):
tokenization and left truncation as lm-eval's `hf` model does them, so both give equal results.
Model arguments: path (or pretrained), tokenizer, dtype (float32|bfloat16), max_length,
max_gen_toks, batch_size, device.
"""
from __future__ import annotations

import sys
from typing import List, Optional, Tuple, Union

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from .bpb import prefix_token, window_requests, windows_nll
from .choice import encode_pair
from .generate import generate_text
from .loading import load_for_eval
from .scoring import score_continuations

DEFAULT_BATCH_SIZE = 8


def _batch_size(value: Union[int, str, None]) -> int:
    """lm-eval passes batch sizes as ints or strings; 'auto' means our default."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH_SIZE
    size = int(value)
    if size < 1:
        raise ValueError(f"moeforge batch_size must be >= 1, got {value!r}")
    return size


@register_model("moeforge")
class MoeforgeLM(LM):
    """lm-eval LM over a moeforge checkpoint (greedy generation only)."""

    def __init__(self, path: Optional[str] = None, pretrained: Optional[str] = None, tokenizer: Optional[str] = None,
                 dtype: str = "float32", max_length: Optional[int] = None, max_gen_toks: int = 256,
                 batch_size: Union[int, str, None] = DEFAULT_BATCH_SIZE, device: Optional[str] = None,
                 **unused) -> None:
        super().__init__()
        path = path or pretrained
        if path is None:
            raise ValueError("moeforge needs model_args path=<checkpoint or Hugging Face directory>")
        self.model, self.tokenizer = load_for_eval(path, tokenizer, device or None, dtype)
        self._device = next(self.model.parameters()).device
        self.max_length = int(max_length) if max_length else self.model.cfg.max_position_embeddings
        self.max_gen_toks = int(max_gen_toks)
        self.batch_size = _batch_size(batch_size)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
        pairs = [encode_pair(self.tokenizer, ctx, cont) for ctx, cont in (r.args for r in requests)]
        with tqdm(total=len(pairs), desc="moeforge loglikelihood", disable=disable_tqdm, file=sys.stderr) as bar:
            results = score_continuations(self.model, pairs, self.max_length, self.batch_size, self._device,
                                          progress=bar.update)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Log-likelihood of whole texts in disjoint windows of max_length predictions, the last one
        with full context (lm-eval's rolling windows), conditioned on the prefix token."""
        prefix = prefix_token(self.tokenizer)
        windows, owners = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            ids = list(self.tokenizer.encode(text))
            for window in window_requests([prefix] + ids, self.max_length, self.max_length):
                windows.append(window)
                owners.append(i)
        with tqdm(total=len(windows), desc="moeforge rolling", disable=disable_tqdm, file=sys.stderr) as bar:
            nlls = windows_nll(self.model, windows, self.batch_size, self._device, progress=bar.update)
        totals = [0.0] * len(requests)
        for i, nll in zip(owners, nlls):
            totals[i] -= nll
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        out = []
        for request in tqdm(requests, desc="moeforge generate", disable=disable_tqdm, file=sys.stderr):
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample"):
                raise ValueError("moeforge generates greedily only; "
                                 "set do_sample: false in the task's generation_kwargs")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            text, _ = generate_text(self.model, self.tokenizer, context, max_new, until, self.max_length, self._device)
            self.cache_hook.add_partial("generate_until", request.args, text)
            out.append(text)
        return out


def main(argv: Optional[List[str]] = None) -> None:
    """lm_eval's command line, with `moeforge` registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    cli_evaluate()


if __name__ == "__main__":
    main()
