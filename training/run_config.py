"""The job config across restarts: every start's config kept, a resume's config compared with the saved one.

Each start writes its resolved config to `out_dir/config.yaml` (the current one) and to
`out_dir/config_starts/<NNN>.yaml` (one per start, never overwritten). Every checkpoint's meta.json
holds the config of the run that wrote it; resuming compares the new config with it: a change of
the model's parameter shapes (found by building both models on the meta device, so the rule is
the model's own) is a `ConfigError` naming the fields, any other change a warning listing them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from model.config import ModelConfig
from model.transformer import Transformer

from .config import ConfigError

IGNORED = ("out_dir",)  # the same run may name its directory differently (relative / absolute)
Change = Tuple[str, Any, Any]


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(saved: Dict[str, Any], new: Dict[str, Any]) -> List[Change]:
    """(key, saved value, new value) for every setting present in both that differs."""
    a, b = flatten(saved), flatten(new)
    return [(k, a[k], b[k]) for k in sorted(a.keys() & b.keys()) if a[k] != b[k] and k not in IGNORED]


def _shapes(model_cfg: Dict[str, Any]) -> Optional[Dict[str, Tuple[int, ...]]]:
    """Parameter shapes of a model config (None when the config is invalid)."""
    try:
        cfg = ModelConfig.from_dict(model_cfg)
    except (ValueError, TypeError):
        return None
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}


def shape_changes(saved_model: Dict[str, Any], new_model: Dict[str, Any]) -> List[Change]:
    """The changed model fields that alone change a parameter shape (or the set of parameters)."""
    changes = config_changes(saved_model, new_model)
    base = _shapes(saved_model)
    if not changes or base == _shapes(new_model):
        return []
    return [(k, old, new) for k, old, new in changes
            if _shapes({**saved_model, k: new}) != base] or changes


def _fmt(changes: List[Change], prefix: str = "") -> str:
    return ", ".join(f"{prefix}{k} {old!r} -> {new!r}" for k, old, new in changes)


def check_resume(saved: Dict[str, Any], new: Dict[str, Any], checkpoint: Path) -> Optional[str]:
    """Raise ConfigError on a shape change; return a warning listing other changes, or None."""
    shapes = shape_changes(saved.get("model", {}), new.get("model", {}))
    if shapes:
        raise ConfigError(f"{checkpoint} was saved with other parameter shapes: {_fmt(shapes, 'model.')}; "
                          f"resume with the saved values or use another out_dir")
    changes = config_changes(saved, new)
    if not changes:
        return None
    return f"warning: resuming {checkpoint} with a changed config: {_fmt(changes)}"


def keep_config(out_dir: Path, text: str) -> Path:
    """Write `text` as out_dir/config.yaml and as the next out_dir/config_starts/NNN.yaml."""
    starts = out_dir / "config_starts"
    starts.mkdir(parents=True, exist_ok=True)
    path = starts / f"{len(list(starts.glob('*.yaml'))):03d}.yaml"
    path.write_text(text)
    (out_dir / "config.yaml").write_text(text)
    return path
