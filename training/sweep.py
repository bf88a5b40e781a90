"""Command-line overrides as Hydra users write them: checks, sweeps (`-m` / `--multirun`), job folders.

train.py composes its config with Hydra's compose API (not `@hydra.main`), so Hydra's own run and
sweep machinery does not run; this module gives the parts of it a training job needs:
- `hydra.*` overrides (run/sweep dirs, launcher, logging) would be silently ignored: refused.
- `+key=value` / `++key=value` add a key; every key is fixed by the schema of training/config.py, so
  a key the schema lacks is refused instead of riding along unused.
- A sweep override (`optim.lr=1e-3,2e-3`, `range(1,4)`, `choice(a,b)`, `glob(...)`) needs `-m`; the jobs
  are the cartesian product of the sweeps, in Hydra's BasicSweeper order, run one after another,
  job i in `${out_dir}/i`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError, JobConfig, compose_job

MULTIRUN_FLAGS = ("-m", "--multirun")


@dataclass
class Job:
    """One training job of a launch: its number in the sweep (None for a single run), the
    overrides it was composed from (as given on the command line) and the composed config."""
    number: Optional[int]
    overrides: List[str]
    cfg: DictConfig


def _schema_has(path: str) -> bool:
    """Whether the dotted `path` names a key of the job schema (JobConfig)."""
    node = OmegaConf.structured(JobConfig)
    for part in path.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = node._get_node(part)
    return True


def check_override(override: Override) -> None:
    """Refuse a `hydra.*` override and a `+`/`++` override of a key the schema lacks (ConfigError)."""
    key = override.key_or_group
    line = override.input_line
    if key == "hydra" or key.startswith(("hydra.", "hydra/")):
        raise ConfigError(f"{line}: hydra.* overrides have no effect here (train.py composes the config "
                          "without Hydra's run/sweep directories, launchers or logging); set out_dir=PATH "
                          "instead (a multirun puts job i in ${out_dir}/i)")
    if override.type in (OverrideType.ADD, OverrideType.FORCE_ADD) and not _schema_has(key):
        raise ConfigError(f"{line}: the job config has no key {key!r} (training/config.py defines every key; "
                          "+key cannot add one); check the spelling, `python train.py --cfg` prints every key")


def parse(overrides: List[str]) -> List[Override]:
    """Parse and check command-line overrides (Hydra's grammar); errors propagate."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    for override in parsed:
        check_override(override)
    return parsed


def plan_jobs(args: List[str]) -> List[Job]:
    """The jobs of a command line: one job, or with -m/--multirun one per point of the sweep, each
    composed (Hydra errors and ConfigError propagate) with out_dir set to ${out_dir}/<job number>."""
    multirun = any(a in MULTIRUN_FLAGS for a in args)
    overrides = [a for a in args if a not in MULTIRUN_FLAGS]
    parsed = parse(overrides)
    sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
    if not multirun:
        if sweeps:
            raise ConfigError(f"{sweeps[0]} is a sweep; add -m (--multirun) to run one job per value, "
                              "or give one value")
        return [Job(None, overrides, compose_job(overrides))]
    jobs = []
    for number, job_overrides in enumerate(BasicSweeper.split_arguments(parsed, None)[0]):
        cfg = compose_job(job_overrides)
        cfg.out_dir = f"{cfg.out_dir}/{number}"
        jobs.append(Job(number, job_overrides, cfg))
    return jobs
