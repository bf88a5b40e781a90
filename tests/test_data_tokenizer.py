"""Tokenizer training/loading (data/tokenizer.py): round trip, digit splitting, special tokens,
SentencePiece variant, split table, save/load, Hugging Face loading, CLI and errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from data.tokenizer import (FIM_BEGIN, FIM_END, FIM_HOLE, SPECIAL_TOKENS, load_tokenizer,
                            train_tokenizer)

ROOT = Path(__file__).resolve().parents[1]

SAMPLES = [
    "def área(raio: float) -> float:\n    \"\"\"Área do círculo — π r².\"\"\"\n"
    "    return 3.14159 * raio ** 2\n",
    "class Ünïcode:\n\tname = '日本語のテキスト 🎉'\r\n\tvalues = [1, 22, 333, 4444]\n\n\n",
    "x = {'a': (1, 2), 'b': [3, 4]}  # trailing spaces   \n    if x:\n        pass\n",
    "literal = '<|fim_begin|> not a control token <|end_of_text|>'\n",
]


def corpus_texts():
    """About 150 KB of code-like text with unicode, made here (no files needed)."""
    texts = []
    for i in range(300):
        texts.append(f"def function_{i}(value_{i % 7}, ñame='ünï_{i}'):\n"
                     f"    result = value_{i % 7} * {i} + {i * 37 % 1000}\n"
                     f"    if result > {i}:\n        return [result, '日本{i % 5}']\n"
                     f"    return {{'key': result}}  # comment {i}\n\n")
    return texts + SAMPLES


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return train_tokenizer(corpus_texts(), 600, tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    return train_tokenizer(corpus_texts(), 600, tmp_path_factory.mktemp("spm"), kind="sentencepiece")


@pytest.fixture(params=["bpe", "spm"])
def tok(request):
    return request.getfixturevalue(request.param)


def test_round_trip_on_code_with_unicode(tok):
    for text in SAMPLES + ["", " ", "\n\n\t  x", "ﬁ ℌ 𝔘 \u200b é e\u0301"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text


def test_digits_are_single_tokens(tok):
    for text in ["12345", "x = 2024 + 99", "v3.14159"]:
        pieces = [tok.decode([i]) for i in tok.encode(text)]
        for piece in pieces:
            assert not (any(c.isdigit() for c in piece) and len(piece.strip()) > 1), pieces
        assert "".join(pieces) == text


def test_special_tokens_distinct_present_and_not_made_from_text(tok):
    ids = [tok.bos_id, tok.eos_id, tok.pad_id, tok.fim_begin_id, tok.fim_hole_id, tok.fim_end_id]
    assert len(set(ids)) == 6 and all(0 <= i < tok.vocab_size for i in ids)
    assert [tok.decode([i]) for i in ids] == list(SPECIAL_TOKENS)
    for text in [FIM_BEGIN, FIM_HOLE, FIM_END, SAMPLES[3]]:
        encoded = tok.encode(text)
        assert not set(encoded) & set(ids), "special strings in text must stay plain text"
        assert len(encoded) > 1
    first = tok.encode("def f")
    assert first[0] != tok.bos_id and first[-1] != tok.eos_id
    assert tok.decode([tok.fim_begin_id] + tok.encode("a") + [tok.fim_hole_id]) == f"{FIM_BEGIN}a{FIM_HOLE}"


def test_vocab_size_and_kind(bpe, spm):
    assert bpe.kind == "bpe" and 300 < bpe.vocab_size <= 600  # fewer when merges run out
    assert spm.kind == "sentencepiece" and 300 < spm.vocab_size <= 600
    assert max(max(bpe.encode(t)) for t in SAMPLES) < bpe.vocab_size


def test_punctuation_merges_with_newlines_and_split_table(tok):
    table = tok.split_table()
    assert table, "code should give punctuation+newline tokens such as ':\\n'"
    texts = {tok.decode([i]): i for i in table}
    assert any(t.rstrip("\n") in (":", "):", "}") for t in texts), sorted(texts)
    for token, pieces in table.items():
        text = tok.decode([token])
        assert text[-1] in "\r\n" and text.strip(" \r\n")
        assert tok.decode(pieces) == text and len(pieces) >= 2
        assert token not in pieces


def test_save_and_load(tok, tmp_path):
    out = tok.save(tmp_path / "copy")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["bos_token"] == SPECIAL_TOKENS[0] and config["eos_token"] == SPECIAL_TOKENS[1]
    assert config["additional_special_tokens"] == [FIM_BEGIN, FIM_HOLE, FIM_END]
    model_file = out / ("tokenizer.json" if tok.kind == "bpe" else "tokenizer.model")
    for path in (out, model_file):
        loaded = load_tokenizer(path)
        assert loaded.kind == tok.kind and loaded.info()["eos_id"] == tok.eos_id
        for text in SAMPLES:
            assert loaded.encode(text) == tok.encode(text)
        assert loaded.split_table() == tok.split_table()


def test_hugging_face_loads_the_bpe_directory(bpe, tmp_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(bpe.save(tmp_path / "hf")))
    assert hf.bos_token_id == bpe.bos_id and hf.eos_token_id == bpe.eos_id
    assert hf.pad_token_id == bpe.pad_id
    for text in SAMPLES[:3]:
        assert hf.encode(text, add_special_tokens=False) == bpe.encode(text)


def test_train_from_files_and_directories(tmp_path):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    for i, text in enumerate(corpus_texts()[:100]):
        (src / "pkg" / f"m{i}.py").write_text(text, encoding="utf-8")
    (src / "blob.bin").write_bytes(b"\x00\x01\x02")
    tok = train_tokenizer([src], 400, tmp_path / "tok")
    assert tok.vocab_size <= 400 and tok.decode(tok.encode(SAMPLES[0])) == SAMPLES[0]


def test_errors_name_the_setting(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer kind 'wordpiece'"):
        train_tokenizer(["x"], 600, tmp_path / "a", kind="wordpiece")
    with pytest.raises(ValueError, match="vocab_size=10"):
        train_tokenizer(["x"], 10, tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(ValueError, match="not a tokenizer file"):
        load_tokenizer(tmp_path / "vocab.txt")


def test_cli_train_and_load(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, text in enumerate(corpus_texts()[:50]):
        (src / f"m{i}.py").write_text(text, encoding="utf-8")
    run = [sys.executable, "-m", "data.tokenizer"]
    out = subprocess.run(run + ["--input", str(src), "--vocab-size", "400", "--out", str(tmp_path / "t"),
                                "--kind", "sentencepiece"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    loaded = subprocess.run(run + ["--load", str(tmp_path / "t")], cwd=ROOT, capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    summary = json.loads(loaded.stdout)
    assert summary["kind"] == "sentencepiece" and summary["vocab_size"] <= 400
    assert "".join(summary["example"]) == "def f(x):\n    return x + 42\n"
    bad = subprocess.run(run + ["--load", str(tmp_path / "missing")], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "missing" in bad.stderr and "Traceback" not in bad.stderr


def test_a_models_tokenizer_is_used_as_it_is(tmp_path):
    """A tokenizer.json made elsewhere (a model's): nothing appended; BOS and PAD fall back to EOS, no
    FIM tokens, so FIM data is a config error before any compute; without EOS, a clear error."""
    from omegaconf import OmegaConf
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from model import ModelConfig
    from training.config import ConfigError
    from training.inputs import prepare_inputs

    foreign = HFTokenizer(models.BPE())
    foreign.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    foreign.decoder = decoders.ByteLevel()
    foreign.train_from_iterator(corpus_texts(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    foreign.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == foreign.get_vocab_size() == 400
    assert tok.eos_id == tok.bos_id == tok.pad_id == foreign.token_to_id("</s>")
    assert not tok.has_fim() and tok.fim_begin_id is None
    assert tok.decode(tok.encode(SAMPLES[1])) == SAMPLES[1]
    cfg = OmegaConf.create({"data": {"name": "shards", "train_dir": str(tmp_path), "val_dir": str(tmp_path),
                                     "tokenizer": str(tmp_path), "fim_rate": 0.1}})
    with pytest.raises(ConfigError, match="data.fim_rate=0.1 needs the FIM tokens"):
        prepare_inputs(cfg, ModelConfig(vocab_size=400))
    cfg.data.fim_rate = 0.0
    with pytest.raises(ConfigError) as err:  # past the tokenizer: the (empty) shard directories
        prepare_inputs(cfg, ModelConfig(vocab_size=400))
    assert "fim" not in str(err.value) and "vocab_size" not in str(err.value)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(ValueError, match="no end-of-text token"):
        load_tokenizer(tmp_path)


def test_training_shows_a_progress_bar_over_the_text_read(tmp_path, capsys):
    src = tmp_path / "a.py"
    src.write_text("def f(x):\n    return x + 1\n" * 200)
    train_tokenizer([src], 300, tmp_path / "tok")
    err = capsys.readouterr().err
    assert "tokenizer: read" in err and "100%" in err and "5.40k/5.40k" in err  # 200 x 27 bytes
    train_tokenizer([src], 300, tmp_path / "quiet", progress=False)
    assert "tokenizer: read" not in capsys.readouterr().err
