"""The built-in corpus of the default job: the `.py` files of the running interpreter's standard library.

Every machine with Python has it, so `make train` needs no download. Files come from
`sysconfig.get_paths()["stdlib"]`, leaving out site-packages/dist-packages, test directories and
__pycache__; beyond `MAX_BYTES` a subset is picked in hash order of the paths (CPython 3.11 holds
about 11 MB of such code, under the 32 MB cap, so all of it is used). A file goes to validation
when a hash of (seed, its relative path) falls below `val_fraction`, so the split is
deterministic and does not move when other files change.

On first use the BPE tokenizer is trained on the training split and both splits are prepared into
`cache_dir/stdlib-v<vocab>-<key>/{tokenizer,train,val}`; the key hashes the file list (paths and
sizes), the Python version, seed and val_fraction. Later calls find `ready.json` and return at once.
A file lock lets several processes (torchrun ranks) ask at the same time: one builds, the others wait.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                           "__pycache__"})
MAX_BYTES = 32 << 20
FORMAT = 1


@dataclass(frozen=True)
class BuiltinCorpus:
    """Prepared shard directories of the two splits and the tokenizer they were encoded with."""
    train_dir: Path
    val_dir: Path
    tokenizer_dir: Path


def stdlib_files(max_bytes: Optional[int] = None) -> tuple[Path, list[Path]]:
    """(stdlib root, its .py files outside EXCLUDED_DIRS, sorted): all of them, or a subset of
    at most max_bytes (default MAX_BYTES) taken in hash order of their paths."""
    max_bytes = MAX_BYTES if max_bytes is None else max_bytes
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith("."))
        found += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    files, total = [], 0
    for path in sorted(found, key=lambda p: hashlib.sha256(p.relative_to(root).as_posix().encode()).digest()):
        total += path.stat().st_size
        if total > max_bytes:
            break
        files.append(path)
    files.sort()
    if not files:
        raise FileNotFoundError(f"no .py files found under the standard library at {root}")
    return root, files


def split_files(root: Path, files: list[Path], val_fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Deterministic (train, val) split by a hash of (seed, relative path); each split non-empty."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(files) < 2:
        raise ValueError(f"the standard library at {root} has {len(files)} .py file(s); need >= 2")

    def unit(path: Path) -> float:
        digest = hashlib.sha256(f"{seed}:{path.relative_to(root).as_posix()}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2.0 ** 64

    scores = [unit(p) for p in files]
    val = [p for p, s in zip(files, scores) if s < val_fraction]
    if not val:
        val = [files[min(range(len(files)), key=scores.__getitem__)]]
    if len(val) == len(files):
        val = val[:-1]
    chosen = set(val)
    return [p for p in files if p not in chosen], val


@contextmanager
def _locked(lock_path: Path):
    """Hold an exclusive lock on lock_path (POSIX); elsewhere proceed without one."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def stdlib_corpus(cache_dir: Path, vocab_size: int, val_fraction: float = 0.05, seed: int = 0,
                  max_bytes: Optional[int] = None) -> BuiltinCorpus:
    """The standard-library corpus for `vocab_size`: trains and prepares it on first use (tokenizer
    + train/val shards under cache_dir), reuses the cache afterwards. `max_bytes` caps the code
    used (default MAX_BYTES)."""
    from data.prepare import prepare
    from data.tokenizer import train_tokenizer

    root, files = stdlib_files(max_bytes)
    train, val = split_files(root, files, val_fraction, seed)
    listing = [[p.relative_to(root).as_posix(), p.stat().st_size] for p in files]
    identity = json.dumps([FORMAT, sys.version, seed, val_fraction, listing]).encode()
    key = hashlib.sha256(identity).hexdigest()[:12]
    cache_dir = Path(cache_dir)
    home = cache_dir / f"stdlib-v{vocab_size}-{key}"
    corpus = BuiltinCorpus(home / "train", home / "val", home / "tokenizer")
    if (home / "ready.json").is_file():
        return corpus
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / f"{home.name}.lock"):
        if (home / "ready.json").is_file():
            return corpus
        print(f"building the built-in corpus (Python standard library, {len(files)} files) in {home}",
              file=sys.stderr)
        t0 = time.perf_counter()
        tok = train_tokenizer(train, vocab_size, corpus.tokenizer_dir, kind="bpe")
        workers = min(2, os.cpu_count() or 1)
        tr = prepare(train, tok, corpus.train_dir, workers=workers)
        va = prepare(val, tok, corpus.val_dir, workers=workers)
        summary = {"seconds": round(time.perf_counter() - t0, 2), "vocab_size": tok.vocab_size,
                   "train": {k: tr[k] for k in ("documents", "tokens", "bytes")},
                   "val": {k: va[k] for k in ("documents", "tokens", "bytes")}}
        (home / "ready.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"built-in corpus ready: {json.dumps(summary)}", file=sys.stderr)
    return corpus
