"""Reading evaluation tasks stored as JSON lines: one object per non-blank line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Tuple, Union


def iter_jsonl(path: Union[str, Path]) -> Iterator[Tuple[str, Any]]:
    """Yields ("<path>:<line>", parsed object) for every non-blank line of a UTF-8 `.jsonl` file.

    A line that is not valid JSON raises ValueError naming the file and line.
    """
    path = Path(path)
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
