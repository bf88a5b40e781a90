"""Tokenizers: train or load a byte-level BPE (`tokenizers`) or a SentencePiece BPE model.

DeepSeek-V3 (section 4.1) uses byte-level BPE with a pre-tokenizer that keeps numbers short and
merges punctuation with line breaks. Ours follows that spirit: every digit is its own pre-token,
letters keep one optional leading non-letter (" x", "(x", "_name"), punctuation/symbol runs take
the line breaks that follow them (":\\n", ")\\n\\n"), whitespace runs give their last space to the
next word. Merged punctuation+newline tokens cause the token-boundary bias the report mentions;
`Tokenizer.split_table()` lists them with their pieces so the dataset can split some at random.

Special tokens (ids 0-5 in the BPE kind; SentencePiece puts its <|unk|> at 0 and these after):
`<|begin_of_text|>` (BOS), `<|end_of_text|>` (EOS, joins packed documents), `<|pad|>` and the FIM
tokens `<|fim_begin|>`, `<|fim_hole|>`, `<|fim_end|>`. `encode` never adds them and never produces
them from text (a literal "<|fim_begin|>" in a document is encoded as ordinary text). A tokenizer
that comes with a model (a Hugging Face directory) is used as it is: nothing is appended to its
vocabulary; its BOS and PAD fall back to EOS where missing, and FIM needs its FIM tokens
(`data.fim_rate > 0` without them is a config error, training/inputs.py).

CLI: `python -m data.tokenizer --input DIR_OR_FILES... --vocab-size N --out DIR [--kind bpe|sentencepiece]`
or `python -m data.tokenizer --load PATH`; both print a JSON summary.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import unicodedata
from pathlib import Path
from typing import Iterable, Optional

from data.sources import iter_documents

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
FIM_BEGIN, FIM_HOLE, FIM_END = "<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, FIM_BEGIN, FIM_HOLE, FIM_END)
ROLES = ("bos", "eos", "pad", "fim_begin", "fim_hole", "fim_end")
SP_UNK = "<|unk|>"
KINDS = ("bpe", "sentencepiece")
MIN_VOCAB = 300

# Pre-tokenizer regex (applied after isolating every digit): letters with one optional leading
# non-letter; a single digit; an optional space + punctuation/symbols + the line breaks after them;
# line-break runs; whitespace that leaves its last space to the next word; other whitespace.
PRETOKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[\p{P}\p{S}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SP_CHUNK_CHARS = 4000  # SentencePiece drops longer "sentences": feed documents in line-aligned chunks


class Tokenizer:
    """A trained tokenizer of either kind with the special-token ids the data pipeline needs."""

    def __init__(self, backend, kind: str, path: Optional[Path] = None, names: Optional[dict] = None):
        """Wrap a `tokenizers.Tokenizer` (kind "bpe") or a `SentencePieceProcessor` ("sentencepiece").
        `names` overrides special-token strings by role (bos, eos, pad, fim_begin, fim_hole, fim_end).

        The vocabulary is used as it is: nothing is appended. EOS must exist; BOS and PAD fall back to
        EOS where missing; missing FIM tokens leave their ids None (`has_fim()` is then False and
        only FIM-free data can be built, data/dataset.py)."""
        if kind not in KINDS:
            raise ValueError(f"unknown tokenizer kind {kind!r}; allowed: {', '.join(KINDS)}")
        self.kind = kind
        self.path = Path(path) if path is not None else None
        self._backend = backend
        self._split_table: Optional[dict[int, list[int]]] = None
        self.names = dict(zip(ROLES, SPECIAL_TOKENS))
        self.names.update(names or {})
        if kind == "bpe":
            backend.encode_special_tokens = True
            self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
            lookup = backend.token_to_id
        else:
            self.vocab_size = backend.get_piece_size()

            def lookup(name: str) -> Optional[int]:
                i = backend.piece_to_id(name)
                return None if i == backend.unk_id() else i
        ids = {role: _first_id(lookup, [self.names[role], *ALIASES.get(role, ())]) for role in ROLES}
        if ids["eos"] is None:
            raise ValueError(f"tokenizer {path} has no end-of-text token {self.names['eos']!r}: name it as "
                             f"eos_token in the tokenizer_config.json beside it")
        for role in ("bos", "pad"):
            if ids[role] is None:
                ids[role] = ids["eos"]
        self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]
        self.fim_begin_id, self.fim_hole_id, self.fim_end_id = ids["fim_begin"], ids["fim_hole"], ids["fim_end"]
        self.special_ids = {}
        for role, i in ids.items():
            if i is not None:
                self.special_ids.setdefault(i, backend.id_to_token(i) if kind == "bpe" else backend.id_to_piece(i))

    def has_fim(self) -> bool:
        """Whether the three FIM tokens exist (data.fim_rate > 0 needs them)."""
        return None not in (self.fim_begin_id, self.fim_hole_id, self.fim_end_id)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS added, special-token strings encoded as plain text."""
        if self.kind == "bpe":
            return self._backend.encode(text, add_special_tokens=False).ids
        return self._backend.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text (the BPE kind runs them in parallel threads)."""
        if self.kind == "bpe":
            fast = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)  # no offsets
            return [e.ids for e in fast(texts, add_special_tokens=False)]
        return self._backend.encode(texts)

    def decode(self, ids) -> str:
        """Text of `ids`; special tokens are written out by name (e.g. "<|fim_hole|>")."""
        ids = [int(i) for i in ids]
        if self.kind == "bpe":
            return self._backend.decode(ids, skip_special_tokens=False)
        parts, run = [], []
        for i in ids:
            if i in self.special_ids:
                parts += [self._backend.decode(run), self.special_ids[i]]
                run = []
            else:
                run.append(i)
        return "".join(parts) + self._backend.decode(run)

    def fingerprint(self) -> str:
        """SHA-256 (16 hex digits) of what maps text to ids: the serialized tokenizer.json or
        SentencePiece model, with the special-token names. The same for a copy or a re-save."""
        h = hashlib.sha256(json.dumps([self.kind, self.names], sort_keys=True).encode())
        h.update(self._backend.to_str().encode() if self.kind == "bpe" else self._backend.serialized_model_proto())
        return h.hexdigest()[:16]

    def info(self) -> dict:
        """JSON-serializable summary: kind, path, vocab_size and the special-token ids."""
        return {"kind": self.kind, "path": str(self.path) if self.path else None,
                "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id,
                "pad_id": self.pad_id, "fim_begin_id": self.fim_begin_id,
                "fim_hole_id": self.fim_hole_id, "fim_end_id": self.fim_end_id}

    def split_table(self) -> dict[int, list[int]]:
        """{token id: piece ids} for every token made of punctuation/symbols (with at most one
        leading space) followed by line breaks, e.g. ")\\n" -> [")", "\\n"]: the tokens whose random
        splitting reduces the token-boundary bias (DeepSeek-V3 section 4.1)."""
        if self._split_table is None:
            if self.kind == "bpe":
                texts = self._backend.decode_batch([[i] for i in range(self.vocab_size)],
                                                   skip_special_tokens=False)
            else:
                texts = self._backend.decode([[i] for i in range(self.vocab_size)])
            table = {}
            for i, text in enumerate(texts):
                if i in self.special_ids:
                    continue
                head = text.rstrip("\r\n")
                tail = text[len(head):]
                body = head[1:] if head.startswith(" ") else head
                if tail and body and all(unicodedata.category(c)[0] in "PS" for c in body):
                    pieces = self.encode(head) + self.encode(tail)
                    if len(pieces) > 1:
                        table[i] = pieces
            self._split_table = table
        return self._split_table

    def save(self, out_dir: Path) -> Path:
        """Write tokenizer.json (BPE) or tokenizer.model (SentencePiece) and tokenizer_config.json
        into `out_dir`, a directory a Hugging Face export can copy. Returns `out_dir`."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        token = self.special_ids
        fim = [token[i] for i in (self.fim_begin_id, self.fim_hole_id, self.fim_end_id) if i is not None]
        config = {"bos_token": token[self.bos_id], "eos_token": token[self.eos_id], "pad_token": token[self.pad_id],
                  "additional_special_tokens": fim,
                  "add_bos_token": False, "add_eos_token": False,
                  "model_max_length": 1 << 30, "moeforge_kind": self.kind}
        if self.kind == "bpe":
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
            self._backend.save(str(out_dir / "tokenizer.json"))
        else:
            config["unk_token"] = SP_UNK
            (out_dir / "tokenizer.model").write_bytes(self._backend.serialized_model_proto())
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        self.path = out_dir
        return out_dir


ALIASES = {"bos": ("<｜begin▁of▁sentence｜>",), "eos": ("<｜end▁of▁sentence｜>",),
           "fim_begin": ("<｜fim▁begin｜>",), "fim_hole": ("<｜fim▁hole｜>",), "fim_end": ("<｜fim▁end｜>",)}
"""Other names a role's token goes by (DeepSeek's released tokenizers), tried after the configured one."""


def _first_id(lookup, names) -> Optional[int]:
    for name in names:
        i = lookup(name)
        if i is not None:
            return i
    return None


def _bpe_backend():
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.Split(Regex(PRETOKEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _sp_chunks(texts: Iterable[str]) -> Iterable[str]:
    for text in texts:
        buf = ""
        for line in text.splitlines(keepends=True):
            if buf and len(buf) + len(line) > SP_CHUNK_CHARS:
                yield buf
                buf = ""
            buf += line
        if buf:
            yield buf


def _texts(files, max_bytes: Optional[int]) -> Iterable[str]:
    """Texts from an iterable of Paths (files/directories: read as documents) or of strings
    (already texts), stopping once `max_bytes` UTF-8 bytes were given."""
    def raw():
        for item in files:
            if isinstance(item, Path):
                yield from iter_documents([item])
            elif isinstance(item, str):
                yield item
            else:
                raise TypeError(f"train_tokenizer takes Paths or strings, got {type(item).__name__}")
    seen = 0
    for text in raw():
        yield text
        seen += len(text.encode("utf-8"))
        if max_bytes is not None and seen >= max_bytes:
            return


def _read_bar(files, max_bytes: Optional[int], progress: bool):
    """A tqdm bar over the bytes of training text read (total known when `files` are all files)."""
    from tqdm import tqdm

    items = files if isinstance(files, (list, tuple)) else None
    total = None
    if items and all(isinstance(f, Path) and f.is_file() for f in items):
        total = sum(f.stat().st_size for f in items)
        total = min(total, max_bytes) if max_bytes is not None else total
    return tqdm(total=total, unit="B", unit_scale=True, desc="tokenizer: read", file=sys.stderr,
                disable=not progress)


def train_tokenizer(files, vocab_size: int, out_dir: Path, kind: str = "bpe",
                    max_bytes: Optional[int] = None, progress: bool = True) -> Tokenizer:
    """Train a tokenizer of `kind` ("bpe": byte-level BPE; "sentencepiece": SentencePiece BPE with
    byte fallback) with `vocab_size` entries (specials included; fewer if the corpus is too small),
    save it in `out_dir` and return it. `files` yields Paths (files or directories, read as in
    data.prepare) or strings (texts); `max_bytes` caps the training text. `progress`: a bar over
    the text read on stderr, and (BPE, on a terminal) the trainer's own bars for the merges."""
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; allowed: {', '.join(KINDS)}")
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} is too small; it must be >= {MIN_VOCAB} "
                         f"(256 bytes + special tokens + merges)")
    bar = _read_bar(files, max_bytes, progress)

    def read():
        for text in _texts(files, max_bytes):
            bar.update(len(text.encode("utf-8")))
            yield text
        bar.close()

    texts = read()
    if kind == "bpe":
        from tokenizers import pre_tokenizers, trainers

        backend = _bpe_backend()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=progress)
        backend.train_from_iterator(texts, trainer)
    else:
        import io

        import sentencepiece as spm

        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_sp_chunks(texts)), model_writer=model, vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, character_coverage=0.9995,
            normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece=SP_UNK, bos_piece=BOS,
            eos_piece=EOS, pad_piece=PAD, control_symbols=[FIM_BEGIN, FIM_HOLE, FIM_END],
            max_sentence_length=4 * SP_CHUNK_CHARS + 16, hard_vocab_limit=False,
            num_threads=os.cpu_count() or 1, minloglevel=2)
        backend = spm.SentencePieceProcessor(model_proto=model.getvalue())
    tok = Tokenizer(backend, kind)
    tok.save(out_dir)
    return tok


def _config_names(config_file: Path) -> dict:
    """BOS/EOS/PAD strings named by a Hugging Face tokenizer_config.json, if there is one."""
    if not config_file.is_file():
        return {}
    config = json.loads(config_file.read_text())
    names = {}
    for role in ("bos", "eos", "pad"):
        value = config.get(f"{role}_token")
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            names[role] = value
    return names


def load_tokenizer(path: Path) -> Tokenizer:
    """Load a tokenizer from a directory holding tokenizer.json or one *.model file, or from the
    file itself (FileNotFoundError/ValueError naming the path otherwise). BOS/EOS/PAD follow a
    tokenizer_config.json beside it; the vocabulary is used as it is (see `Tokenizer`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path does not exist: {path}")
    if path.is_dir():
        models = sorted(path.glob("*.model"))
        if (path / "tokenizer.json").is_file():
            file = path / "tokenizer.json"
        elif len(models) == 1:
            file = models[0]
        else:
            raise FileNotFoundError(f"{path} holds no tokenizer.json and "
                                    f"{'several' if models else 'no'} *.model files "
                                    f"({[m.name for m in models]}); pass the file itself")
    else:
        file = path
    names = _config_names(file.parent / "tokenizer_config.json")
    if file.suffix == ".json":
        from tokenizers import Tokenizer as HFTokenizer

        try:
            backend = HFTokenizer.from_file(str(file))
        except Exception as e:
            raise ValueError(f"{file} is not a valid tokenizers tokenizer.json: {e}") from None
        return Tokenizer(backend, "bpe", path, names)
    if file.suffix == ".model":
        import sentencepiece as spm

        backend = spm.SentencePieceProcessor()
        try:
            backend.load(str(file))
        except Exception as e:
            raise ValueError(f"{file} is not a valid SentencePiece model: {e}") from None
        return Tokenizer(backend, "sentencepiece", path, names)
    raise ValueError(f"{file} is not a tokenizer file: expected tokenizer.json or a "
                     f"SentencePiece *.model, or a directory holding one")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.tokenizer", description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", type=Path, help="directories / files / .jsonl / .parquet to train on")
    p.add_argument("--vocab-size", type=int, help="vocabulary size, special tokens included")
    p.add_argument("--out", type=Path, help="output directory")
    p.add_argument("--kind", default="bpe", help=f"one of {', '.join(KINDS)} (default bpe)")
    p.add_argument("--max-bytes", type=int, default=None, help="train on at most this much text")
    p.add_argument("--load", type=Path, help="load an existing tokenizer and print its summary")
    args = p.parse_args(argv)
    if args.load is None and (not args.input or args.vocab_size is None or args.out is None):
        p.error("training needs --input, --vocab-size and --out (or use --load PATH)")
    try:
        if args.load is not None:
            tok = load_tokenizer(args.load)
        else:
            for path in args.input:
                if not path.exists():
                    raise FileNotFoundError(f"input path does not exist: {path}")
            tok = train_tokenizer(list(args.input), args.vocab_size, args.out, args.kind, args.max_bytes)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    example = "def f(x):\n    return x + 42\n"
    summary = dict(tok.info(), split_tokens=len(tok.split_table()),
                   example=[tok.decode([i]) for i in tok.encode(example)])
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
