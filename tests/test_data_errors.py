"""Bad data: compressed .jsonl.gz / .jsonl.zst / .txt.gz read like their plain form; errors name the
file and line or row group; an empty dataset fails preparation; the trainer refuses, before
training, shards of another tokenizer, token ids outside the vocabulary, a damaged shard and a
validation split too small for eval.batches."""
import gzip
import json
import shutil

import numpy as np
import pytest
import zstandard

import data.prepare as prep
from data.tokenizer import train_tokenizer
from training.config import ConfigError, compose_job
from training.inputs import check_data

TEXTS = [f"def f{i}(x):\n    return x + {i} * {i}\n" for i in range(40)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(TEXTS, 300, tmp_path_factory.mktemp("tok"))


def jsonl_bytes(texts):
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


def docs(out_dir):
    index = json.loads((out_dir / "index.json").read_text())
    return [np.fromfile(out_dir / f"{name}.bin", dtype="<u4").tolist() for name in index["shards"]]


def test_compressed_inputs_read_like_plain_ones(tok, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_bytes(jsonl_bytes(TEXTS))
    (src / "b.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(TEXTS)))
    (src / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(TEXTS)))
    (src / "d.py.gz").write_bytes(gzip.compress(TEXTS[0].encode()))
    plain = prep.prepare([src / "a.jsonl"], tok, tmp_path / "plain", workers=1, progress=False)
    for name in ("b.jsonl.gz", "c.jsonl.zst"):
        index = prep.prepare([src / name], tok, tmp_path / name, workers=1, progress=False)
        assert index["documents"] == plain["documents"] == len(TEXTS)
        assert docs(tmp_path / name) == docs(tmp_path / "plain")
    walked = prep.prepare([src], tok, tmp_path / "all", workers=1, extensions=[".jsonl", ".py"], progress=False)
    assert walked["documents"] == 3 * len(TEXTS) + 1
    assert walked["tokenizer_fingerprint"] == tok.fingerprint() and walked["max_token_id"] < tok.vocab_size


def test_errors_name_the_file_and_line_or_row_group(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = jsonl_bytes(TEXTS[:5]).splitlines(keepends=True)
    bad = b"".join(lines[:3] + [b'{"text": "unterminated\n'] + lines[3:])
    (tmp_path / "bad.jsonl").write_bytes(bad)
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(bad))
    for name in ("bad.jsonl", "bad.jsonl.gz"):
        with pytest.raises(ValueError, match=f"^{tmp_path / name}:4: invalid JSON"):
            prep.prepare([tmp_path / name], tok, tmp_path / f"out_{name}", workers=1, progress=False)
    (tmp_path / "torn.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(TEXTS))[:-30])
    with pytest.raises(ValueError, match=f"^{tmp_path / 'torn.jsonl.gz'}: cannot read after line"):
        prep.prepare([tmp_path / "torn.jsonl.gz"], tok, tmp_path / "out_torn", workers=1, progress=False)
    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "ok.parquet", row_group_size=10)
    damaged = bytearray((tmp_path / "ok.parquet").read_bytes())
    damaged[-12:-8] = b"\xff\xff\xff\x7f"  # footer length
    (tmp_path / "damaged.parquet").write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=f"^{tmp_path / 'damaged.parquet'}: not a readable parquet file"):
        prep.prepare([tmp_path / "damaged.parquet"], tok, tmp_path / "out_pq", workers=1, progress=False)


def test_empty_dataset_fails_preparation(tok, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "empty.py").write_text("  \n")
    (tmp_path / "src" / "blank.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(ValueError, match="no usable document in .*skipped: {'empty': 2"):
        prep.prepare([tmp_path / "src"], tok, tmp_path / "out", workers=1, progress=False)
    assert not (tmp_path / "out" / "index.json").exists()
    assert prep.main([str(tmp_path / "src"), "--tokenizer", str(tok.path), "--out", str(tmp_path / "o"),
                      "--workers", "1", "--no-progress"]) == 2


def test_trainer_refuses_bad_shards_before_training(tok, tmp_path):
    src = tmp_path / "src.jsonl"
    src.write_bytes(jsonl_bytes(TEXTS))
    prep.prepare([src], tok, tmp_path / "train", workers=1, progress=False)
    shutil.copytree(tmp_path / "train", tmp_path / "val")
    cfg = compose_job(["train.seq_len=16", "eval.batches=2", "eval.batch_size=4"])
    check_data(cfg, tmp_path / "train", tmp_path / "val", tok)  # fine as prepared

    other = train_tokenizer([t.upper() for t in TEXTS], 300, tmp_path / "other_tok")
    with pytest.raises(ConfigError, match=f"shard directory {tmp_path / 'train'} was prepared with another "
                                          f"tokenizer .*fingerprint {tok.fingerprint()}.*not with this job's "
                                          f"tokenizer \\(fingerprint {other.fingerprint()}\\)"):
        check_data(cfg, tmp_path / "train", tmp_path / "val", other)

    tokens = sum(len(d) for d in docs(tmp_path / "val"))
    too_many = compose_job(["train.seq_len=16", "eval.batches=1000", "eval.batch_size=4"])
    with pytest.raises(ConfigError, match=f"the validation split {tmp_path / 'val'} has {tokens + len(TEXTS)} "
                                          f"tokens, eval.batches x eval.batch_size x train.seq_len = 1000 x 4 x 16 "
                                          f"needs 64001"):
        check_data(too_many, tmp_path / "train", tmp_path / "val", tok)

    index = json.loads((tmp_path / "val" / "index.json").read_text())
    index["max_token_id"] = tok.vocab_size
    (tmp_path / "val" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=f"holds token id {tok.vocab_size}, outside the vocabulary"):
        check_data(cfg, tmp_path / "train", tmp_path / "val", tok)

    bin_file = tmp_path / "train" / "shard_00000.bin"
    bin_file.write_bytes(bin_file.read_bytes()[:-8])
    with pytest.raises(ConfigError, match=f"{bin_file} holds .* tokens, its index shard_00000.idx.npy says"):
        check_data(cfg, tmp_path / "train", tmp_path / "train", tok)
