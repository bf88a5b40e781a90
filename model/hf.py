"""Hugging Face DeepseekV3 checkpoints: import into a model or a training checkpoint, export from one.

    python -m model.hf import <hf_dir> <checkpoint_dir>
    python -m model.hf export <checkpoint_dir_or_out_dir> <hf_dir> [--dtype float32|bfloat16] [--max-shard-size 5GB]

The format is that of DeepSeek-V3's released checkpoint and of `DeepseekV3ForCausalLM.save_pretrained`:
safetensors shards listed in `model.safetensors.index.json`, per-expert tensor names, MTP module k
as layer `num_hidden_layers + k` (names in `model/hf_names.py`). Import also reads DeepSeek's FP8
release (DeepSeek-V3 report section 3.3: float8_e4m3fn weights with a `<name>_scale_inv` fp32
scale per 128x128 block, value = block x scale_inv). Conversion streams: the model is built once
and filled tensor by tensor, shard by shard; export holds at most one shard's copies at a time.
Tokenizer files travel along: next to config.json on the Hugging Face side, in a `tokenizer/`
folder of the checkpoint (or of its out_dir) on ours.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint_files import resolve_checkpoint
from .config import ModelConfig
from .hf_names import Target, hf_config_from_model, hf_tensors, model_config_from_hf, target_of
from .loading import load
from .transformer import Transformer

PathLike = Union[str, Path]
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 2**30
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "chat_template.jinja", "*.model")
SCALE_SUFFIX = "_scale_inv"
_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


# ---------------------------------------------------------------- reading


def read_hf_config(hf_dir: PathLike) -> Tuple[Dict, ModelConfig]:
    """(config.json dict, ModelConfig) of a Hugging Face DeepseekV3 directory."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{hf_dir} is not a Hugging Face model directory: {path} is missing")
    hf = json.loads(path.read_text())
    return hf, model_config_from_hf(hf, str(path))


def weight_files(hf_dir: PathLike) -> Dict[str, Path]:
    """Checkpoint tensor name -> safetensors file, from the index or the files themselves."""
    hf_dir = Path(hf_dir)
    index = hf_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: hf_dir / fname for name, fname in weight_map.items()}
        for path in set(files.values()):
            if not path.is_file():
                raise FileNotFoundError(f"{index} lists {path.name}, which is missing")
        return files
    found = sorted(hf_dir.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no safetensors weights in {hf_dir} (model.safetensors or {INDEX_FILE}); "
                                f"other formats (.bin, .pt) are not supported")
    files: Dict[str, Path] = {}
    for path in found:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name in files:
                    raise ValueError(f"tensor {name} is in both {files[name].name} and {path.name}")
                files[name] = path
    return files


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: Sequence[int] = (128, 128)) -> torch.Tensor:
    """fp32 value of a block-quantized FP8 weight: each [block[0], block[1]] tile times its scale_inv."""
    rows, cols = weight.shape
    expected = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale_inv of shape {tuple(scale_inv.shape)} does not fit weight {tuple(weight.shape)} "
                         f"with {block[0]}x{block[1]} blocks (expected {expected})")
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale


def _fp8_block(hf: Dict) -> Tuple[int, int]:
    quant = hf.get("quantization_config")
    if not quant:
        return (128, 128)
    if quant.get("quant_method", "fp8") != "fp8" or quant.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"config.json quantization_config {quant} is not supported "
                         f"(allowed: quant_method 'fp8', fmt 'e4m3', block scales)")
    block = quant.get("weight_block_size") or (128, 128)
    return int(block[0]), int(block[1])


def _plan(files: Dict[str, Path], model: Transformer, hf_dir: Path) -> Dict[str, Target]:
    """Target of every weight tensor; ValueError naming unknown and missing tensors."""
    cfg = model.cfg
    expected = {target_of(name, cfg): name for name, _ in hf_tensors(model)}
    expected.pop(Target(""), None)
    plan: Dict[str, Target] = {}
    filled: Dict[Target, str] = {}
    unknown: List[str] = []
    for name in sorted(files):
        if name.endswith(SCALE_SUFFIX):
            if name[:-len(SCALE_SUFFIX)] not in files:
                unknown.append(name)
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        target = target_of(name, cfg)
        if target is None or (target.name and target not in expected):
            unknown.append(name)
        elif target.name:
            if target in filled:
                raise ValueError(f"{hf_dir}: tensors {filled[target]} and {name} fill the same weights")
            plan[name], filled[target] = target, name
    if unknown:
        raise ValueError(f"{hf_dir}: {len(unknown)} tensor(s) do not belong to the model config.json describes: "
                         f"{', '.join(unknown[:20])}{' ...' if len(unknown) > 20 else ''}")
    missing = sorted(name for target, name in expected.items() if target not in filled)
    if missing:
        raise ValueError(f"{hf_dir}: {len(missing)} tensor(s) are missing: "
                         f"{', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
    return plan


@torch.no_grad()
def load_hf_model(hf_dir: PathLike) -> Transformer:
    """Our Transformer (CPU, fp32, eval mode) with the weights of a Hugging Face DeepseekV3 directory.

    Reads shard by shard, one tensor at a time, dequantizing FP8 block-scaled weights.
    """
    hf_dir = Path(hf_dir)
    hf, cfg = read_hf_config(hf_dir)
    files = weight_files(hf_dir)
    cfg = _without_absent_mtp(cfg, files, hf_dir)
    model = Transformer(cfg)
    plan = _plan(files, model, hf_dir)
    state = model.state_dict()
    block = _fp8_block(hf)
    by_file: Dict[Path, List[str]] = {}
    for name, target in plan.items():
        by_file.setdefault(files[name], []).append(name)
    for path in sorted(by_file):
        with safe_open(str(path), framework="pt") as f:
            for name in by_file[path]:
                tensor = f.get_tensor(name)
                if tensor.dtype == torch.float8_e4m3fn:
                    tensor = dequantize_fp8(tensor, _scale_for(name, files, f, path), block)
                dst = plan[name].view(state[plan[name].name])
                if dst.shape != tensor.shape:
                    raise ValueError(f"tensor {name} in {path.name} has shape {tuple(tensor.shape)}, "
                                     f"the config.json implies {tuple(dst.shape)}")
                dst.copy_(tensor)
    return model.eval()


def _without_absent_mtp(cfg: ModelConfig, files: Dict[str, Path], hf_dir: Path) -> ModelConfig:
    """transformers keeps num_nextn_predict_layers in config.json but saves no MTP weights: when no
    tensor of any MTP layer is present, the model is imported without MTP (with a warning)."""
    if cfg.num_nextn_predict_layers == 0:
        return cfg
    mtp_prefixes = tuple(f"model.layers.{cfg.num_hidden_layers + j}." for j in range(cfg.num_nextn_predict_layers))
    if any(name.startswith(mtp_prefixes) for name in files):
        return cfg
    warnings.warn(f"{hf_dir}: config.json declares num_nextn_predict_layers={cfg.num_nextn_predict_layers} but "
                  f"the checkpoint holds no MTP weights (layers {cfg.num_hidden_layers}+); importing without MTP")
    return dataclasses.replace(cfg, num_nextn_predict_layers=0)


def _scale_for(name: str, files: Dict[str, Path], handle, path: Path) -> torch.Tensor:
    scale_name = name + SCALE_SUFFIX
    if scale_name not in files:
        raise ValueError(f"FP8 tensor {name} in {path.name} has no {scale_name}")
    if files[scale_name] == path:
        return handle.get_tensor(scale_name)
    with safe_open(str(files[scale_name]), framework="pt") as other:
        return other.get_tensor(scale_name)


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


def import_hf(hf_dir: PathLike, checkpoint_dir: PathLike) -> Path:
    """Write a training checkpoint directory (DCP of {"model": ...}, model_config.json, meta.json last)."""
    hf_dir, checkpoint_dir = Path(hf_dir), Path(checkpoint_dir)
    if checkpoint_dir.exists() and any(checkpoint_dir.iterdir()):
        raise FileExistsError(f"checkpoint directory {checkpoint_dir} is not empty; give a new directory")
    model = load_hf_model(hf_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(checkpoint_dir), no_dist=True)
    (checkpoint_dir / "model_config.json").write_text(json.dumps(model.cfg.to_dict(), indent=2))
    copy_tokenizer_files(hf_dir, checkpoint_dir / "tokenizer")
    (checkpoint_dir / "meta.json").write_text(json.dumps({"step": 0, "source": str(hf_dir.resolve())}))
    return checkpoint_dir


# ---------------------------------------------------------------- writing


def export_hf(model: Transformer, hf_dir: PathLike, tokenizer_dir: Optional[PathLike] = None,
              dtype: Optional[torch.dtype] = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write `model` as a Hugging Face DeepseekV3 directory (shards + index, config.json, tokenizer files).

    `dtype` defaults to the model's; the router bias stays fp32. Shards left in `hf_dir` by an
    earlier export (`model-XXXXX-of-YYYYY.safetensors`) are removed.
    """
    hf_dir = Path(hf_dir)
    hf_dir.mkdir(parents=True, exist_ok=True)
    dtype = dtype or next(model.parameters()).dtype
    shards: List[List[Tuple[str, torch.Tensor, torch.dtype]]] = [[]]
    size = total = 0
    for name, tensor in hf_tensors(model):
        out = torch.float32 if name.endswith("e_score_correction_bias") else dtype
        nbytes = tensor.numel() * out.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tensor, out))
        size += nbytes
        total += nbytes
    for stale in hf_dir.glob("model*.safetensors"):
        if _SHARD_NAME.match(stale.name) or stale.name == "model.safetensors":
            stale.unlink()
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: t.detach().to(out, copy=True).contiguous() for name, t, out in shard}
        save_file(tensors, str(hf_dir / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in tensors})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (hf_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (hf_dir / "config.json").write_text(json.dumps(hf_config_from_model(model.cfg, dtype), indent=2))
    copy_tokenizer_files(Path(tokenizer_dir) if tokenizer_dir else None, hf_dir)
    return hf_dir


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


def export_checkpoint(checkpoint: PathLike, hf_dir: PathLike, dtype: Optional[torch.dtype] = None,
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES, ema: bool = False) -> Path:
    """Export a training checkpoint (a step directory, or an out_dir meaning its newest) to `hf_dir`;
    with `ema`, its EMA weights."""
    model = load(checkpoint, ema=ema)
    return export_hf(model, hf_dir, find_tokenizer_dir(checkpoint), dtype, max_shard_bytes)


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
