"""`python -m parallel.summary <model-config-name> [key=value ...] [--fit GPUS --gpu-mem GIB [--margin GIB]]`.

The command composes the model's own figures (model/summary.py: total_params, active_params,
mtp_params, embedding_params, flops_per_token at `train.seq_len`, default 4096, with the parameter
formulas checked against a meta-device model) with the memory per GPU of a training layout
(parallel/memory.py, formula and assumptions there): memory_gib_per_gpu, memory_breakdown
{params_gib, weight_copies_gib, grads_gib, optimizer_gib, activations_gib},
host_memory_gib_per_gpu (optimizer state offloaded to the host), the layout echoed and, with
optim.offload=cpu, "offload": {gpu_gib_saved, host_gib_per_node} (a node of parallel.gpus_per_node
GPUs, default 8).
It prints one JSON line. It lives here, beside the layouts, because model/ knows no parallelism.

Overrides: `hidden_size=512` or `model.hidden_size=512` change the model config,
`train.seq_len=8192` the sequence length; the layout: `parallel.pp= parallel.dp= parallel.ep=
parallel.schedule= parallel.stages_per_rank= parallel.layers_per_stage=[..] parallel.zero=
train.micro_batch= train.global_batch= precision=bf16|fp8|fp32 precision.fused_head_loss=
precision.param_dtype=fp32|bf16 optim.moments_dtype=bf16|fp32 optim.offload=none|cpu`. Whatever is not given is what
training would use: `precision` bf16 (configs/train.yaml) and the keys of configs/precision/<name>.yaml,
configs/parallel/default.yaml (`parallel.zero` null: on when dp x ep > 1) and configs/optim/adamw.yaml;
`train.micro_batch` 1 and pp = dp = ep = 1; `train.global_batch` unset: the pipeline runs enough
micro-batches to reach its steady state.

`--fit GPUS --gpu-mem GIB` prints instead one JSON line per layout of GPUS GPUs that fits GIB GiB
minus `--margin` (default 4 GiB), best first (parallel/fit.py), with the other settings as given.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from omegaconf import OmegaConf

from model.summary import load_model_config, summarize

from .fit import fit_layouts
from .memory import Layout, memory_per_gpu

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LAYOUT_KEYS = {"parallel.pp": "pp", "parallel.dp": "dp", "parallel.ep": "ep", "parallel.schedule": "schedule",
               "parallel.stages_per_rank": "stages_per_rank", "parallel.layers_per_stage": "layers_per_stage",
               "parallel.zero": "zero", "train.micro_batch": "micro_batch", "train.global_batch": "global_batch",
               "precision": "precision", "precision.fused_head_loss": "fused_head_loss",
               "precision.param_dtype": "param_dtype", "optim.moments_dtype": "moments_dtype",
               "optim.offload": "offload", "parallel.gpus_per_node": "gpus_per_node"}
DEFAULT_MARGIN_GIB = 4.0


def split_layout_overrides(overrides: Sequence[str]) -> Tuple[Dict[str, object], List[str]]:
    """The `Layout` fields given among `overrides` (values parsed as YAML), and the other overrides."""
    fields: Dict[str, object] = {}
    rest: List[str] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key in LAYOUT_KEYS:
            fields[LAYOUT_KEYS[key]] = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={value}"]))["v"]
        elif sep and key.split(".")[0] in ("parallel", "precision", "optim"):
            raise ValueError(f"unknown override {item!r}: the layout keys are {', '.join(LAYOUT_KEYS)}")
        else:
            rest.append(item)
    return fields, rest


def _yaml(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else {}


def training_defaults(fields: Dict[str, object]) -> Dict[str, object]:
    """`fields` completed with what training uses when they are not given (module docstring)."""
    out = dict(fields)
    out.setdefault("precision", "bf16")
    precision = _yaml(CONFIGS / "precision" / f"{out['precision']}.yaml")
    parallel = _yaml(CONFIGS / "parallel" / "default.yaml")
    optim = _yaml(CONFIGS / "optim" / "adamw.yaml")
    out.setdefault("fused_head_loss", bool(precision.get("fused_head_loss", False)))
    out.setdefault("param_dtype", precision.get("param_dtype", "fp32"))
    out.setdefault("moments_dtype", optim.get("moments_dtype", "bf16"))
    out.setdefault("offload", optim.get("offload", "none"))
    if out.get("gpus_per_node") is None:
        out["gpus_per_node"] = parallel.get("gpus_per_node") or 8
    for key in ("schedule", "stages_per_rank", "layers_per_stage", "zero"):
        if key not in out and parallel.get(key) is not None:
            out[key] = parallel[key]
    if out.get("zero") is None:
        out["zero"] = int(out.get("dp") or 1) * int(out.get("ep") or 1) > 1
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m parallel.summary", description=__doc__.split("\n")[0])
    p.add_argument("model", help="a model config name under configs/model")
    p.add_argument("overrides", nargs="*", help="key=value (see the module docstring)")
    p.add_argument("--fit", type=int, metavar="GPUS", help="list the layouts of GPUS GPUs that fit, best first")
    p.add_argument("--gpu-mem", type=float, metavar="GIB", help="GPU memory in GiB (with --fit)")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN_GIB, metavar="GIB",
                   help=f"GiB kept free for what the estimate leaves out (default {DEFAULT_MARGIN_GIB})")
    return p


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        if (args.fit is None) != (args.gpu_mem is None):
            raise ValueError("--fit GPUS and --gpu-mem GIB go together")
        fields, rest = split_layout_overrides(args.overrides)
        cfg, seq_len = load_model_config(args.model, rest)
        layout = Layout(seq_len=seq_len, **training_defaults(fields))
        if args.fit is not None:
            rows = fit_layouts(cfg, layout, args.fit, args.gpu_mem, args.margin)
        else:
            memory = memory_per_gpu(cfg, layout)
    except (ValueError, FileNotFoundError) as err:
        print(f"parallel.summary: {err}", file=sys.stderr)
        return 2
    if args.fit is not None:
        for row in rows:
            print(json.dumps({"model": args.model, **row}))
        if not rows:
            print(f"parallel.summary: no layout of {args.fit} GPUs fits {args.gpu_mem} GiB "
                  f"(margin {args.margin} GiB)", file=sys.stderr)
        return 0 if rows else 1
    print(json.dumps({"model": args.model, **summarize(cfg, seq_len), **memory}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
