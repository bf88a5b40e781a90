"""Hugging Face DeepseekV3 checkpoints: import into a training checkpoint, export from one, streaming.

    python -m model.hf import <hf_dir> <checkpoint_dir>
    python -m model.hf export <checkpoint_dir_or_out_dir> <hf_dir> [--dtype float32|bfloat16] [--max-shard-size 5GB]

The format is that of DeepSeek-V3's released checkpoint and of `DeepseekV3ForCausalLM.save_pretrained`:
safetensors shards listed in `model.safetensors.index.json`, per-expert tensor names, MTP module k
as layer `num_hidden_layers + k` (names in `model/hf_names.py`). Import also reads DeepSeek's FP8
release (report section 3.3; `model/hf_read.py`).

Neither direction holds the model: import hands torch.distributed.checkpoint a plan of
placeholders and builds each tensor from the safetensors files only when DCP writes it, one file
per tensor (a stacked expert tensor is the largest); export declares the model on the meta device, loads one layer at a
time from the checkpoint and appends its tensors to shards whose headers are written first
(`model/safetensors_io.py`). Tokenizer files travel along: next to config.json on the Hugging Face
side, in a `tokenizer/` folder of the checkpoint (or of its out_dir) on ours.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from .checkpoint_files import load_model_state, read_json, resolve_checkpoint
from .config import ModelConfig
from .hf_names import hf_config_from_model, hf_tensors
from .hf_read import INDEX_FILE, HFReader, dequantize_fp8, load_hf_model, read_hf_config
from .safetensors_io import ShardWriter
from .transformer import Transformer

__all__ = ["import_hf", "export_hf", "export_checkpoint", "load_hf_model", "dequantize_fp8", "read_hf_config",
           "find_tokenizer_dir", "copy_tokenizer_files"]

PathLike = Union[str, Path]
DEFAULT_SHARD_BYTES = 5 * 2**30
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "chat_template.jinja", "*.model")
_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def copy_tokenizer_files(src: Optional[Path], dst: Path) -> List[str]:
    """Copy the tokenizer files found directly in `src` into `dst`; returns their names."""
    if src is None or not Path(src).is_dir():
        return []
    found = sorted({p for pattern in TOKENIZER_FILES for p in Path(src).glob(pattern) if p.is_file()})
    if found:
        dst.mkdir(parents=True, exist_ok=True)
    for path in found:
        shutil.copy2(path, dst / path.name)
    return [p.name for p in found]


class _BuildOnWrite(DefaultSavePlanner):
    """Save planner whose state holds zero-stride placeholders; each tensor is built by `build(name)`
    when DCP writes it, so one tensor exists at a time."""

    def __init__(self, build):
        super().__init__()
        self.build = build

    def lookup_object(self, index):
        return self.build(index.fqn.removeprefix("model."))


def import_hf(hf_dir: PathLike, checkpoint_dir: PathLike) -> Path:
    """Write a training checkpoint directory (DCP of {"model": ...}, model_config.json, meta.json last),
    reading the Hugging Face tensors one at a time as the checkpoint is written."""
    hf_dir, checkpoint_dir = Path(hf_dir), Path(checkpoint_dir)
    if checkpoint_dir.exists() and any(checkpoint_dir.iterdir()):
        raise FileExistsError(f"checkpoint directory {checkpoint_dir} is not empty; give a new directory")
    reader = HFReader(hf_dir)
    with torch.device("meta"):
        model = Transformer(reader.cfg)
    dtypes = {name: t.dtype for name, t in model.state_dict().items()}

    total = sum(torch.Size(reader.shapes[name]).numel() * dtypes[name].itemsize for name in reader.names())
    bar = _progress(total, "import")

    def build(name: str) -> torch.Tensor:
        out = torch.empty(reader.shapes[name], dtype=dtypes[name])
        reader.fill(name, out)
        bar.update(out.nbytes)
        return out

    placeholders = {name: torch.zeros((), dtype=dtypes[name]).expand(reader.shapes[name]) for name in reader.names()}
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        # one file per tensor: DCP's writer keeps every tensor of a file alive until the file is done
        writer = FileSystemWriter(str(checkpoint_dir), single_file_per_rank=False)
        dcp.save({"model": placeholders}, storage_writer=writer, planner=_BuildOnWrite(build), no_dist=True)
    bar.close()
    (checkpoint_dir / "model_config.json").write_text(json.dumps(reader.cfg.to_dict(), indent=2))
    copy_tokenizer_files(hf_dir, checkpoint_dir / "tokenizer")
    (checkpoint_dir / "meta.json").write_text(json.dumps({"step": 0, "source": str(hf_dir.resolve())}))
    return checkpoint_dir


def _progress(total_bytes: int, desc: str):
    """A tqdm bar on stderr over the tensor bytes a conversion reads or writes (hidden when stderr is
    not a terminal)."""
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"model.hf {desc}", file=sys.stderr,
                disable=None)


# ---------------------------------------------------------------- writing


def _out_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if name.endswith("e_score_correction_bias") else dtype


def write_hf(hf_dir: PathLike, cfg: ModelConfig, shapes: Sequence[Tuple[str, Sequence[int]]],
             tensors: Iterable[Tuple[str, torch.Tensor]], dtype: torch.dtype,
             tokenizer_dir: Optional[PathLike] = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write a Hugging Face directory whose tensors `shapes` [(name, shape)] come, in that order, from
    `tensors`, each written to its shard as it arrives (converted to `dtype`; the router bias stays
    fp32). Shards left in `hf_dir` by an earlier export (`model-XXXXX-of-YYYYY.safetensors`) are removed."""
    hf_dir = Path(hf_dir)
    hf_dir.mkdir(parents=True, exist_ok=True)
    shards: List[List[Tuple[str, torch.dtype, Sequence[int]]]] = [[]]
    size = total = 0
    for name, shape in shapes:
        out = _out_dtype(name, dtype)
        nbytes = int(torch.Size(shape).numel()) * out.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, out, tuple(shape)))
        size += nbytes
        total += nbytes
    for stale in hf_dir.glob("model*.safetensors"):
        if _SHARD_NAME.match(stale.name) or stale.name == "model.safetensors":
            stale.unlink()
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map = {name: fname for fname, shard in zip(names, shards) for name, _, _ in shard}
    stream = iter(tensors)
    bar = _progress(total, "export")
    for fname, shard in zip(names, shards):
        writer = ShardWriter(hf_dir / fname, shard, {"format": "pt"})
        with writer:
            for name, out, _ in shard:
                got, tensor = next(stream)
                converted = tensor.detach().to(out)
                writer.write(got, converted)
                bar.update(converted.nbytes)
    bar.close()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (hf_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (hf_dir / "config.json").write_text(json.dumps(hf_config_from_model(cfg, dtype), indent=2))
    copy_tokenizer_files(Path(tokenizer_dir) if tokenizer_dir else None, hf_dir)
    return hf_dir


def export_hf(model: Transformer, hf_dir: PathLike, tokenizer_dir: Optional[PathLike] = None,
              dtype: Optional[torch.dtype] = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write `model` as a Hugging Face DeepseekV3 directory (shards + index, config.json, tokenizer
    files); `dtype` defaults to the model's."""
    dtype = dtype or next(model.parameters()).dtype
    shapes = [(name, t.shape) for name, t in hf_tensors(model)]
    return write_hf(hf_dir, model.cfg, shapes, hf_tensors(model), dtype, tokenizer_dir, max_shard_bytes)


def find_tokenizer_dir(path: PathLike) -> Optional[Path]:
    """`tokenizer/` of the given directory, of its resolved step directory, or of that step's out_dir."""
    path = Path(path)
    step = resolve_checkpoint(path) or path
    candidates = [path / "tokenizer", step / "tokenizer"]
    if step.parent.name == "checkpoints":
        candidates.append(step.parent.parent / "tokenizer")
    for candidate in candidates:
        if candidate.is_dir() and any(candidate.glob(p) for p in TOKENIZER_FILES):
            return candidate
    return None


def _checkpoint_parts(cfg: ModelConfig) -> List[Tuple[str, List[str]]]:
    """(part whose tensors are written, submodules to load for it) in checkpoint order; an MTP
    module's checkpoint entries include copies of the shared embedding and head."""
    parts = [(p, [p]) for p in ["embed_tokens", *(f"layers.{i}" for i in range(cfg.num_hidden_layers)), "norm"]]
    if not cfg.tie_word_embeddings:
        parts.append(("lm_head", ["lm_head"]))
    return parts + [(f"mtp.{j}", [f"mtp.{j}", "embed_tokens", "lm_head"]) for j in range(cfg.num_nextn_predict_layers)]


def _return_freed_memory() -> None:
    """Hand the memory freed by the last layer back to the OS: glibc keeps it in the arenas of the
    threads that allocated it, where the next layer's allocations do not reuse it (measured: the peak
    grew by the layer's largest tensor at every layer). No-op without glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _layer_by_layer(model: Transformer, step_dir: Path, ema: bool = False) -> Iterator[Tuple[str, torch.Tensor]]:
    """hf_tensors of a meta-declared model, each part loaded from the DCP at `step_dir` (its EMA
    weights with `ema`) just before its tensors are written and freed right after."""
    for part, needed in _checkpoint_parts(model.cfg):
        for name in needed:
            model.get_submodule(name).to_empty(device="cpu")
        if model.cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        prefixes = tuple(f"{name}." for name in needed)
        load_model_state({k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}, step_dir, ema)
        yield from hf_tensors(model, part)
        for name in needed:
            model.get_submodule(name).to_empty(device="meta")
        if model.cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        _return_freed_memory()


def export_checkpoint(checkpoint: PathLike, hf_dir: PathLike, dtype: Optional[torch.dtype] = None,
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES, ema: bool = False) -> Path:
    """Export a training checkpoint (a step directory, or an out_dir meaning its newest) to `hf_dir`,
    one layer in memory at a time; with `ema`, its EMA weights. `dtype` defaults to float32."""
    step_dir = resolve_checkpoint(Path(checkpoint))
    if step_dir is None:
        raise FileNotFoundError(f"{checkpoint} holds no complete checkpoint (step_<N>/ with meta.json)")
    cfg = ModelConfig.from_dict(read_json(step_dir / "model_config.json"))
    with torch.device("meta"):
        model = Transformer(cfg)
    shapes = [(name, t.shape) for name, t in hf_tensors(model)]
    return write_hf(hf_dir, cfg, shapes, _layer_by_layer(model, step_dir, ema), dtype or torch.float32,
                    find_tokenizer_dir(checkpoint), max_shard_bytes)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '64KB' or a number of bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if m is None:
        raise ValueError(f"--max-shard-size {text!r} is not a size such as 5GB, 500MB or 1048576")
    unit = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30}[m.group(2)]
    return int(float(m.group(1)) * unit)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.hf", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face directory -> training checkpoint directory")
    imp.add_argument("hf_dir")
    imp.add_argument("checkpoint_dir")
    exp = sub.add_parser("export", help="training checkpoint (or out_dir) -> Hugging Face directory")
    exp.add_argument("checkpoint_dir")
    exp.add_argument("hf_dir")
    exp.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    exp.add_argument("--max-shard-size", default="5GB")
    exp.add_argument("--ema", action="store_true", help="export the EMA of the weights (train.ema_decay > 0)")
    args = parser.parse_args(argv)
    try:
        if args.command == "import":
            out = import_hf(args.hf_dir, args.checkpoint_dir)
        else:
            out = export_checkpoint(args.checkpoint_dir, args.hf_dir, getattr(torch, args.dtype),
                                    parse_size(args.max_shard_size), ema=args.ema)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"model.hf {args.command}: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"command": args.command, "output": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
