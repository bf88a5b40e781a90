"""Text -> tokens -> batches: tokenizer training/loading, token shards, packed resumable batches.

Public names (imported lazily, so `python -m data.tokenizer` does not pay for torch):
- `Tokenizer`, `train_tokenizer`, `load_tokenizer`            (data/tokenizer.py)
- `prepare`                                                    (data/prepare.py)
- `PackedDataset`, `eval_batches`, `shard_stats`               (data/dataset.py)
- `stdlib_corpus`, `BuiltinCorpus`                             (data/builtin.py)
"""
from __future__ import annotations

import importlib

_HOME = {
    "Tokenizer": "tokenizer",
    "train_tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "prepare": "prepare",
    "PackedDataset": "dataset",
    "eval_batches": "dataset",
    "shard_stats": "dataset",
    "stdlib_corpus": "builtin",
    "BuiltinCorpus": "builtin",
}

__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
