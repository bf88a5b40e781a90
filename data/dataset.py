"""Packed, shuffled, resumable training batches with FIM and token-boundary splitting.

The training stream (DeepSeek-V3 section 4.1 packs documents, with no cross-sample attention mask):
epoch e = every document of the shards in the order `default_rng([seed, e]).permutation`, each one
transformed and followed by EOS; epochs follow one another without a break. Sequence k of the
stream is tokens [k*seq_len, k*seq_len + seq_len + 1): consecutive sequences share one token, so
every token after the first is a prediction target exactly once.

Per-document transforms, decided from (seed, epoch, document id) only, so they do not depend on the
data-parallel layout:
- token-boundary splitting (section 4.1): with probability `split_rate`, each token made of
  punctuation + line breaks (`Tokenizer.split_table()`) is replaced by its pieces;
- Fill-in-the-Middle (section 4.1, PSM form, rate `fim_rate`): the document's tokens t are cut at
  two points a <= b drawn uniformly in token space (so no token is broken and the length grows by
  exactly 3): `<|fim_begin|> t[:a] <|fim_hole|> t[b:] <|fim_end|> t[a:b]`, then EOS.

`next_batch(global_batch)` consumes `global_batch` sequences of the stream and returns rank r's
rows r*n .. (r+1)*n-1 (n = global_batch / dp_world); the stream is the same for every dp_world.
The state is the stream position (epoch, position in the permutation, offset in the document).
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Union

import numpy as np
import torch

if TYPE_CHECKING:
    from data.tokenizer import Tokenizer

EVAL_CHUNK_TOKENS = 1 << 20
_DOC_CACHE = 8


def _read_index(shard_dir: Path) -> dict:
    path = Path(shard_dir) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"no index.json in shard directory {shard_dir}; "
                                f"create the shards with `python -m data.prepare`")
    return json.loads(path.read_text())


def check_shards(shard_dir: Path, fingerprint: str, vocab_size: int) -> dict:
    """index.json of a shard directory once its documents, tokenizer and token ids are checked:
    ValueError (naming the directory) when it holds no document, was prepared with a tokenizer of
    another fingerprint (or an older data.prepare that recorded none), or holds ids >= vocab_size;
    a shard whose .bin and .idx.npy disagree is named too."""
    index = _read_index(shard_dir)
    if not index.get("documents"):
        raise ValueError(f"shard directory {shard_dir} holds no documents")
    made_with = index.get("tokenizer_fingerprint")
    if made_with != fingerprint:
        made = f"another tokenizer ({index.get('tokenizer')}, fingerprint {made_with})" if made_with else \
            "a data.prepare that recorded no tokenizer fingerprint"
        raise ValueError(f"shard directory {shard_dir} was prepared with {made}, not with this job's tokenizer "
                         f"(fingerprint {fingerprint}); prepare the shards again with it")
    if index["max_token_id"] >= vocab_size:
        raise ValueError(f"shard directory {shard_dir} holds token id {index['max_token_id']}, outside the "
                         f"vocabulary of {vocab_size} tokens")
    _Shards(shard_dir, index)
    return index


class _Shards:
    """Memory-mapped token shards and the global document table (id -> shard, start, length)."""

    def __init__(self, shard_dir: Path, index: dict):
        self.tokens, self.offsets = [], []
        for name in index["shards"]:
            self.offsets.append(np.load(Path(shard_dir) / f"{name}.idx.npy"))
            self.tokens.append(np.memmap(Path(shard_dir) / f"{name}.bin", dtype="<u4", mode="r"))
            if len(self.tokens[-1]) != self.offsets[-1][-1]:
                raise ValueError(f"{Path(shard_dir) / name}.bin holds {len(self.tokens[-1])} tokens, its index "
                                 f"{name}.idx.npy says {self.offsets[-1][-1]}: the shard is damaged")
        counts = [len(o) - 1 for o in self.offsets]
        self.shard_of = np.repeat(np.arange(len(counts)), counts)
        self.start = np.concatenate([o[:-1] for o in self.offsets]) if counts else np.zeros(0, np.int64)
        self.length = np.concatenate([np.diff(o) for o in self.offsets]) if counts else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.start)

    def doc(self, d: int) -> np.ndarray:
        s = self.start[d]
        return np.asarray(self.tokens[self.shard_of[d]][s:s + self.length[d]], dtype=np.int64)


def _tokenizer_ids(tokenizer_info, index: dict, need_fim: bool, need_split: bool) -> tuple[dict, dict]:
    """(special ids, split table {id: pieces}) from a Tokenizer, a dict, or index.json."""
    split = None
    if tokenizer_info is None:
        info = index.get("tokenizer_info", {})
    elif isinstance(tokenizer_info, dict):
        info = tokenizer_info
    else:
        info = tokenizer_info.info()
        split = tokenizer_info.split_table() if need_split else None
    keys = ["eos_id"] + (["fim_begin_id", "fim_hole_id", "fim_end_id"] if need_fim else [])
    missing = [k for k in keys if info.get(k) is None]
    if missing:
        raise ValueError(f"tokenizer_info lacks {missing} (needed for eos/FIM); pass a Tokenizer or "
                         f"prepare the shards with data.prepare")
    if need_split and split is None:
        split = info.get("split_table", index.get("tokenizer_info", {}).get("split_table"))
        if split is None:
            raise ValueError("split_rate > 0 needs the tokenizer's split table: pass a Tokenizer "
                             "or shards prepared by data.prepare (index.json tokenizer_info)")
    split = dict(split.items() if isinstance(split, dict) else split) if split else {}
    return info, {int(k): np.asarray(v, dtype=np.int64) for k, v in split.items()}


def _check_rate(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


class PackedDataset:
    """Infinite packed sequences of seq_len + 1 tokens from a data.prepare shard directory."""

    def __init__(self, shard_dir: Path, seq_len: int, seed: int = 0,
                 tokenizer_info: Union[dict, "Tokenizer", None] = None, fim_rate: float = 0.1,
                 split_rate: float = 0.0, dp_rank: int = 0, dp_world: int = 1):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        _check_rate("fim_rate", fim_rate)
        _check_rate("split_rate", split_rate)
        if dp_world < 1 or not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank must be in [0, dp_world) with dp_world >= 1, "
                             f"got dp_rank={dp_rank}, dp_world={dp_world}")
        index = _read_index(shard_dir)
        self.shards = _Shards(shard_dir, index)
        if len(self.shards) == 0:
            raise ValueError(f"shard directory {shard_dir} holds no documents")
        info, self._split = _tokenizer_ids(tokenizer_info, index, fim_rate > 0, split_rate > 0)
        self.eos_id = int(info["eos_id"])
        self._fim_ids = [-1 if info.get(k) is None else int(info[k])
                         for k in ("fim_begin_id", "fim_hole_id", "fim_end_id")]
        self._split_ids = np.array(sorted(self._split), dtype=np.int64)
        self.seq_len, self.seed = seq_len, seed
        self.fim_rate, self.split_rate = fim_rate, split_rate
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self.n_docs = len(self.shards)
        self._cursor = (0, 0, 0)  # (epoch, position in the epoch's permutation, offset in the doc)
        self._sequences = 0
        self._plans: OrderedDict = OrderedDict()
        self._docs: OrderedDict = OrderedDict()

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(permutation, FIM flag per doc id, FIM cut fractions per doc id) of one epoch."""
        if epoch not in self._plans:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(self.n_docs)
            fim = rng.random(self.n_docs) < self.fim_rate
            cuts = rng.random((self.n_docs, 2))
            self._plans[epoch] = (perm, fim, cuts)
            if len(self._plans) > 2:
                self._plans.popitem(last=False)
        return self._plans[epoch]

    def _split_tokens(self, t: np.ndarray, epoch: int, d: int) -> np.ndarray:
        mask = np.isin(t, self._split_ids)
        if not mask.any():
            return t
        rng = np.random.default_rng([self.seed, epoch, d, 1])
        chosen = np.flatnonzero(mask & (rng.random(len(t)) < self.split_rate))
        if len(chosen) == 0:
            return t
        parts, prev = [], 0
        for i in chosen:
            parts += [t[prev:i], self._split[int(t[i])]]
            prev = i + 1
        parts.append(t[prev:])
        return np.concatenate(parts)

    def _doc(self, epoch: int, d: int) -> np.ndarray:
        """Document d as it appears in the stream of `epoch`: transformed, followed by EOS."""
        key = (epoch, d)
        if key not in self._docs:
            t = self.shards.doc(d)
            if self.split_rate > 0 and len(self._split_ids):
                t = self._split_tokens(t, epoch, d)
            _, fim, cuts = self._plan(epoch)
            begin, hole, end = self._fim_ids
            if fim[d]:
                a, b = sorted(np.minimum((cuts[d] * (len(t) + 1)).astype(np.int64), len(t)))
                t = np.concatenate([[begin], t[:a], [hole], t[b:], [end], t[a:b]])
            self._docs[key] = np.concatenate([t, [self.eos_id]]).astype(np.int64)
            if len(self._docs) > _DOC_CACHE:
                self._docs.popitem(last=False)
        return self._docs[key]

    def _doc_len(self, epoch: int, d: int) -> int:
        if self.split_rate > 0 and len(self._split_ids):
            return len(self._doc(epoch, d))
        return int(self.shards.length[d]) + 1 + 3 * bool(self._plan(epoch)[1][d])

    def _advance(self, cursor: tuple, n: int, out: Optional[list] = None) -> tuple:
        """The cursor n stream tokens later; the tokens passed are appended to `out` if given."""
        epoch, pos, off = cursor
        while n > 0:
            d = int(self._plan(epoch)[0][pos])
            length = self._doc_len(epoch, d)
            k = min(n, length - off)
            if out is not None:
                out.append(self._doc(epoch, d)[off:off + k])
            off, n = off + k, n - k
            if off == length:
                pos, off = pos + 1, 0
                if pos == self.n_docs:
                    epoch, pos = epoch + 1, 0
        return epoch, pos, off

    def next_batch(self, global_batch: int) -> torch.Tensor:
        """This rank's rows of the next `global_batch` sequences: LongTensor [global_batch //
        dp_world, seq_len + 1] (rank r gets rows r*n .. (r+1)*n-1 of the global batch)."""
        if global_batch < 1 or global_batch % self.dp_world:
            raise ValueError(f"global_batch={global_batch} must be a positive multiple of "
                             f"dp_world={self.dp_world}")
        n = global_batch // self.dp_world
        rows = []
        for i in range(global_batch):
            if self.dp_rank * n <= i < (self.dp_rank + 1) * n:
                out: list = []
                self._advance(self._cursor, self.seq_len + 1, out)
                rows.append(np.concatenate(out))
            self._cursor = self._advance(self._cursor, self.seq_len)
        self._sequences += global_batch
        return torch.from_numpy(np.stack(rows))

    @property
    def epoch(self) -> int:
        """The epoch the next sequence starts in."""
        return self._cursor[0]

    def state_dict(self) -> dict:
        """JSON-serializable position in the stream (plus seed and document count, checked on load)."""
        epoch, pos, off = self._cursor
        return {"epoch": epoch, "doc_pos": pos, "tok_offset": off, "sequences": self._sequences,
                "seed": self.seed, "n_docs": self.n_docs}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state_dict()` was taken (same shards, seed and transform rates)."""
        for key, mine in (("seed", self.seed), ("n_docs", self.n_docs)):
            if int(state[key]) != mine:
                raise ValueError(f"data state has {key}={state[key]} but this dataset has {key}={mine}")
        self._cursor = (int(state["epoch"]), int(state["doc_pos"]), int(state["tok_offset"]))
        self._sequences = int(state["sequences"])


def eval_batches(shard_dir: Path, seq_len: int, batch_size: int, max_batches: Optional[int] = None,
                 eos_id: Optional[int] = None) -> Iterator[torch.Tensor]:
    """Validation batches: the documents in index order (no shuffle, no FIM, no splitting) joined
    with EOS, cut into windows of seq_len + 1 tokens at stride seq_len (every token after the first
    is a target exactly once); the incomplete last window is dropped, the last batch may be
    smaller. `eos_id` defaults to the one in index.json. Yields LongTensor [<= batch_size, seq_len + 1]."""
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got seq_len={seq_len}, batch_size={batch_size}")
    index = _read_index(shard_dir)
    if eos_id is None:
        eos_id = index.get("tokenizer_info", {}).get("eos_id")
        if eos_id is None:
            raise ValueError(f"{shard_dir}/index.json has no tokenizer_info.eos_id; pass eos_id")
    shards = _Shards(shard_dir, index)
    carry, pending, yielded = np.zeros(0, np.int64), [], 0
    for tokens, offsets in zip(shards.tokens, shards.offsets):
        first = 0
        while first < len(offsets) - 1:
            last = max(first + 1, int(np.searchsorted(offsets, offsets[first] + EVAL_CHUNK_TOKENS)) - 1)
            last = min(last, len(offsets) - 1)
            chunk = np.asarray(tokens[offsets[first]:offsets[last]], dtype=np.int64)
            chunk = np.insert(chunk, offsets[first + 1:last + 1] - offsets[first], eos_id)
            stream = np.concatenate([carry, chunk])
            n = max(0, (len(stream) - 1) // seq_len)
            for k in range(n):
                pending.append(stream[k * seq_len:k * seq_len + seq_len + 1])
                if len(pending) == batch_size:
                    yield torch.from_numpy(np.stack(pending))
                    pending, yielded = [], yielded + 1
                    if max_batches is not None and yielded >= max_batches:
                        return
            carry = stream[n * seq_len:]
            first = last
    if pending:
        yield torch.from_numpy(np.stack(pending))


def shard_stats(shard_dir: Path) -> dict:
    """Sizes of a shard directory from its index.json: tokens, bytes, documents, stream_tokens
    (tokens + one EOS per document, what eval_batches reads) and bytes_per_token (bytes /
    stream_tokens). Validation bits per byte = mean NLL in nats per target / (ln 2 * bytes_per_token)."""
    index = _read_index(shard_dir)
    stream = index["tokens"] + index["documents"]
    return {"tokens": index["tokens"], "bytes": index["bytes"], "documents": index["documents"],
            "stream_tokens": stream, "bytes_per_token": index["bytes"] / stream if stream else 0.0}
