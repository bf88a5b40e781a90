"""What ran: every launch of a job appends its command-line overrides and code version to
`out_dir/launches.jsonl` (one JSON object per launch, so a resumed run keeps the history of each
part), next to the resolved config.yaml.

A record: {"time" (UTC, ISO 8601), "argv", "overrides", "job" (number in a multirun, else null),
"world_size", "git": {"commit", "dirty"}, "torch", "python"}. `dirty` is true when tracked files
differ from the commit; both are null outside a git checkout.
"""
from __future__ import annotations

import datetime
import json
import platform
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .config import REPO_ROOT


def code_version(repo: Path = REPO_ROOT) -> Dict[str, Optional[object]]:
    """{"commit": HEAD's hash, "dirty": tracked files modified} of `repo`; None values without git."""
    def git(*args: str) -> Optional[str]:
        try:
            done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}


def record_launch(out_dir: Path, argv: List[str], overrides: List[str], job: Optional[int],
                  world_size: int) -> Dict[str, object]:
    """Append this launch's record to out_dir/launches.jsonl and return it."""
    record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "argv": list(argv), "overrides": list(overrides), "job": job, "world_size": world_size,
              "git": code_version(), "torch": torch.__version__, "python": platform.python_version()}
    with (out_dir / "launches.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    return record
