"""Reading a Hugging Face DeepseekV3 directory one tensor at a time, for any part of the model.

The format is that of DeepSeek-V3's released checkpoint and of `DeepseekV3ForCausalLM.save_pretrained`
(names in `model/hf_names.py`); DeepSeek's FP8 release (DeepSeek-V3 report section 3.3) stores
float8_e4m3fn weights with a `<name>_scale_inv` fp32 scale per 128x128 block (value = block x
scale_inv), dequantized here as each tensor is read. `HFReader.fill(name, dst)` fills one entry of
our state dict (a stacked expert tensor from its per-expert tensors; only the experts a rank holds
when `dst` is an expert-parallel slice), so a rank, or a converter, holds the tensors it fills plus
the one being read.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import torch

from .config import ModelConfig
from .hf_names import Target, hf_tensors, model_config_from_hf, target_of
from .safetensors_io import TensorReader
from .transformer import Transformer

PathLike = Union[str, Path]
INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"


def read_hf_config(hf_dir: PathLike) -> Tuple[Dict, ModelConfig]:
    """(config.json dict, ModelConfig) of a Hugging Face DeepseekV3 directory."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{hf_dir} is not a Hugging Face model directory: {path} is missing")
    hf = json.loads(path.read_text())
    return hf, model_config_from_hf(hf, str(path))


def weight_files(hf_dir: PathLike) -> List[Path]:
    """The safetensors files of a directory: those its index lists, else every *.safetensors."""
    hf_dir = Path(hf_dir)
    index = hf_dir / INDEX_FILE
    if index.is_file():
        files = sorted({hf_dir / fname for fname in json.loads(index.read_text())["weight_map"].values()})
        for path in files:
            if not path.is_file():
                raise FileNotFoundError(f"{index} lists {path.name}, which is missing")
        return files
    found = sorted(hf_dir.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no safetensors weights in {hf_dir} (model.safetensors or {INDEX_FILE}); "
                                f"other formats (.bin, .pt) are not supported")
    return found


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


def _without_absent_mtp(cfg: ModelConfig, names: Sequence[str], hf_dir: Path) -> ModelConfig:
    """transformers keeps num_nextn_predict_layers in config.json but saves no MTP weights: when no
    tensor of any MTP layer is present, the model is read without MTP (with a warning)."""
    if cfg.num_nextn_predict_layers == 0:
        return cfg
    mtp_prefixes = tuple(f"model.layers.{cfg.num_hidden_layers + j}." for j in range(cfg.num_nextn_predict_layers))
    if any(name.startswith(mtp_prefixes) for name in names):
        return cfg
    warnings.warn(f"{hf_dir}: config.json declares num_nextn_predict_layers={cfg.num_nextn_predict_layers} but "
                  f"the checkpoint holds no MTP weights (layers {cfg.num_hidden_layers}+); reading without MTP")
    return dataclasses.replace(cfg, num_nextn_predict_layers=0)


def _plan(names: Sequence[str], model: Transformer, hf_dir: Path) -> Dict[str, Target]:
    """Target of every weight tensor; ValueError naming unknown and missing tensors."""
    cfg = model.cfg
    expected = {target_of(name, cfg): name for name, _ in hf_tensors(model)}
    expected.pop(Target(""), None)
    plan: Dict[str, Target] = {}
    filled: Dict[Target, str] = {}
    unknown: List[str] = []
    present = set(names)
    for name in sorted(names):
        if name.endswith(SCALE_SUFFIX):
            if name[:-len(SCALE_SUFFIX)] not in present:
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


class HFReader:
    """A Hugging Face DeepseekV3 directory opened for reading: `cfg` (from config.json, without MTP
    when it holds no MTP weights), `names()` (our state-dict entries it fills) and `fill`."""

    def __init__(self, hf_dir: PathLike):
        self.hf_dir = Path(hf_dir)
        hf, cfg = read_hf_config(self.hf_dir)
        self.tensors = TensorReader(weight_files(self.hf_dir))
        self.cfg = _without_absent_mtp(cfg, self.tensors.keys(), self.hf_dir)
        self.block = _fp8_block(hf)
        with torch.device("meta"):
            model = Transformer(self.cfg)
        self.shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        self.sources: Dict[str, List[Tuple[str, Target]]] = {}
        for hf_name, target in _plan(self.tensors.keys(), model, self.hf_dir).items():
            self.sources.setdefault(target.name, []).append((hf_name, target))

    def names(self) -> List[str]:
        """Our state-dict names this directory fills (every persistent entry of `cfg`'s model)."""
        return list(self.sources)

    def read(self, hf_name: str) -> torch.Tensor:
        """Checkpoint tensor `hf_name` as stored, FP8 block-quantized weights dequantized to fp32."""
        tensor = self.tensors.get(hf_name)
        if tensor.dtype == torch.float8_e4m3fn:
            scale_name = hf_name + SCALE_SUFFIX
            if scale_name not in self.tensors.entries:
                raise ValueError(f"FP8 tensor {hf_name} in {self.tensors.file_of(hf_name).name} has no {scale_name}")
            tensor = dequantize_fp8(tensor, self.tensors.get(scale_name), self.block)
        return tensor

    @torch.no_grad()
    def fill(self, name: str, dst: torch.Tensor, expert_offset: int = 0) -> None:
        """Copy the checkpoint's values of our entry `name` into `dst`: the whole entry, or, for routed
        experts, the `dst.shape[0]` experts from `expert_offset` on (an expert-parallel slice)."""
        full = self.shapes[name]
        sliced = dst.dim() > 0 and dst.shape[0] != full[0] and any(t.expert is not None for _, t in self.sources[name])
        if tuple(dst.shape) != full and not (sliced and tuple(dst.shape[1:]) == full[1:]):
            raise ValueError(f"{self.hf_dir}: our {name} has shape {tuple(dst.shape)}, config.json implies {full}")
        for hf_name, target in self.sources[name]:
            if target.expert is not None:
                local = target.expert - expert_offset
                if not 0 <= local < dst.shape[0]:
                    continue
                target = dataclasses.replace(target, expert=local)
            view = target.view(dst)
            tensor = self.read(hf_name)
            if view.shape != tensor.shape:
                raise ValueError(f"tensor {hf_name} in {self.tensors.file_of(hf_name).name} has shape "
                                 f"{tuple(tensor.shape)}, the config.json implies {tuple(view.shape)}")
            view.copy_(tensor)


@torch.no_grad()
def load_hf_model(hf_dir: PathLike) -> Transformer:
    """Our Transformer (CPU, fp32, eval mode) with the weights of a Hugging Face DeepseekV3 directory,
    read one tensor at a time."""
    reader = HFReader(hf_dir)
    model = Transformer(reader.cfg, seed=0)
    state = model.state_dict()
    for name in reader.names():
        reader.fill(name, state[name])
    return model.eval()
