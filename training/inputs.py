"""The job's data: the built-in standard-library corpus or user-prepared shards, and their tokenizer.

`data=stdlib` prepares (once, cached under `data.cache_dir`, relative paths taken from the
repository root; torchrun ranks share one build) a tokenizer with the model's vocabulary size and
train/val shards; `data=shards`
takes `data.train_dir`, `data.val_dir` and `data.tokenizer` (relative to the working directory).
The tokenizer's vocabulary must equal `model.vocab_size`, and `data.fim_rate > 0` needs its FIM
tokens (nothing is appended to a tokenizer). Before training starts, both shard
directories must hold documents, have been prepared with this tokenizer (its fingerprint) and hold
only ids of its vocabulary, and the validation split must fill `eval.batches` batches; each failure
is a ConfigError naming the directory. Training batches are the packed stream of
`data.PackedDataset`, shuffled by sequence in blocks (`data.shuffle_tokens`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from model.config import ModelConfig

from .config import REPO_ROOT, ConfigError, resolve_path
from .shuffle import BlockShuffle


@dataclass
class Inputs:
    train_dir: Path
    val_dir: Path
    tokenizer: object


def prepare_inputs(cfg: DictConfig, mcfg: ModelConfig) -> Inputs:
    """Locate (or build) the shards and load the tokenizer; checks the vocabulary size."""
    from data.tokenizer import load_tokenizer

    d = cfg.data
    if d.name == "stdlib":
        from data.builtin import stdlib_corpus

        corpus = stdlib_corpus(resolve_path(d.cache_dir, REPO_ROOT), mcfg.vocab_size,
                               val_fraction=d.val_fraction, seed=0)
        train_dir, val_dir, tok_path = corpus.train_dir, corpus.val_dir, corpus.tokenizer_dir
        where = f"the built-in corpus ({corpus.tokenizer_dir})"
    else:
        train_dir, val_dir, tok_path = (resolve_path(d[k], Path.cwd()) for k in ("train_dir", "val_dir", "tokenizer"))
        where = f"data.tokenizer={d.tokenizer}"
    tokenizer = load_tokenizer(tok_path)
    if tokenizer.vocab_size != mcfg.vocab_size:
        raise ConfigError(f"model.vocab_size ({mcfg.vocab_size}) differs from the vocabulary of {where} "
                          f"({tokenizer.vocab_size}); set model.vocab_size={tokenizer.vocab_size}")
    if d.fim_rate > 0 and not tokenizer.has_fim():
        names = [tokenizer.names[r] for r in ("fim_begin", "fim_hole", "fim_end")]
        raise ConfigError(f"data.fim_rate={d.fim_rate} needs the FIM tokens {names}, which the tokenizer of "
                          f"{where} lacks (nothing is appended to a tokenizer); set data.fim_rate=0")
    check_data(cfg, train_dir, val_dir, tokenizer)
    return Inputs(train_dir=train_dir, val_dir=val_dir, tokenizer=tokenizer)


def check_data(cfg: DictConfig, train_dir: Path, val_dir: Path, tokenizer) -> None:
    """ConfigError unless both splits are usable with `tokenizer` and validation fills eval.batches."""
    from data.dataset import check_shards, shard_stats

    try:
        for shard_dir in (train_dir, val_dir):
            check_shards(shard_dir, tokenizer.fingerprint(), tokenizer.vocab_size)
    except (OSError, ValueError) as err:
        raise ConfigError(str(err)) from None
    e, seq_len = cfg.eval, cfg.train.seq_len
    need = e.batches * e.batch_size * seq_len + 1
    have = shard_stats(val_dir)["stream_tokens"]
    if have < need:
        raise ConfigError(f"the validation split {val_dir} has {have} tokens, eval.batches x eval.batch_size x "
                          f"train.seq_len = {e.batches} x {e.batch_size} x {seq_len} needs {need}; lower "
                          f"eval.batches or eval.batch_size, or give more validation data")


def train_batches(cfg: DictConfig, inputs: Inputs, dp_rank: int, dp_world: int):
    """The training batches: the packed stream, shuffled by sequence in blocks of `data.shuffle_tokens`
    tokens (training/shuffle.py; 0 keeps the stream order). `next_batch(global_batch)` gives this
    rank's rows."""
    from data.dataset import PackedDataset

    seq_len = cfg.train.seq_len
    options = dict(seed=cfg.seed, tokenizer_info=inputs.tokenizer, fim_rate=cfg.data.fim_rate,
                   split_rate=cfg.data.split_rate)
    block = cfg.data.shuffle_tokens // seq_len
    if block <= 1:
        return PackedDataset(inputs.train_dir, seq_len, dp_rank=dp_rank, dp_world=dp_world, **options)
    return BlockShuffle(PackedDataset(inputs.train_dir, seq_len, **options), block, seed=cfg.seed,
                        dp_rank=dp_rank, dp_world=dp_world)
