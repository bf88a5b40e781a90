"""Model and tokenizer of a checkpoint, ready to evaluate.

A checkpoint is a training checkpoint (`out_dir`, or `out_dir/checkpoints/step_N`), whose tokenizer
lives in `out_dir/tokenizer` (or a `tokenizer/` folder of the step), or a Hugging Face directory
with its tokenizer files (tokenizer.json or a SentencePiece *.model) beside config.json.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple, Union

import torch

import model as model_lib
from data.tokenizer import Tokenizer, load_tokenizer
from model.hf import find_tokenizer_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_tokenizer_path(checkpoint: Union[str, Path], override: Optional[Union[str, Path]] = None) -> Path:
    """`override` when given, else the tokenizer that travels with the checkpoint."""
    if override is not None:
        return Path(override)
    path = Path(checkpoint)
    if path.is_dir() and ((path / "tokenizer.json").is_file() or any(path.glob("*.model"))):
        return path
    found = find_tokenizer_dir(path)
    if found is None:
        raise FileNotFoundError(f"no tokenizer found for {path}: looked for tokenizer.json or *.model in it, "
                                f"and for a tokenizer/ folder in it, its step directory and its out_dir; "
                                f"pass --tokenizer PATH")
    return found


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_eval(checkpoint: Union[str, Path], tokenizer: Optional[Union[str, Path]] = None,
                  device: Optional[str] = None, dtype: str = "float32",
                  ema: bool = False) -> Tuple[torch.nn.Module, Tokenizer]:
    """(model in eval mode on `device`, tokenizer) of a checkpoint or Hugging Face directory
    (with `ema`: a training checkpoint's EMA weights).

    Parameters take `dtype`; buffers (router bias, RoPE frequencies) stay fp32.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    tok = load_tokenizer(resolve_tokenizer_path(checkpoint, tokenizer))
    net = model_lib.load(checkpoint, ema=ema).to(device or default_device()).eval()
    for param in net.parameters():
        param.data = param.data.to(DTYPES[dtype])
    if tok.vocab_size > net.cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                         f"{net.cfg.vocab_size}; pass the checkpoint's own tokenizer with --tokenizer")
    return net, tok
