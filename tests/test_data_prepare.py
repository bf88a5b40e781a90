"""Token shards (data/prepare.py): skipped files are counted, missing paths fail clearly, jsonl and
parquet inputs, shard contents equal direct encoding, parallel == serial, resume after interruption."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import data.prepare as prep
from data.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def make_texts(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["def", "return", "self", "value", "π", "日本", "x", "(", ")", ":\n", "    ", "1", "42", "#",
             "é"]
    return [" ".join(rng.choice(words, size=int(rng.integers(5, 120)))) + "\n" for _ in range(n)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(make_texts(200, seed=1), 400, tmp_path_factory.mktemp("tok"))


def read_shards(out):
    """Documents (token lists) of a shard directory, in order, straight from the files."""
    index = json.loads((out / "index.json").read_text())
    docs = []
    for name in index["shards"]:
        tokens = np.fromfile(out / f"{name}.bin", dtype="<u4")
        offsets = np.load(out / f"{name}.idx.npy")
        assert offsets.dtype == np.int64 and offsets[0] == 0 and offsets[-1] == len(tokens)
        docs += [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    return index, docs


def write_tree(root, texts):
    """Text files in nested folders; returns the texts in the order prepare walks them."""
    files = {}
    for i, text in enumerate(texts):
        path = root / f"d{i % 3}" / f"f{i:03d}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        files[path] = text
    return [files[p] for p in sorted(files)]


def test_skips_empty_binary_and_non_utf8_with_counts_via_cli(tok, tmp_path):
    src = tmp_path / "src"
    good = write_tree(src, make_texts(5))
    (src / "empty.txt").write_bytes(b"")
    (src / "blank.md").write_text("  \n\t\n")
    (src / "image.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (src / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    out = subprocess.run([sys.executable, "-m", "data.prepare", str(src), "--tokenizer", str(tok.path),
                          "--out", str(tmp_path / "out"), "--workers", "2"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["skipped"] == {"empty": 2, "binary": 1, "non_utf8": 1}
    assert summary["documents"] == len(good)
    index, docs = read_shards(tmp_path / "out")
    assert index["skipped"] == summary["skipped"] and index["documents"] == len(good)
    assert docs == [tok.encode(t) for t in good]
    assert index["bytes"] == sum(len(t.encode("utf-8")) for t in good)
    assert index["tokens"] == sum(map(len, docs))


def test_missing_path_fails_at_once_naming_it(tok, tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        prep.prepare([tmp_path, missing], tok, tmp_path / "out")
    out = subprocess.run([sys.executable, "-m", "data.prepare", str(missing), "--tokenizer", str(tok.path),
                          "--out", str(tmp_path / "out2")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0
    assert f"input path does not exist: {missing}" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "out2").exists()


def test_jsonl_and_parquet_inputs(tok, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = make_texts(23, seed=3)
    jsonl = tmp_path / "docs.jsonl"
    records = [{"content": t, "id": i} for i, t in enumerate(texts[:15])] + [{"content": ""}]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    table = pa.table({"content": texts[15:] + [None], "n": list(range(9))})
    pq.write_table(table, tmp_path / "docs.parquet", row_group_size=3)
    monkeypatch.setattr(prep, "JSONL_CHUNK_BYTES", 97)  # many byte ranges: no line lost or doubled
    index = prep.prepare([jsonl, tmp_path / "docs.parquet"], tok, tmp_path / "out", workers=1,
                         text_field="content", progress=False)
    assert index["skipped"] == {"empty": 2, "binary": 0, "non_utf8": 0}
    _, docs = read_shards(tmp_path / "out")
    assert docs == [tok.encode(t) for t in texts]
    with pytest.raises(ValueError, match="text field 'text'"):
        prep.prepare([jsonl], tok, tmp_path / "out2", workers=1, progress=False)
    with pytest.raises(ValueError, match="no column 'text'"):
        prep.prepare([tmp_path / "docs.parquet"], tok, tmp_path / "out3", workers=1, progress=False)


def test_parallel_equals_serial_and_direct_encoding(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "UNIT_BYTES", 2000)
    texts = write_tree(tmp_path / "src", make_texts(60, seed=4))
    serial = prep.prepare([tmp_path / "src"], tok, tmp_path / "s", workers=1, shard_tokens=700, progress=False)
    parallel = prep.prepare([tmp_path / "src"], tok.path, tmp_path / "p", workers=2, shard_tokens=700,
                            progress=False)
    assert len(serial["shards"]) >= 3 and serial["shards"] == parallel["shards"]
    for name in serial["shards"]:
        for suffix in (".bin", ".idx.npy"):
            a, b = (tmp_path / run / f"{name}{suffix}" for run in ("s", "p"))
            assert a.read_bytes() == b.read_bytes()
    _, docs = read_shards(tmp_path / "p")
    assert docs == [tok.encode(t) for t in texts]
    assert parallel["tokenizer_info"]["eos_id"] == tok.eos_id


def snapshot(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_resume_after_interruption_gives_identical_outputs(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "UNIT_BYTES", 1500)
    write_tree(tmp_path / "src", make_texts(50, seed=5))
    out = tmp_path / "out"
    first = prep.prepare([tmp_path / "src"], tok, out, workers=2, shard_tokens=600, progress=False)
    assert len(first["shards"]) >= 4
    reference = snapshot(out)

    (out / "index.json").unlink()           # interrupted: index not written, one shard lost,
    (out / "shard_00002.bin").unlink()      # and a half-written shard left behind
    (out / "shard_00003.bin").rename(out / "shard_00003.bin.tmp")
    calls = []
    real = prep._encode_unit
    monkeypatch.setattr(prep, "_encode_unit", lambda unit: calls.append(unit) or real(unit))
    again = prep.prepare([tmp_path / "src"], tok, out, workers=1, shard_tokens=600, progress=False)
    assert again == first and snapshot(out) == reference
    marker = json.loads((out / "shard_00001.json").read_text())
    assert len(calls) == len(prep._plan_units([tmp_path / "src"], "text", None)[0]) - marker["units"][1]

    calls.clear()
    assert prep.prepare([tmp_path / "src"], tok, out, workers=1, shard_tokens=600, progress=False) == first
    assert calls == []  # complete: nothing redone

    (tmp_path / "src" / "d0" / "f000.py").write_text("changed content\n")
    changed = prep.prepare([tmp_path / "src"], tok, out, workers=1, shard_tokens=600, progress=False)
    assert changed["plan"] != first["plan"]
    _, docs = read_shards(out)
    assert docs[0] == tok.encode("changed content\n")


def test_extensions_filter(tok, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    (tmp_path / "src" / "b.md").write_text("# title\n")
    (tmp_path / "src" / "c.txt").write_text("plain\n")
    (tmp_path / "src" / ".hidden.py").write_text("hidden = 1\n")
    index = prep.prepare([tmp_path / "src"], tok, tmp_path / "out", workers=1, extensions=["py", ".MD"],
                         progress=False)
    _, docs = read_shards(tmp_path / "out")
    assert docs == [tok.encode("x = 1\n"), tok.encode("# title\n")] and index["documents"] == 2
