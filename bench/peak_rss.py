"""Peak resident memory (VmHWM) of a command run in this process, above the peak after its imports.

    python -m bench.peak_rss [--preload MOD[,MOD...]] [--out DIR] -- (MODULE | SCRIPT.py) [ARG...]

Imports the `--preload` modules, records VmHWM (the baseline: the peak of a process that only
imports them), runs MODULE (as `python -m MODULE`) or SCRIPT.py with ARG..., and prints one line
`PEAK_RSS {"rank", "base_kib", "peak_kib", "rc"}` when it ends (rank from $RANK under torchrun), also
written to DIR/peak_rss_<rank>.json with `--out` (ranks' stdout lines may interleave), then exits
with its status. Used by the memory tests of rank-local construction and streaming conversion
(tests/test_rank_memory.py, tests/test_init_from.py) and by `bench.hf_convert`.
"""
from __future__ import annotations

import importlib
import json
import os
import runpy
import sys
from pathlib import Path


def vm_hwm_kib() -> int:
    """Peak resident set size of this process (VmHWM in /proc/self/status), KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/status has no VmHWM (Linux only)")


def main(argv) -> int:
    options = {}
    while argv[:1] in (["--preload"], ["--out"]) and len(argv) > 1:
        options[argv[0]], argv = argv[1], argv[2:]
    if argv[:1] != ["--"] or len(argv) < 2:
        print("usage: python -m bench.peak_rss [--preload MOD[,MOD...]] [--out DIR] -- (MODULE | SCRIPT.py) "
              "[ARG...]", file=sys.stderr)
        return 2
    preload = options["--preload"].split(",") if "--preload" in options else []
    target, args = argv[1], argv[2:]
    for module in preload:
        importlib.import_module(module)
    base = vm_hwm_kib()
    sys.argv = [target, *args]
    rc = 0
    try:
        if target.endswith(".py"):
            sys.path.insert(0, str(Path(target).resolve().parent))
            runpy.run_path(target, run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        rc = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    rank = int(os.environ.get("RANK", "0"))
    line = json.dumps({"rank": rank, "base_kib": base, "peak_kib": vm_hwm_kib(), "rc": rc})
    if "--out" in options:
        Path(options["--out"], f"peak_rss_{rank}.json").write_text(line)
    print("PEAK_RSS " + line, flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
