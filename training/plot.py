"""Pictures of a run from its `metrics.jsonl`, offline: `python -m training.plot OUT_DIR [--out DIR]`.

Writes PNG files into OUT_DIR/plots/ (or --out): loss.png (loss, MTP loss, validation loss),
lr.png, grad_norm.png, throughput.png (tokens/s and MFU), maxvio.png (MaxVio of each MoE layer,
DeepSeek-V3 section 2.1.2) and expert_load.png (per MoE layer, each expert's load relative to the
layer's mean over the logged steps: 1 is balanced). The per-layer fields `maxvio_layers` and
`expert_load` are written by the trainer at logging steps (training/loop.py). The trainer sends the
same figures to W&B at validation steps (`figures`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def read_records(path: Path) -> List[dict]:
    """The records of a metrics.jsonl; a torn last line (a run killed mid-write) is skipped."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"training.plot: skipping unreadable line {path}:{number}", file=sys.stderr)
    return records


def _series(records: Sequence[dict], key: str):
    pairs = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _lines(title: str, records: Sequence[dict], keys: Sequence[str], ylabel: str,
           log: bool = False) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        steps, values = _series(records, key)
        if steps:
            ax.plot(steps, values, marker="o" if key.startswith("val") else None, label=key)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(keys) > 1:
        ax.legend()
    fig.tight_layout()
    return fig


def _throughput(records: Sequence[dict]) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*_series(records, "tokens_per_s"), color="tab:blue", label="tokens/s")
    ax.set(title="throughput (MFU: right axis)", xlabel="step", ylabel="tokens/s")
    ax.grid(alpha=0.3)
    mfu = ax.twinx()
    steps, values = _series(records, "mfu")
    mfu.plot(steps, [100 * v for v in values], color="tab:orange", linestyle="--", label="MFU")
    mfu.set_ylabel("MFU (%)", color="tab:orange")
    fig.tight_layout()
    return fig


def _maxvio(records: Sequence[dict]) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 4))
    steps, rows = _series(records, "maxvio_layers")
    if rows:
        for layer, values in enumerate(np.asarray(rows, dtype=float).T):
            ax.plot(steps, values, label=f"MoE layer {layer}")
        ax.legend(fontsize="small", ncol=max(1, len(rows[0]) // 8))
    ax.set(title="MaxVio per MoE layer (max load / mean load - 1)", xlabel="step", ylabel="MaxVio")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _expert_load(records: Sequence[dict]) -> Figure:
    steps, loads = _series(records, "expert_load")
    load = np.asarray(loads, dtype=float)  # [T, L, E]
    n_layers = load.shape[1] if load.ndim == 3 else 1
    fig, axes = plt.subplots(n_layers, 1, figsize=(8, 1.2 + 1.6 * n_layers), sharex=True, squeeze=False)
    if load.ndim != 3 or load.size == 0:
        axes[0, 0].set_title("expert load: no per-layer load in metrics.jsonl")
        return fig
    relative = load / np.maximum(load.mean(axis=2, keepdims=True), 1e-9)
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(relative.max())))
    edges = np.concatenate([[steps[0] - 0.5], (np.asarray(steps[1:]) + np.asarray(steps[:-1])) / 2,
                            [steps[-1] + 0.5]]) if len(steps) > 1 else np.array([steps[0] - 0.5, steps[0] + 0.5])
    for layer in range(n_layers):
        ax = axes[layer, 0]
        image = ax.pcolormesh(edges, np.arange(load.shape[2] + 1) - 0.5, relative[:, layer, :].T,
                              cmap="RdBu_r", norm=norm, shading="flat")
        ax.set_ylabel(f"layer {layer}\nexpert")
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title("expert load / layer mean (1 = balanced); MoE layers in model order, MTP last")
    fig.colorbar(image, ax=axes[:, 0].tolist(), shrink=0.9)
    return fig


def figures(records: Sequence[dict]) -> Dict[str, Figure]:
    """The run's figures by file stem (loss, lr, grad_norm, throughput, maxvio, expert_load)."""
    return {"loss": _lines("loss", records, ("loss", "mtp_loss", "val_loss"), "nats / token"),
            "lr": _lines("learning rate", records, ("lr",), "lr"),
            "grad_norm": _lines("gradient norm (before clipping)", records, ("grad_norm",), "norm", log=True),
            "throughput": _throughput(records),
            "maxvio": _maxvio(records),
            "expert_load": _expert_load(records)}


def write_plots(out_dir: Path, plots_dir: Optional[Path] = None) -> List[Path]:
    """Draw the figures of out_dir/metrics.jsonl into plots_dir (default out_dir/plots); the paths."""
    metrics = out_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} does not exist (is {out_dir} the out_dir of a run?)")
    records = read_records(metrics)
    if not records:
        raise ValueError(f"{metrics} holds no records yet")
    plots_dir = plots_dir or out_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures(records).items():
        path = plots_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.plot", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="a run's out_dir (holding metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNG files (default OUT_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        written = write_plots(args.out_dir, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"training.plot: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
