"""Packed batches (data/dataset.py) against a direct reference: packing, FIM (PSM), token-boundary
splitting, data-parallel slices, exact resume across epochs, validation windows, errors."""
import json

import numpy as np
import pytest
import torch

import data.prepare as prep
from data.dataset import PackedDataset, eval_batches, shard_stats
from data.tokenizer import train_tokenizer

SEQ = 16


def make_texts(n, seed):
    rng = np.random.default_rng(seed)
    words = ["def", "f(x):\n", "return", "x", "):\n", "y", "=", "1", "2", "{", "}\n", "]\n", "é", "π"]
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(tokenizer, shard dir, directly encoded documents in index order) with several shards."""
    tmp = tmp_path_factory.mktemp("ds")
    tok = train_tokenizer(make_texts(300, seed=1), 350, tmp / "tok")
    texts = make_texts(120, seed=2)
    jsonl = tmp / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    old = prep.JSONL_CHUNK_BYTES
    prep.JSONL_CHUNK_BYTES = 400
    try:
        index = prep.prepare([jsonl], tok, tmp / "shards", workers=1, shard_tokens=300, progress=False)
    finally:
        prep.JSONL_CHUNK_BYTES = old
    assert len(index["shards"]) >= 3
    return tok, tmp / "shards", [tok.encode(t) for t in texts]


def reference_stream(docs, eos, seed, epochs):
    """Documents shuffled per epoch by default_rng([seed, epoch]), each followed by EOS."""
    out = []
    for e in range(epochs):
        for d in np.random.default_rng([seed, e]).permutation(len(docs)):
            out += docs[d] + [eos]
    return out


def stream_of(rows):
    """Undo the packing: consecutive sequences share one token."""
    out = list(rows[0])
    for row in rows[1:]:
        assert row[0] == out[-1]
        out += row[1:]
    return out


def batches(ds, steps, global_batch):
    return [ds.next_batch(global_batch) for _ in range(steps)]


def test_packing_equals_reference_over_epochs(corpus):
    tok, shards, docs = corpus
    ds = PackedDataset(shards, SEQ, seed=7, fim_rate=0.0)
    total = sum(map(len, docs)) + len(docs)
    steps = 2 * total // (SEQ * 8) + 3  # past two epoch boundaries
    got = batches(ds, steps, 8)
    assert all(b.dtype == torch.int64 and b.shape == (8, SEQ + 1) for b in got)
    ref = reference_stream(docs, tok.eos_id, seed=7, epochs=4)
    rows = [r.tolist() for b in got for r in b]
    for k, row in enumerate(rows):
        assert row == ref[k * SEQ:k * SEQ + SEQ + 1]
    assert ds.epoch == 2
    other_seed = PackedDataset(shards, SEQ, seed=8, fim_rate=0.0).next_batch(8)
    assert not torch.equal(other_seed, got[0])


def parse_documents(stream, tok):
    """Split a stream into its documents at EOS."""
    docs, cur = [], []
    for t in stream:
        if t == tok.eos_id:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    return docs


def test_fim_rate_and_psm_structure(corpus):
    tok, shards, docs = corpus
    ds = PackedDataset(shards, SEQ, seed=3, tokenizer_info=tok, fim_rate=0.5)
    total = sum(map(len, docs)) + len(docs) + 3 * len(docs)
    rows = [r.tolist() for b in batches(ds, 3 * total // (SEQ * 4) + 2, 4) for r in b]
    seen = parse_documents(stream_of(rows), tok)[:3 * len(docs)]  # three whole epochs
    originals = sorted(map(tuple, docs))
    n_fim = 0
    for epoch in range(3):
        rebuilt = []
        for doc in seen[epoch * len(docs):(epoch + 1) * len(docs)]:
            if doc and doc[0] == tok.fim_begin_id:
                n_fim += 1
                hole, end = doc.index(tok.fim_hole_id), doc.index(tok.fim_end_id)
                assert hole < end
                prefix, suffix, middle = doc[1:hole], doc[hole + 1:end], doc[end + 1:]
                for special in (tok.fim_begin_id, tok.fim_hole_id, tok.fim_end_id):
                    assert special not in prefix + suffix + middle
                doc = prefix + middle + suffix
            rebuilt.append(tuple(doc))
        assert sorted(rebuilt) == originals  # every document once per epoch, intact
    rate = n_fim / (3 * len(docs))
    assert 0.4 < rate < 0.6, rate
    none = PackedDataset(shards, SEQ, seed=3, tokenizer_info=tok.info(), fim_rate=0.0).next_batch(64)
    assert tok.fim_begin_id not in none


def test_token_boundary_splitting_keeps_text(corpus):
    tok, shards, docs = corpus
    table = tok.split_table()
    assert table
    plain = PackedDataset(shards, SEQ, seed=5, fim_rate=0.0)
    full = PackedDataset(shards, SEQ, seed=5, fim_rate=0.0, split_rate=1.0)
    half = PackedDataset(shards, SEQ, seed=5, tokenizer_info=tok, fim_rate=0.0, split_rate=0.5)
    n = (sum(map(len, docs)) + len(docs)) // SEQ
    streams = [stream_of([r.tolist() for r in ds.next_batch(n)]) for ds in (plain, full, half)]
    texts = [tok.decode(s) for s in streams]
    cut = min(map(len, texts)) - 40
    assert texts[0][:cut] == texts[1][:cut] == texts[2][:cut]
    in_table = [sum(t in table for t in s[:len(streams[0]) // 2]) for s in streams]
    assert in_table[0] > 20 and in_table[1] == 0 and 0 < in_table[2] < in_table[0]
    assert len(streams[1][:200]) == 200 and streams[1][:200] != streams[0][:200]


@pytest.mark.parametrize("world", [2, 4])
def test_dp_slices_concatenate_to_the_single_process_batch(corpus, world):
    tok, shards, docs = corpus
    kw = dict(seed=11, tokenizer_info=tok, fim_rate=0.3, split_rate=0.3)
    whole = batches(PackedDataset(shards, SEQ, **kw), 40, 8)
    parts = [batches(PackedDataset(shards, SEQ, dp_rank=r, dp_world=world, **kw), 40, 8) for r in range(world)]
    for step in range(40):
        assert all(p[step].shape == (8 // world, SEQ + 1) for p in parts)
        assert torch.equal(torch.cat([p[step] for p in parts]), whole[step])


def test_state_restore_reproduces_next_batches_across_epochs(corpus):
    tok, shards, docs = corpus
    kw = dict(seed=2, tokenizer_info=tok, fim_rate=0.2, split_rate=0.2, dp_rank=1, dp_world=2)
    per_epoch = (sum(map(len, docs)) + len(docs)) // (SEQ * 6)
    a = PackedDataset(shards, SEQ, **kw)
    batches(a, per_epoch - 2, 6)
    state = json.loads(json.dumps(a.state_dict()))
    assert all(isinstance(v, int) for v in state.values())
    expected = batches(a, 10, 6)
    assert a.epoch >= 1, "the checked window must cross an epoch boundary"
    b = PackedDataset(shards, SEQ, **kw)
    b.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(batches(b, 10, 6), expected))
    assert b.state_dict() == a.state_dict()
    with pytest.raises(ValueError, match="seed"):
        PackedDataset(shards, SEQ, seed=3, tokenizer_info=tok).load_state_dict(state)


def test_eval_batches_and_stats(corpus, monkeypatch):
    import data.dataset

    tok, shards, docs = corpus
    monkeypatch.setattr(data.dataset, "EVAL_CHUNK_TOKENS", 37)  # read shards in many small chunks
    stream = [t for d in docs for t in d + [tok.eos_id]]
    windows = [stream[k * SEQ:k * SEQ + SEQ + 1] for k in range((len(stream) - 1) // SEQ)]
    got = [b.tolist() for b in eval_batches(shards, SEQ, 5)]
    assert [r for b in got for r in b] == windows
    monkeypatch.setattr(data.dataset, "EVAL_CHUNK_TOKENS", 1 << 20)
    assert [b.tolist() for b in eval_batches(shards, SEQ, 5)] == got
    assert all(len(b) == 5 for b in got[:-1]) and 1 <= len(got[-1]) <= 5
    again = list(eval_batches(shards, SEQ, 5, max_batches=2, eos_id=tok.eos_id))
    assert len(again) == 2 and all(torch.equal(torch.tensor(x), y) for x, y in zip(got, again))
    stats = shard_stats(shards)
    texts = [tok.decode(d) for d in docs]
    assert stats["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    assert stats["tokens"] == sum(map(len, docs)) and stats["documents"] == len(docs)
    assert stats["stream_tokens"] == len(stream)
    assert stats["bytes_per_token"] == pytest.approx(stats["bytes"] / len(stream))


def test_errors_name_the_setting(corpus, tmp_path):
    tok, shards, _ = corpus
    with pytest.raises(ValueError, match="seq_len"):
        PackedDataset(shards, 0)
    with pytest.raises(FileNotFoundError, match="index.json"):
        PackedDataset(tmp_path, SEQ)
    with pytest.raises(FileNotFoundError, match="index.json"):
        next(eval_batches(tmp_path, SEQ, 2))
    with pytest.raises(ValueError, match="fim_rate"):
        PackedDataset(shards, SEQ, fim_rate=1.5)
    with pytest.raises(ValueError, match="dp_rank"):
        PackedDataset(shards, SEQ, dp_rank=2, dp_world=2)
    with pytest.raises(ValueError, match="global_batch=6 must be a positive multiple of dp_world=4"):
        PackedDataset(shards, SEQ, dp_world=4).next_batch(6)
    with pytest.raises(ValueError, match="fim_begin_id"):
        PackedDataset(shards, SEQ, tokenizer_info={"eos_id": 1}, fim_rate=0.1)
