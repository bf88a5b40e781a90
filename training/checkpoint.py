"""Training checkpoints: save, verify, prune and resume with torch.distributed.checkpoint (DCP).

Layout (read by `model/checkpoint_files.py` and `model.load`): `out_dir/checkpoints/step_<N>/`
holds a DCP of {"model": model state, "optim": optimizer state, "train": {name: tensor}, and
"ema" when `train.ema_decay` > 0} plus `model_config.json` and `meta.json`. Everything is written
into `step_<N>.tmp/`, `meta.json` last (it lists the size and SHA-256 of every file, and the job's
resolved config), then the directory is renamed to `step_<N>`: a crash at any moment leaves either
a complete checkpoint or a `.tmp` directory that resume ignores and the next save removes. Every
rank checksums the files it wrote; rank 0 gathers them. Older checkpoints are pruned only after the
new one is complete, so a failed save (a full disk, a dead rank) never costs a finished checkpoint:
it raises `CheckpointError` on every rank, with one line naming the rank and the cause.

"train" holds tensors only (DCP would unpickle anything else): counters, RNG states, and JSON
(e.g. the dataset's position) encoded as uint8. On load its entries are allocated from the DCP
metadata, so the set of entries can grow without breaking old checkpoints.

Resume: rank 0 lists the complete checkpoints and every rank follows its list, newest first. The
files of a candidate are checked against meta.json (sizes everywhere; the checksums split over
the ranks, every rank reading a share), then DCP loads it; any failure on any rank (DCP's
`CheckpointException` is a BaseException and is caught too) skips it for every rank, with a
warning naming the checkpoint and the file, and the next older one is tried.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from model.checkpoint_files import SafeFileSystemReader, list_checkpoints, load_state, read_json

META = "meta.json"
HASH_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the older complete checkpoints are untouched."""


def json_tensor(obj: Any) -> torch.Tensor:
    """A JSON-able object as a uint8 tensor (for the "train" part of a checkpoint)."""
    return torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8)


def tensor_json(t: torch.Tensor) -> Any:
    """Inverse of `json_tensor`."""
    return json.loads(bytes(t.tolist()).decode())


def _distributed(group=None) -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank(group=None) -> int:
    return dist.get_rank(group) if _distributed(group) else 0


def _world(group=None) -> int:
    return dist.get_world_size(group) if _distributed(group) else 1


def all_gather_object(obj: Any, group=None) -> List[Any]:
    """Every rank's `obj` (also a barrier); [obj] on one process."""
    if not _distributed(group):
        return [obj]
    out: List[Any] = [None] * _world(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, group=None) -> Any:
    """Rank 0's `obj` on every rank."""
    if not _distributed(group):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return box[0]


def one_line(err: BaseException) -> str:
    """`Type: first line of the message`; DCP's CheckpointException reduced to its first failure."""
    if isinstance(err, CheckpointException) and err.failures:
        rank, failure = min(err.failures.items(), key=lambda kv: kv[0])
        inner = failure[0] if isinstance(failure, tuple) else failure
        return f"rank {rank}: {one_line(inner) if isinstance(inner, BaseException) else inner}"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


@contextmanager
def _quiet_single_process():
    """Silence DCP's notice that it runs without a process group (expected for one process)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def step_dir(out_dir: Path, step: int) -> Path:
    """out_dir/checkpoints/step_<step>."""
    return out_dir / "checkpoints" / f"step_{step}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _agree(error: Optional[str], group, what: str) -> None:
    """All ranks learn whether any rank failed `what`; then all raise the same CheckpointError."""
    errors = all_gather_object(error, group)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        rank, message = failed[0]
        raise CheckpointError(f"{what} failed on rank {rank}: {message}")


def _older(out_dir: Path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = [p.name for p in list_checkpoints(out_dir / "checkpoints")]
    return f"the older checkpoints are intact ({', '.join(found) or 'none yet'})"


def _finish_on_main(tmp: Path, final: Path, sums: Dict[str, str], model_config: Dict[str, Any],
                    meta: Dict[str, Any], keep: int) -> None:
    """Rank 0: model_config.json, meta.json (sizes, checksums) last, rename, prune."""
    (tmp / "model_config.json").write_text(json.dumps(model_config, indent=1))
    for name in (".metadata", "model_config.json"):
        sums[name] = sha256_file(tmp / name)
    files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": digest} for name, digest in sorted(sums.items())}
    (tmp / META).write_text(json.dumps({**meta, "files": files}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    prune(final.parent, keep)


def write(out_dir: Path, step: int, state: Dict[str, Any], model_config: Dict[str, Any], meta: Dict[str, Any],
          keep: int, group=None, make_writer: Callable[[str], FileSystemWriter] = FileSystemWriter) -> Path:
    """Write `state` as checkpoint `step` (collective over `group`); keep the newest `keep`.

    Raises CheckpointError on every rank when any rank fails; the `.tmp` directory is removed then."""
    final = step_dir(out_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    rank = _rank(group)
    try:
        error = None
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    except OSError as err:
        error = one_line(err)
    try:
        _agree(error, group, f"creating {tmp}")
        try:
            with _quiet_single_process():
                dcp.save(state, storage_writer=make_writer(str(tmp)), process_group=group)
            error = None
        except (Exception, CheckpointException) as err:  # DCP raises the same CheckpointException on every rank
            error = one_line(err)
        _agree(error, group, f"writing {tmp}")
        try:
            mine = {p.name: sha256_file(p) for p in sorted(tmp.glob(f"__{rank}_*"))}
            error = None
        except OSError as err:
            mine, error = {}, one_line(err)
        gathered = all_gather_object((mine, error), group)
        error = next((e for _, e in gathered if e is not None), None)
        if rank == 0 and error is None:
            try:
                _finish_on_main(tmp, final, {k: v for sums, _ in gathered for k, v in sums.items()},
                                model_config, {**meta, "step": step}, keep)
            except OSError as err:
                error = one_line(err)
        _agree(error, group, f"finishing {final}")
    except CheckpointError as err:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        all_gather_object(None, group)  # every rank returns after the cleanup
        raise CheckpointError(f"checkpoint step_{step} was not saved: {err}; {_older(out_dir)}") from None
    return final


def prune(ckpt_root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and `.tmp` leftovers of older saves."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        complete = list_checkpoints(ckpt_root)
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for left in ckpt_root.glob("step_*.tmp"):
        shutil.rmtree(left, ignore_errors=True)


def verify(step_path: Path, rank: int = 0, world: int = 1) -> Optional[str]:
    """None when the files of `step_path` match meta.json, else what is wrong, naming the file.

    Sizes are checked on every rank; checksums of `.metadata` on every rank, of the other files on
    one rank each (file i on rank i % world). Checkpoints without checksums get the size check."""
    try:
        listed = read_json(step_path / META).get("files", {})
    except (OSError, ValueError) as err:
        return f"{META}: {one_line(err)}"
    for i, (name, entry) in enumerate(sorted(listed.items())):
        entry = entry if isinstance(entry, dict) else {"bytes": entry}
        p = step_path / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != entry["bytes"]:
            return f"{name} has {p.stat().st_size} bytes, meta.json says {entry['bytes']}"
        if "sha256" in entry and (name == ".metadata" or i % world == rank):
            try:
                digest = sha256_file(p)
            except OSError as err:
                return f"{name}: {one_line(err)}"
            if digest != entry["sha256"]:
                return f"{name} does not match its checksum in meta.json (sha256 {digest[:12]}..., expected " \
                       f"{entry['sha256'][:12]}...)"
    return None


def _train_template(metadata) -> Dict[str, torch.Tensor]:
    """Empty tensors shaped like the checkpoint's "train" entries (read from the DCP metadata)."""
    out = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if fqn.startswith("train.") and isinstance(md, TensorStorageMetadata):
            out[fqn[len("train."):]] = torch.empty(md.size, dtype=md.properties.dtype)
    return out


def newest_meta(out_dir: Path) -> Optional[Dict[str, Any]]:
    """meta.json of the newest complete checkpoint under out_dir (None when there is none)."""
    found = list_checkpoints(out_dir / "checkpoints")
    return read_json(found[-1] / META) if found else None


def load_latest(out_dir: Path, state: Dict[str, Any], group=None, optional: Tuple[str, ...] = ()
                ) -> Optional[Tuple[Path, Dict[str, torch.Tensor]]]:
    """Fill `state` (live tensors) from the newest loadable checkpoint under `out_dir/checkpoints`,
    chosen by rank 0 and loaded by all; returns (its directory, its "train" tensors), or None.
    Top-level entries named in `optional` (e.g. "ema") that the checkpoint lacks are removed from
    `state` instead of failing the load."""
    rank, world = _rank(group), _world(group)
    root = out_dir / "checkpoints"
    names = broadcast_object([p.name for p in list_checkpoints(root)] if rank == 0 else None, group)
    for name in reversed(names):
        path = root / name
        problems = all_gather_object(verify(path, rank, world), group)
        problem = next((p for p in problems if p is not None), None)
        if problem is None:
            try:
                metadata = SafeFileSystemReader(str(path)).read_metadata()
                absent = [k for k in optional
                          if k in state and not any(f.startswith(k + ".") for f in metadata.state_dict_metadata)]
                full = {**{k: v for k, v in state.items() if k not in absent}, "train": _train_template(metadata)}
                with _quiet_single_process():
                    load_state(full, path)
            except (Exception, CheckpointException) as err:  # DCP's reader raises a BaseException
                problem = f"loading failed: {one_line(err)}"
            problem = next((p for p in all_gather_object(problem, group) if p is not None), None)
        if problem is None:
            for k in absent:
                del state[k]
            return path, full["train"]
        if rank == 0:
            warnings.warn(f"skipping corrupt checkpoint {path}: {problem}; trying the previous one")
    return None
