"""`init_from=PATH`: start a run from trained weights, each rank reading only the tensors it holds.

PATH is a Hugging Face DeepseekV3 directory (bf16/fp32, or DeepSeek's FP8 release with
`weight_scale_inv`, dequantized block by block as read; `model/hf_read.py`) or a moeforge checkpoint
(a step directory or an out_dir; torch.distributed.checkpoint reads each rank's tensors, resharding
the routed experts for any ep). Weights only: the run starts at step 0 with a fresh optimizer, so
they are loaded before the optimizer (and ZeRO-1's fp32 master copies) exist. The model config of
the job must be the checkpoint's; a Hugging Face directory without MTP weights (transformers saves
none) leaves the MTP modules at their initialization, with a warning.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import torch

from model.checkpoint_files import load_state, read_json, resolve_checkpoint
from model.config import ModelConfig
from model.hf_read import HFReader
from parallel.expert_parallel import shard_expert_state
from parallel.mesh import ParallelLayout
from parallel.rank_model import RankModel

from .config import ConfigError

IGNORED_FIELDS = ("extra", "initializer_range", "embed_init_std")


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "model_config.json").is_file()


def check_same_model(theirs: ModelConfig, ours: ModelConfig, where: Path, absent_mtp_ok: bool = False) -> None:
    """ConfigError naming every model field in which `theirs` (the checkpoint's) differs from the job's."""
    a, b = theirs.to_dict(), ours.to_dict()
    if absent_mtp_ok and a["num_nextn_predict_layers"] == 0:
        a["num_nextn_predict_layers"] = b["num_nextn_predict_layers"]
    diff = [f"model.{k}={b[k]!r} (checkpoint: {a.get(k)!r})" for k in b if k not in IGNORED_FIELDS and a.get(k) != b[k]]
    if diff:
        raise ConfigError(f"init_from={where} holds another model: {', '.join(diff)}; give the checkpoint's model "
                          f"settings")


@torch.no_grad()
def load_initial_weights(rank: RankModel, path: Path, cfg: ModelConfig, layout: Optional[ParallelLayout]) -> Path:
    """Fill this rank's parameters from `path` (see the module docstring); returns the directory read."""
    state = rank.state_dict()
    if is_hf_dir(path):
        reader = HFReader(path)
        check_same_model(reader.cfg, cfg, path, absent_mtp_ok=True)
        offsets = rank.expert_offsets()
        skipped = []
        for name, tensor in state.items():
            if name in reader.sources:
                reader.fill(name, tensor, offsets.get(name, 0))
            else:
                skipped.append(name)
        if skipped:
            warnings.warn(f"init_from={path} holds no MTP weights: {len(skipped)} MTP tensor(s) keep their "
                          f"initialization")
        return path
    step_dir = resolve_checkpoint(path)
    if step_dir is None:
        raise ConfigError(f"init_from={path} is neither a Hugging Face directory (config.json) nor a checkpoint "
                          f"(step_<N>/ with meta.json, or an out_dir holding one)")
    check_same_model(ModelConfig.from_dict(read_json(step_dir / "model_config.json")), cfg, step_dir)
    wrapped = {"model": state}
    if layout is not None:
        wrapped = shard_expert_state(wrapped, layout)
    load_state(wrapped, step_dir)
    return step_dir
