"""Training checkpoints: save, prune and resume with torch.distributed.checkpoint (DCP).

Layout (read by `model/checkpoint_files.py` and `model.load`): `out_dir/checkpoints/step_<N>/`
holds a DCP of {"model": model state, "optim": optimizer state, "train": {name: tensor}} plus
`model_config.json` and `meta.json`. Everything is written into `step_<N>.tmp/`, `meta.json` last
(it lists the size of every file), then the directory is renamed to `step_<N>`: a crash at any
moment leaves either a complete checkpoint or a `.tmp` directory that resume ignores.

"train" holds tensors only (DCP would unpickle anything else): counters, RNG states, and JSON
(e.g. the dataset's position) encoded as uint8. On load its entries are allocated from the DCP
metadata, so the set of entries can grow without breaking old checkpoints. A checkpoint whose files
do not match `meta.json` or fail to load is skipped with a warning naming it, and the next older
one is tried.
"""
from __future__ import annotations

import json
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from model.checkpoint_files import SafeFileSystemReader, list_checkpoints, load_state, read_json

META = "meta.json"


def json_tensor(obj: Any) -> torch.Tensor:
    """A JSON-able object as a uint8 tensor (for the "train" part of a checkpoint)."""
    return torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8)


def tensor_json(t: torch.Tensor) -> Any:
    return json.loads(bytes(t.tolist()).decode())


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@contextmanager
def _quiet_single_process():
    """Silence DCP's notice that it runs without a process group (expected for one process)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def step_dir(out_dir: Path, step: int) -> Path:
    return out_dir / "checkpoints" / f"step_{step}"


def save(out_dir: Path, step: int, state: Dict[str, Any], model_config: Dict[str, Any],
         meta: Dict[str, Any], keep: int) -> Path:
    """Write `state` as checkpoint `step` (collective when distributed); keep the newest `keep`."""
    final = step_dir(out_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if _is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    with _quiet_single_process():
        dcp.save(state, storage_writer=FileSystemWriter(str(tmp)))
    if _is_main():
        (tmp / "model_config.json").write_text(json.dumps(model_config, indent=1))
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / META).write_text(json.dumps({**meta, "step": step, "files": files}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        prune(out_dir / "checkpoints", keep)
    _barrier()
    return final


def prune(ckpt_root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        complete = list_checkpoints(ckpt_root)
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def check_files(step_path: Path) -> None:
    """Raise ValueError when a file listed in meta.json is missing or has another size."""
    listed = read_json(step_path / META).get("files", {})
    for name, size in listed.items():
        p = step_path / name
        if not p.is_file():
            raise ValueError(f"{name} is missing")
        if p.stat().st_size != size:
            raise ValueError(f"{name} has {p.stat().st_size} bytes, meta.json says {size}")


def _train_template(step_path: Path) -> Dict[str, torch.Tensor]:
    """Empty tensors shaped like the checkpoint's "train" entries (read from the DCP metadata)."""
    metadata = SafeFileSystemReader(str(step_path)).read_metadata()
    out = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if fqn.startswith("train.") and isinstance(md, TensorStorageMetadata):
            out[fqn[len("train."):]] = torch.empty(md.size, dtype=md.properties.dtype)
    return out


def load_latest(out_dir: Path, state: Dict[str, Any]) -> Optional[Tuple[Path, Dict[str, torch.Tensor]]]:
    """Fill `state` ({"model", "optim"} of live tensors) from the newest loadable checkpoint under
    `out_dir/checkpoints`; returns (its directory, its "train" tensors), or None when there is none."""
    for path in reversed(list_checkpoints(out_dir / "checkpoints")):
        try:
            check_files(path)
            full = {**state, "train": _train_template(path)}
            with _quiet_single_process():
                load_state(full, path)
        except Exception as err:  # any unreadable checkpoint is skipped, the reason is reported
            reason = str(err).splitlines()[0] if str(err) else ""
            warnings.warn(f"skipping corrupt checkpoint {path}: {type(err).__name__}: {reason}")
            continue
        return path, full["train"]
    return None
