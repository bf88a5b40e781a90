"""`python -m kernels.inspect`: what the FP8 training path's Triton kernels compile to on sm_90 / sm_100.

DeepSeek-V3 section 3.3 (FP8 training) on Hopper and Blackwell, checked on a machine without a GPU.
For a model's shapes (configs/model/<name>.yaml, `v3_671b` by default) it runs forward and backward
of every FP8 module kind of one layer (the attention / MTP projections through the FP8 Linear, the
dense SwiGLU, the shared and the routed experts) on the "meta" device with the Triton backend,
records every kernel launch instead of running it (`kernels.triton.launch`), compiles each
distinct specialization for each architecture (`kernels.aot`) and prints, per kernel and the
launches that use it: registers, stack bytes (spills), shared memory, warps, the tensor-core
instruction, pipelined operand loads and resident CTAs per SM, with the GEMM configuration (tile,
stages, launch order: `kernels.triton.configs`). Exit status 1 when a kernel spills, a GEMM lacks
the architecture's tensor-core instruction or pipelined loads, or a kernel that must round every
operation (launched with `enable_fp_fusion=False`: the fused SwiGLU quantization) has a fused
multiply-add. With --candidates it compiles every configuration the autotuner may pick
(`python -m kernels.autotune`) on one launch of its GEMM kind.

    python -m kernels.inspect [--arch 90,100] [--model v3_671b[,tiny]] [--tokens 4096[,100]] [--experts-per-rank 8]
                              [--candidates]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import torch

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"


def load_model_config(name: str) -> dict:
    """The model config `name` (a file of configs/model/ or a path to a YAML file) as a dict."""
    import yaml
    path = Path(name) if name.endswith((".yaml", ".yml")) else CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise SystemExit(f"kernels.inspect: --model {name}: no such config; known: {', '.join(known)}")
    return yaml.safe_load(path.read_text())


def fp8_modules(cfg: dict, experts_per_rank: int) -> Tuple[List[Tuple[str, int, int, bool]], List[Tuple[str, int, int, int]]]:
    """(linears: (name, in, out, E5M6-cached input), SwiGLUs: (name, experts, hidden, intermediate)) of one
    layer of each kind, as `model.fp8.apply_fp8` switches them."""
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    nope, rope, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    linears = []
    if cfg.get("q_lora_rank"):
        linears += [("q_a_proj", D, cfg["q_lora_rank"], False), ("q_b_proj", cfg["q_lora_rank"], H * (nope + rope), False)]
    else:
        linears.append(("q_proj", D, H * (nope + rope), False))
    linears += [("kv_a_proj_with_mqa", D, cfg["kv_lora_rank"] + rope, False),
                ("kv_b_proj", cfg["kv_lora_rank"], H * (nope + v), False), ("o_proj", H * v, D, True)]
    if cfg.get("num_nextn_predict_layers"):
        linears.append(("mtp.eh_proj", 2 * D, D, False))
    swiglus = []
    if cfg.get("first_k_dense_replace"):
        swiglus.append(("dense_mlp", 1, D, cfg["intermediate_size"]))
    if cfg.get("n_shared_experts"):
        swiglus.append(("shared_experts", 1, D, cfg["moe_intermediate_size"] * cfg["n_shared_experts"]))
    if cfg.get("n_routed_experts"):
        swiglus.append(("routed_experts", min(experts_per_rank, cfg["n_routed_experts"]), D, cfg["moe_intermediate_size"]))
    return linears, swiglus


def routed_counts(cfg: dict, tokens: int, experts: int) -> List[int]:
    """Rows of each of a rank's `experts` routed experts under balanced routing of `tokens` tokens (top-k of all)."""
    rows = tokens * cfg["num_experts_per_tok"] * experts // cfg["n_routed_experts"]
    return [rows // experts + (e < rows % experts) for e in range(experts)]


def _record(fn) -> list:
    from .triton.launch import recording
    with recording() as launches:
        fn()
    return launches


def record_launches(cfg: dict, tokens: int, experts_per_rank: int) -> List[Tuple[str, object]]:
    """(label, launch) for every Triton launch of one layer's FP8 modules, forward and backward."""
    from . import ops
    from .linear import fp8_linear, fp8_swiglu_experts
    meta = torch.device("meta")
    linears, swiglus = fp8_modules(cfg, experts_per_rank)
    out = []

    def label(name, launches):
        seen: Dict[str, int] = {}
        for launch in launches:
            kind = launch.kernel.__name__.strip("_").replace("_kernel", "")
            seen[kind] = seen.get(kind, 0) + 1
            out.append((f"{name} {kind}#{seen[kind]}", launch))

    def run(name, forward):
        holder = {}
        label(f"{name} fwd", _record(lambda: holder.setdefault("y", forward())))
        y = holder["y"]
        label(f"{name} bwd", _record(lambda: y.backward(torch.empty_like(y))))

    with ops.use_backend("triton"):
        for name, k, n, e5m6 in linears:
            x = torch.empty(tokens, k, device=meta, dtype=torch.bfloat16, requires_grad=True)
            w = torch.empty(n, k, device=meta, requires_grad=True)
            run(name, lambda: fp8_linear(x, w, True, e5m6))
        for name, experts, d, inter in swiglus:
            # the dense and shared SwiGLUs run ungrouped (model.fp8)
            counts = routed_counts(cfg, tokens, experts) if name == "routed_experts" else None
            x = torch.empty(sum(counts) if counts else tokens, d, device=meta, dtype=torch.bfloat16,
                            requires_grad=True)
            gu = torch.empty(experts, 2 * inter, d, device=meta, requires_grad=True)
            down = torch.empty(experts, d, inter, device=meta, requires_grad=True)
            rw = torch.empty(x.shape[0], device=meta, requires_grad=True) if counts else None
            run(name, lambda: fp8_swiglu_experts(x, gu, down, counts, True, rw))
    return out


def gemm_kind(launch) -> str:
    """The `kernels.triton.configs` kind of a recorded GEMM launch ("" for a quantization kernel)."""
    name, meta = launch.kernel.__name__, launch.meta
    if name == "_gemm_grouped_k_kernel":
        return "wgrad_grouped"
    if name == "_gemm_kernel":
        return ("fprop" if meta["B_BLOCK"] else "wgrad") + ("_grouped" if meta["GROUPED"] else "")
    return ""


def _config(meta: dict) -> str:
    if "GROUP_M" not in meta:
        return "-"
    return f"{meta['BLOCK_M']}x{meta['BLOCK_N']} w{meta['num_warps']} s{meta['num_stages']} g{meta['GROUP_M']}"


def _compile_rows(labelled, archs: List[int]) -> List[dict]:
    from .aot import compile_launch
    rows: Dict[Tuple, dict] = {}
    for label, launch in labelled:
        for arch in archs:
            c = compile_launch(launch.kernel, launch.args, launch.meta, arch)
            key = (launch.kernel.__name__, arch, id(c))
            row = rows.setdefault(key, {"kernel": launch.kernel.__name__, "compiled": c, "launches": [],
                                        "config": _config(launch.meta),
                                        "exact": launch.meta.get("enable_fp_fusion") is False})
            row["launches"].append(label)
    return list(rows.values())


def inspect(cfg: dict, tokens: int, experts_per_rank: int, archs: List[int]) -> List[dict]:
    """One row per (kernel specialization, architecture): its launches and what it compiled to."""
    return _compile_rows(record_launches(cfg, tokens, experts_per_rank), archs)


def inspect_candidates(cfg: dict, tokens: int, experts_per_rank: int, archs: List[int]) -> List[dict]:
    """Rows of every autotuning candidate (`configs.CANDIDATES`) other than its kind's default, each
    compiled on the first launch of its kind (the defaults are what `inspect` compiles)."""
    from .triton.configs import CANDIDATES, DEFAULTS, forced
    labelled = []
    for kind, candidates in CANDIDATES.items():
        for candidate in candidates:
            if candidate == DEFAULTS[kind]:
                continue
            with forced({kind: candidate}):
                label, launch = next((lb, ln) for lb, ln in record_launches(cfg, tokens, experts_per_rank)
                                     if gemm_kind(ln) == kind)
            labelled.append((f"{kind} candidate: {label}", launch))
    return _compile_rows(labelled, archs)


def problems(row: dict) -> List[str]:
    """What is wrong with a row: spills; for a GEMM, no tensor-core instruction or unpipelined loads; a fused
    multiply-add in a kernel launched with floating-point fusion off (its operations must round one by one)."""
    c, found = row["compiled"], []
    if c.stack:
        found.append(f"spills ({c.stack} B stack)")
    if row.get("exact") and c.fma:
        found.append("fused multiply-add with fp fusion off")
    if "gemm" in row["kernel"]:
        if not c.tensor_core:
            found.append("no tensor-core instruction")
        if not c.pipelined:
            found.append("loads not pipelined")
    return found


def format_table(rows: List[dict]) -> str:
    """Markdown table of the rows."""
    lines = ["| kernel | config | sm | regs | stack B | smem KiB | warps | tensor core | pipelined | CTAs/SM | launches "
             "| problems |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (r["kernel"], r["config"], r["compiled"].arch)):
        c = row["compiled"]
        names = sorted(set(row["launches"]))
        shown = ", ".join(names[:3]) + (f" (+{len(names) - 3})" if len(names) > 3 else "")
        lines.append(f"| {row['kernel']} | {row['config']} | {c.arch} | {c.registers} | {c.stack} | {c.shared / 1024:.1f} | "
                     f"{c.num_warps} | {'yes' if c.tensor_core else 'no'} | {'yes' if c.pipelined else 'no'} | "
                     f"{c.occupancy} | {shown} | {'; '.join(problems(row)) or 'ok'} |")
    return "\n".join(lines)


def _ints(text: str, option: str) -> List[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"kernels.inspect: {option} {text}: expected comma-separated integers") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="90,100", help="comma-separated compute capabilities x10 (90, 100)")
    parser.add_argument("--model", default="v3_671b", help="configs/model/<name>.yaml or YAML paths, comma-separated")
    parser.add_argument("--tokens", default="4096", help="tokens per micro-batch (GEMM M), one or one per model")
    parser.add_argument("--experts-per-rank", type=int, default=8, help="routed experts per expert-parallel rank")
    parser.add_argument("--candidates", action="store_true",
                        help="compile the autotuner's candidate configurations instead (one launch per GEMM kind)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("kernels.inspect: unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    from .aot import TENSOR_CORE_PTX
    archs = _ints(args.arch, "--arch")
    if any(a not in TENSOR_CORE_PTX for a in archs):
        raise SystemExit(f"kernels.inspect: --arch {args.arch}: allowed: comma-separated {sorted(TENSOR_CORE_PTX)}")
    models, tokens = args.model.split(","), _ints(args.tokens, "--tokens")
    if len(tokens) not in (1, len(models)):
        raise SystemExit(f"kernels.inspect: --tokens {args.tokens}: give one value or one per model ({len(models)})")
    failed = 0
    for model, m in zip(models, tokens * len(models) if len(tokens) == 1 else tokens):
        rows = (inspect_candidates if args.candidates else inspect)(load_model_config(model), m,
                                                                     args.experts_per_rank, archs)
        print(f"# {model}, {m} tokens, {args.experts_per_rank} experts per rank"
              + (", autotuning candidates" if args.candidates else ""))
        print(format_table(rows))
        bad = [r for r in rows if problems(r)]
        if bad:
            print(f"kernels.inspect: {model}: {len(bad)} of {len(rows)} compiled kernels have problems", file=sys.stderr)
        failed += len(bad)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
