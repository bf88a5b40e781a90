"""Corpus -> token shards: `python -m data.prepare INPUT... --tokenizer PATH --out DIR`.

Inputs are directories of text/code files (walked recursively), `.jsonl` files (one document per
line, its `text_field`) and `.parquet` files (one document per row of the `text_field` column).
Empty, binary (NUL byte) and non-UTF-8 documents are skipped and counted.

Output in `out_dir`:
- `shard_00000.bin`: raw little-endian uint32 token ids, documents concatenated (no EOS inserted;
  the dataset joins documents with EOS when it packs them);
- `shard_00000.idx.npy`: int64 document start offsets into the shard, length documents + 1;
- `shard_00000.json`: what the shard covers (its work units, counts); its presence marks the shard
  complete, so an interrupted run resumes after the last complete shard;
- `index.json` (written last): shard names, totals of documents, tokens and UTF-8 bytes (for
  bits per byte), the tokenizer path, ids and fingerprint (`Tokenizer.fingerprint`: the trainer
  refuses shards made with another tokenizer), the largest token id, skip counts.

Inputs with no usable document are an error (nothing is written); every error about an input
names the file and the line or row group (data/sources.py).

The work is cut into units (runs of plain files of about `UNIT_BYTES`, byte ranges of `.jsonl`
files, `.parquet` row groups) before anything is tokenized; units are tokenized in parallel and
written in order, and a shard is closed after the unit that brings it to `shard_tokens`. The
output therefore depends only on the inputs, the tokenizer and `shard_tokens`, not on `workers`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import sys
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

from data import sources
from data.tokenizer import Tokenizer, load_tokenizer

UNIT_BYTES = 1 << 20
JSONL_CHUNK_BYTES = 16 << 20
DEFAULT_SHARD_TOKENS = 1 << 26
FORMAT = 2  # 2: index.json records the tokenizer fingerprint and the largest token id

_TOKENIZER: Optional[Tokenizer] = None
_TEXT_FIELD = "text"


def _plan_units(inputs: list[Path], text_field: str, extensions) -> tuple[list[list[list]], list[int]]:
    """Work units (lists of items ["text", path] / ["jsonl", path, start, end] /
    ["parquet", path, row_group]) and the input bytes each one reads (for the progress bar)."""
    units, sizes, run, run_bytes = [], [], [], 0
    for path in sources.list_files(inputs, extensions):
        kind = sources.file_kind(path)
        size = path.stat().st_size
        if kind == "text":
            run.append(["text", str(path)])
            run_bytes += size
            if run_bytes >= UNIT_BYTES:
                units.append(run)
                sizes.append(run_bytes)
                run, run_bytes = [], 0
        elif kind == "jsonl":
            for start, end in sources.jsonl_ranges(path, JSONL_CHUNK_BYTES):
                units.append([["jsonl", str(path), start, end]])
                sizes.append(size if end is None else end - start)
        else:
            groups = sources.parquet_row_groups(path, text_field)
            units += [[["parquet", str(path), g]] for g in range(groups)]
            sizes += [size // max(groups, 1)] * groups
    if run:
        units.append(run)
        sizes.append(run_bytes)
    return units, sizes


def _init_worker(tokenizer_path: str, text_field: str) -> None:
    global _TOKENIZER, _TEXT_FIELD
    _TOKENIZER = load_tokenizer(Path(tokenizer_path))
    _TEXT_FIELD = text_field


def _encode_unit(unit: list[list]) -> tuple[np.ndarray, np.ndarray, int, dict]:
    """(tokens uint32, document lengths int64, UTF-8 bytes, skip counts) of one unit."""
    texts, skipped = [], dict.fromkeys(sources.SKIP_REASONS, 0)
    for item in unit:
        path = Path(item[1])
        if item[0] == "text":
            docs = [sources.read_text_file(path)]
        elif item[0] == "jsonl":
            docs = sources.iter_jsonl(path, _TEXT_FIELD, item[2], item[3])
        else:
            docs = sources.iter_parquet(path, _TEXT_FIELD, item[2])
        for text, reason in docs:
            if text is None:
                skipped[reason] += 1
            else:
                texts.append(text)
    encoded = [np.asarray(ids, dtype=np.uint32) for ids in _TOKENIZER.encode_batch(texts)] if texts else []
    lengths = np.array([len(ids) for ids in encoded], dtype=np.int64)
    tokens = np.concatenate(encoded) if encoded else np.zeros(0, dtype=np.uint32)
    return tokens, lengths, sum(len(t.encode("utf-8")) for t in texts), skipped


def _fingerprint(units, tokenizer_path: Path, text_field: str, shard_tokens: int) -> str:
    h = hashlib.sha256(json.dumps([FORMAT, units, text_field, shard_tokens]).encode())
    for item in units:
        for it in item:
            st = os.stat(it[1])
            h.update(f"{it[1]}:{st.st_size}:{st.st_mtime_ns}".encode())
    files = [tokenizer_path] if tokenizer_path.is_file() else sorted(
        p for p in tokenizer_path.iterdir() if p.suffix in (".json", ".model"))
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


def _shard_name(k: int) -> str:
    return f"shard_{k:05d}"


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _completed_shards(out_dir: Path, plan: str) -> list[dict]:
    """Markers of the complete shards 0..k-1 of this plan (stops at the first missing/bad one)."""
    done = []
    while True:
        name = _shard_name(len(done))
        try:
            marker = json.loads((out_dir / f"{name}.json").read_text())
            ok = (marker["plan"] == plan
                  and (out_dir / f"{name}.bin").stat().st_size == 4 * marker["tokens"]
                  and (out_dir / f"{name}.idx.npy").is_file())
        except (OSError, ValueError, KeyError):
            ok = False
        if not ok:
            return done
        done.append(marker)


def _remove_from(out_dir: Path, first_shard: int) -> None:
    """Delete index.json and every shard file numbered >= first_shard (left by an older run)."""
    (out_dir / "index.json").unlink(missing_ok=True)
    for f in out_dir.glob("shard_*"):
        digits = f.name[len("shard_"):len("shard_") + 5]
        if digits.isdigit() and int(digits) >= first_shard:
            f.unlink()


class _ShardWriter:
    """Appends encoded units to the open shard; `close` makes it complete (bin, idx, marker)."""

    def __init__(self, out_dir: Path, index: int, first_unit: int, plan: str):
        self.out_dir, self.index, self.plan = out_dir, index, plan
        self.first_unit = first_unit
        self.tmp = out_dir / f"{_shard_name(index)}.bin.tmp"
        self.file = open(self.tmp, "wb")
        self.offsets = [0]
        self.bytes = 0
        self.max_token_id = -1
        self.skipped = dict.fromkeys(sources.SKIP_REASONS, 0)

    @property
    def tokens(self) -> int:
        return self.offsets[-1]

    def add(self, tokens: np.ndarray, lengths: np.ndarray, n_bytes: int, skipped: dict) -> None:
        self.file.write(tokens.astype("<u4", copy=False).tobytes())
        self.offsets += (self.tokens + np.cumsum(lengths)).tolist()
        self.max_token_id = max(self.max_token_id, int(tokens.max()) if len(tokens) else -1)
        self.bytes += n_bytes
        for k, v in skipped.items():
            self.skipped[k] += v

    def close(self, end_unit: int) -> Optional[dict]:
        """Finish the shard; None (and nothing kept) when it holds no documents."""
        self.file.close()
        if len(self.offsets) == 1:
            self.tmp.unlink()
            return None
        name = _shard_name(self.index)
        idx_tmp = self.out_dir / f"{name}.idx.tmp.npy"
        np.save(idx_tmp, np.array(self.offsets, dtype=np.int64))
        os.replace(idx_tmp, self.out_dir / f"{name}.idx.npy")
        os.replace(self.tmp, self.out_dir / f"{name}.bin")
        marker = {"plan": self.plan, "units": [self.first_unit, end_unit],
                  "documents": len(self.offsets) - 1, "tokens": self.tokens,
                  "bytes": self.bytes, "max_token_id": self.max_token_id, "skipped": self.skipped}
        _write_json(self.out_dir / f"{name}.json", marker)
        return marker


def _results(units: list, tok: Tokenizer, text_field: str, workers: int):
    """Encoded units, in order, from a process pool (or this process when workers <= 1)."""
    global _TOKENIZER, _TEXT_FIELD
    if workers <= 1 or len(units) <= 1:
        _TOKENIZER, _TEXT_FIELD = tok, text_field
        yield from map(_encode_unit, units)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    try:
        pool = mp.get_context(method).Pool(min(workers, len(units)), _init_worker,
                                           (str(tok.path), text_field))
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    with pool:
        yield from pool.imap(_encode_unit, units, chunksize=1)


def prepare(inputs: list[Path], tokenizer: Union[Tokenizer, Path], out_dir: Path, workers: int = 2,
            text_field: str = "text", extensions: Optional[Iterable[str]] = None,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, progress: bool = True) -> dict:
    """Tokenize `inputs` into uint32 shards in `out_dir` (see the module docstring) and return the
    index.json summary. Resumes after the complete shards of an interrupted run with the same
    inputs, tokenizer and shard_tokens; returns at once when index.json is already complete."""
    from tqdm import tqdm

    inputs = sources.check_inputs(inputs)
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(Path(tokenizer))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tok.path is None:
        tok.save(out_dir / "tokenizer")
    units, unit_bytes = _plan_units(inputs, text_field, extensions)
    plan = _fingerprint(units, tok.path, text_field, shard_tokens)
    try:
        index = json.loads((out_dir / "index.json").read_text())
        if index.get("plan") == plan and len(_completed_shards(out_dir, plan)) == len(index["shards"]):
            return index
    except (OSError, ValueError):
        pass
    done = _completed_shards(out_dir, plan)
    _remove_from(out_dir, len(done))
    start = done[-1]["units"][1] if done else 0
    bar = tqdm(total=sum(unit_bytes), initial=sum(unit_bytes[:start]),
               unit="B", unit_scale=True, desc=f"prepare {out_dir.name}", file=sys.stderr,
               disable=not progress)
    tail = dict.fromkeys(sources.SKIP_REASONS, 0)
    writer = _ShardWriter(out_dir, len(done), start, plan)
    for u, result in enumerate(_results(units[start:], tok, text_field, workers), start):
        writer.add(*result)
        bar.update(unit_bytes[u])
        if writer.tokens >= shard_tokens:
            done.append(writer.close(u + 1))
            writer = _ShardWriter(out_dir, len(done), u + 1, plan)
    pending = writer.skipped
    marker = writer.close(len(units))
    if marker is not None:
        done.append(marker)
    else:
        tail = pending
    bar.close()
    skipped = {k: tail[k] + sum(m["skipped"][k] for m in done) for k in sources.SKIP_REASONS}
    if not done:
        raise ValueError(f"no usable document in {', '.join(map(str, inputs))} ({len(units)} work units read, "
                         f"skipped: {skipped}); nothing written to {out_dir}")
    info = dict(tok.info(), split_table=sorted([k, v] for k, v in tok.split_table().items()))
    index = {"shards": [_shard_name(k) for k in range(len(done))],
             "documents": sum(m["documents"] for m in done), "tokens": sum(m["tokens"] for m in done),
             "bytes": sum(m["bytes"] for m in done), "tokenizer": str(tok.path),
             "tokenizer_info": info, "tokenizer_fingerprint": tok.fingerprint(),
             "max_token_id": max(m.get("max_token_id", -1) for m in done), "skipped": skipped, "plan": plan,
             "shard_tokens": shard_tokens, "text_field": text_field,
             "inputs": [str(p) for p in inputs]}
    _write_json(out_dir / "index.json", index)
    return index


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.split("\n")[0])
    p.add_argument("inputs", nargs="+", type=Path, help="directories, files, .jsonl, .parquet")
    p.add_argument("--tokenizer", required=True, type=Path, help="tokenizer directory or file")
    p.add_argument("--out", required=True, type=Path, help="output directory for the shards")
    p.add_argument("--workers", type=int, default=2, help="tokenizer processes (default 2)")
    p.add_argument("--text-field", default="text", help="text field/column of .jsonl/.parquet")
    p.add_argument("--extensions", nargs="*", default=None,
                   help="only files with these suffixes inside directories (e.g. .py .md)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help=f"close a shard once it holds this many tokens (default {DEFAULT_SHARD_TOKENS})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        index = prepare(args.inputs, args.tokenizer, args.out, args.workers, args.text_field,
                        args.extensions, args.shard_tokens, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(args.out), "shards": len(index["shards"]),
                      **{k: index[k] for k in ("documents", "tokens", "bytes", "skipped", "tokenizer")}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
