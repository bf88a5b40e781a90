"""The built-in standard-library corpus (data/builtin.py): deterministic split, cache reuse, usable shards."""
import json
import time

from data.builtin import split_files, stdlib_corpus, stdlib_files
from data.dataset import PackedDataset, eval_batches, shard_stats
from data.tokenizer import load_tokenizer


def test_split_is_deterministic_disjoint_and_seeded():
    root, files = stdlib_files()
    assert files == sorted(files) and all(f.suffix == ".py" for f in files)
    assert not any(part in ("site-packages", "test", "tests", "__pycache__")
                   for f in files for part in f.relative_to(root).parts)
    train, val = split_files(root, files, 0.05, seed=0)
    assert split_files(root, files, 0.05, seed=0) == (train, val)
    assert not set(train) & set(val) and len(train) + len(val) == len(files)
    assert 0.02 < len(val) / len(files) < 0.1
    assert split_files(root, files, 0.05, seed=1)[1] != val
    _, small = stdlib_files(max_bytes=200_000)
    assert sum(f.stat().st_size for f in small) <= 200_000 and set(small) <= set(files)


def test_first_use_builds_then_cache_is_reused(tmp_path):
    corpus = stdlib_corpus(tmp_path, 512, max_bytes=300_000)
    ready = json.loads(next(tmp_path.glob("stdlib-v512-*/ready.json")).read_text())
    tok = load_tokenizer(corpus.tokenizer_dir)
    assert tok.vocab_size == 512 == ready["vocab_size"]
    for split in (corpus.train_dir, corpus.val_dir):
        index = json.loads((split / "index.json").read_text())
        assert index["documents"] > 0 and index["tokens"] > 0
        assert index["tokenizer_info"]["eos_id"] == tok.eos_id
    assert shard_stats(corpus.train_dir)["tokens"] == ready["train"]["tokens"]
    start = time.perf_counter()
    assert stdlib_corpus(tmp_path, 512, max_bytes=300_000) == corpus
    assert time.perf_counter() - start < 1.0
    ds = PackedDataset(corpus.train_dir, 32)
    assert ds.next_batch(4).shape == (4, 33)
    assert next(eval_batches(corpus.val_dir, 32, 2)).shape == (2, 33)
    other = stdlib_corpus(tmp_path, 600, max_bytes=300_000)
    assert other.train_dir != corpus.train_dir
