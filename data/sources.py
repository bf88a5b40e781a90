"""Where documents come from: directories of text/code files, `.jsonl` files and `.parquet` files.

One document is one plain file, one `.jsonl` line (its text field) or one `.parquet` row (its text
column). Plain and `.jsonl` files may be compressed (`.gz`, `.zst`): they are decompressed as they
are read. A document is skipped, with a reason, when it is empty (nothing but whitespace), binary
(holds a NUL byte) or not valid UTF-8; the callers count the reasons. Directories are walked
recursively in sorted order; names starting with "." (such as .git) are not entered. Every error
about an input (invalid JSON, a missing field, a corrupt archive or parquet file) is a ValueError
whose message starts with the file, and the line or row group.
"""
from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator, Optional

SKIP_REASONS = ("empty", "binary", "non_utf8")
COMPRESSED = (".gz", ".zst")


def compression(path: Path) -> Optional[str]:
    """".gz" or ".zst" for a compressed file, else None."""
    suffix = Path(path).suffix.lower()
    return suffix if suffix in COMPRESSED else None


def open_binary(path: Path) -> IO[bytes]:
    """The file's bytes, decompressed when it is a .gz or .zst file."""
    kind = compression(path)
    if kind == ".gz":
        return gzip.open(path, "rb")
    if kind == ".zst":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _decompression_errors() -> tuple:
    import zstandard

    return (OSError, EOFError, zstandard.ZstdError)


def check_inputs(paths: Iterable[Path]) -> list[Path]:
    """The inputs as Paths; FileNotFoundError naming the first one that does not exist."""
    out = [Path(p) for p in paths]
    if not out:
        raise ValueError("no input paths given: pass directories, files, .jsonl or .parquet files")
    for p in out:
        if not p.exists():
            raise FileNotFoundError(f"input path does not exist: {p}")
    return out


def normalize_extensions(extensions: Optional[Iterable[str]]) -> Optional[tuple[str, ...]]:
    """("py", ".MD") -> (".py", ".md"); None stays None (every file)."""
    if extensions is None:
        return None
    if isinstance(extensions, str):
        extensions = [extensions]
    return tuple("." + e.lower().lstrip(".") for e in extensions)


def file_kind(path: Path) -> str:
    """'jsonl', 'parquet' or 'text', from the file name (a compression suffix is looked through)."""
    path = Path(path)
    suffix = (path.with_suffix("") if compression(path) else path).suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    return "text"


def list_files(paths: Iterable[Path], extensions: Optional[Iterable[str]] = None) -> list[Path]:
    """Every file under `paths` (a file given by name is always kept; files found by walking a
    directory only when their suffix is in `extensions`, if given). Deterministic order."""
    exts = normalize_extensions(extensions)
    files: list[Path] = []
    for root in check_inputs(paths):
        if root.is_file():
            files.append(root)
            continue
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                if name.startswith("."):
                    continue
                plain = os.path.splitext(name)[0] if compression(Path(name)) else name
                if exts is None or os.path.splitext(plain)[1].lower() in exts:
                    found.append(Path(dirpath) / name)
        files.extend(sorted(found))
    return files


def check_text(text: Optional[str]) -> Optional[str]:
    """The skip reason of a decoded document, or None when it is usable."""
    if text is None or not text.strip():
        return "empty"
    if "\x00" in text:
        return "binary"
    return None


def decode_bytes(raw: bytes) -> tuple[Optional[str], Optional[str]]:
    """(text, None) for a usable document, else (None, reason)."""
    if b"\x00" in raw:
        return None, "binary"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "non_utf8"
    reason = check_text(text)
    return (None, reason) if reason else (text, None)


def read_text_file(path: Path) -> tuple[Optional[str], Optional[str]]:
    """One plain (possibly compressed) file as one document: (text, None) or (None, reason)."""
    try:
        with open_binary(path) as f:
            raw = f.read()
    except _decompression_errors() as e:
        raise ValueError(f"{path}: cannot read: {type(e).__name__}: {e}") from None
    return decode_bytes(raw)


def _jsonl_text(line: bytes, where: Callable[[], str], text_field: str) -> tuple[Optional[str], Optional[str]]:
    """The document of one .jsonl line; `where()` gives "file:line" for an error message."""
    try:
        line_text = line.decode("utf-8")
    except UnicodeDecodeError:
        return None, "non_utf8"
    try:
        record = json.loads(line_text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where()}: invalid JSON: {e}") from None
    if not isinstance(record, dict) or text_field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{where()}: no text field {text_field!r} (found {keys}); set --text-field / text_field")
    text = record[text_field]
    if text is not None and not isinstance(text, str):
        raise ValueError(f"{where()}: field {text_field!r} is a {type(text).__name__}, expected a string")
    reason = check_text(text)
    return (None, reason) if reason else (text, None)


def _line_number(path: Path, offset: int) -> int:
    """1-based number of the line starting at byte `offset` of an uncompressed file (read on error only)."""
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n") + 1


def iter_jsonl(path: Path, text_field: str, start: int = 0,
               end: Optional[int] = None) -> Iterator[tuple[Optional[str], Optional[str]]]:
    """Documents of the lines that begin in the byte range [start, end) of a .jsonl file (a
    compressed one is read whole: its ranges are [(0, None)])."""
    compressed = compression(path) is not None
    number = 0
    try:
        with open_binary(path) as f:
            if start > 0:
                f.seek(start - 1)
                f.readline()  # the line holding byte start-1 belongs to the previous range
            while end is None or f.tell() < end:
                offset = f.tell()
                line = f.readline()
                number += 1
                if not line:
                    break
                if line.strip():
                    line_no = number if compressed else None
                    yield _jsonl_text(line, lambda: f"{path}:{line_no or _line_number(path, offset)}", text_field)
    except _decompression_errors() as e:
        raise ValueError(f"{path}: cannot read after line {number - 1}: {type(e).__name__}: {e}") from None


def jsonl_ranges(path: Path, chunk_bytes: int) -> list[tuple[int, Optional[int]]]:
    """Byte ranges of about `chunk_bytes` covering a .jsonl file (lines go to the range they start
    in); one range (0, None) for a compressed file, which cannot be entered in the middle."""
    if compression(path):
        return [(0, None)]
    size = Path(path).stat().st_size
    return [(s, min(s + chunk_bytes, size)) for s in range(0, size, chunk_bytes)] or [(0, 0)]


def _parquet_file(path: Path, text_field: str):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise ValueError(f"{path}: not a readable parquet file: {type(e).__name__}: {e}") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {names}); "
                         f"set --text-field / text_field")
    return pf


def parquet_row_groups(path: Path, text_field: str) -> int:
    """Number of row groups of a .parquet file whose `text_field` column exists."""
    return _parquet_file(path, text_field).num_row_groups


def iter_parquet(path: Path, text_field: str,
                 row_group: Optional[int] = None) -> Iterator[tuple[Optional[str], Optional[str]]]:
    """Documents of one row group (or all) of a .parquet file's `text_field` column."""
    pf = _parquet_file(path, text_field)
    groups = range(pf.num_row_groups) if row_group is None else [row_group]
    for g in groups:
        try:
            values = pf.read_row_group(g, columns=[text_field]).column(0).to_pylist()
        except Exception as e:  # pyarrow raises several types for a damaged row group
            raise ValueError(f"{path}: row group {g}: {type(e).__name__}: {e}") from None
        for value in values:
            if isinstance(value, (bytes, bytearray)):
                yield decode_bytes(bytes(value))
            else:
                reason = check_text(value)
                yield (None, reason) if reason else (value, None)


def iter_file(path: Path, text_field: str = "text") -> Iterator[tuple[Optional[str], Optional[str]]]:
    """(text, None) or (None, reason) for each document of one file, whatever its kind."""
    kind = file_kind(path)
    if kind == "jsonl":
        yield from iter_jsonl(path, text_field)
    elif kind == "parquet":
        yield from iter_parquet(path, text_field)
    else:
        yield read_text_file(path)


def iter_documents(paths: Iterable[Path], text_field: str = "text",
                   extensions: Optional[Iterable[str]] = None,
                   skipped: Optional[dict] = None) -> Iterator[str]:
    """The usable documents under `paths`; skip reasons are counted into `skipped` if given."""
    for path in list_files(paths, extensions):
        for text, reason in iter_file(path, text_field):
            if text is not None:
                yield text
            elif skipped is not None:
                skipped[reason] = skipped.get(reason, 0) + 1
