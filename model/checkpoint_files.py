"""Checkpoint directories on disk: finding the newest complete one and reading it safely.

Layout (written by the trainer): `out_dir/checkpoints/step_<N>/` holds a torch.distributed.checkpoint
(DCP) of `{"model": ..., "optim": ..., "train": ...}`, `model_config.json` (the ModelConfig) and
`meta.json` ({"step": N, ...}), written last, which marks the directory complete. DCP's `.metadata`
is a pickle: it is read with an unpickler that only admits DCP's own metadata classes, so reading a
checkpoint never runs code from it (tensor payloads are read with `torch.load(weights_only=True)`).
An error while reading a data file is re-raised as a `CheckpointReadError` naming the file.
"""
from __future__ import annotations

import io
import json
import pickle
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import FileSystem

STEP_DIR = re.compile(r"^step_(\d+)$")
_ALLOWED_GLOBALS = {
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
}
_ALLOWED_MODULES = {"torch.distributed.checkpoint.metadata"}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _ALLOWED_GLOBALS or module in _ALLOWED_MODULES or is_dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


class CheckpointReadError(RuntimeError):
    """A file of a checkpoint could not be read; the message starts with the file's name."""


class _NamingFileSystem(FileSystem):
    """DCP's file system whose read errors name the file being read."""

    @contextmanager
    def create_stream(self, path, mode: str):
        try:
            with super().create_stream(path, mode) as stream:
                yield stream
        except Exception as err:
            first = (str(err).strip().splitlines() or [""])[0]
            raise CheckpointReadError(f"{Path(path).name}: {type(err).__name__}: {first}") from err


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata unpickling admits only DCP metadata classes."""

    def __init__(self, path, *args: Any, **kwargs: Any):
        super().__init__(path, *args, **kwargs)
        self.fs = _NamingFileSystem()

    def read_metadata(self, *args: Any, **kwargs: Any):
        path = Path(self.path) / ".metadata"
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def is_complete(step_dir: Path) -> bool:
    return (step_dir / "meta.json").is_file() and (step_dir / ".metadata").is_file()


def list_checkpoints(ckpt_root: Path) -> List[Path]:
    """Complete `step_<N>` directories under `ckpt_root`, oldest first; incomplete ones are warned about."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for child in ckpt_root.iterdir():
        m = STEP_DIR.match(child.name)
        if not m or not child.is_dir():
            continue
        if is_complete(child):
            found.append((int(m.group(1)), child))
        else:
            warnings.warn(f"skipping incomplete checkpoint {child} (no meta.json or .metadata)")
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: Path) -> Optional[Path]:
    """A step directory itself, or the newest complete one under `path/checkpoints` or `path`."""
    path = Path(path)
    if is_complete(path):
        return path
    for root in (path / "checkpoints", path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    return None


def read_json(path: Path) -> Dict[str, Any]:
    return json.loads(Path(path).read_text())


def load_state(state: Dict[str, Any], step_dir: Path) -> None:
    """Fill `state` (nested dict of tensors / objects) in place from the DCP at `step_dir`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=SafeFileSystemReader(str(step_dir)))


def load_model_state(state: Dict[str, torch.Tensor], step_dir: Path, ema: bool = False) -> None:
    """Fill a model state dict (or part of one) in place from a training checkpoint: from its
    "model" entries, or with `ema` the parameters from its "ema" entries (the EMA of the weights,
    train.ema_decay > 0) and the buffers from "model". ValueError when it holds no EMA."""
    if not ema:
        load_state({"model": state}, step_dir)
        return
    keys = SafeFileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
    if not any(k.startswith("ema.") for k in keys):
        raise ValueError(f"{step_dir} holds no EMA weights (it was trained with train.ema_decay=0)")
    averaged = {k: v for k, v in state.items() if f"ema.{k}" in keys}
    load_state({"model": {k: v for k, v in state.items() if k not in averaged}, "ema": averaged}, step_dir)
