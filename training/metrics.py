"""Training metrics: a console line, `out_dir/metrics.jsonl` and Weights & Biases.

`metrics.jsonl` holds one JSON object per logged step (blueprint section 4: step, tokens, loss,
mtp_loss, lr, grad_norm, tokens_per_s, mfu, maxvio, time, skipped_steps, balance_loss; val_loss and
val_bpb on validation steps; per MoE layer `maxvio_layers` and `expert_load`, tokens per expert of the
logged step, [layers][experts]). On resume the records after the checkpoint's step are dropped so the
file reads as one run; a torn last line (the job died while writing it) is dropped with a warning.
W&B runs under `out_dir/wandb`, resumes the same run id when the job is resumed, and gets the
resolved config. Records are logged with W&B's own increasing step and plotted against their
`step` field (`define_metric`): W&B refuses a step lower than one it has seen, so passing our step
would drop every step replayed after a resume. W&B's warnings are shown. At validation steps W&B also
gets the figures of training/plot.py and a router-bias histogram, and with `logging.wandb.artifacts`
every checkpoint. Only rank 0 logs.
"""
from __future__ import annotations

import json
import netrc
import os
import secrets
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from model.transformer import maxvio_per_layer

CONSOLE_FIELDS = (("loss", "loss {:.4f}"), ("mtp_loss", "mtp {:.4f}"), ("lr", "lr {:.2e}"),
                  ("grad_norm", "gnorm {:.3f}"), ("tokens_per_s", "{:,.0f} tok/s"),
                  ("mfu", "mfu {:.2%}"), ("maxvio", "maxvio {:.3f}"),
                  ("val_loss", "val_loss {:.4f}"), ("val_bpb", "val_bpb {:.4f}"))


def wandb_mode(requested: str) -> str:
    """`auto` -> WANDB_MODE if set, else online with an API key (env or ~/.netrc), else offline."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    return "offline"


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def console_line(record: Dict[str, Any], total_steps: int, eta_s: Optional[float]) -> str:
    """`step 120/300 | loss 4.1234 | ... | eta 1m23s` for the fields present in `record`."""
    parts = [f"step {record['step']}/{total_steps}"]
    for key, fmt in CONSOLE_FIELDS:
        value = record.get(key)
        if value is not None:
            parts.append(fmt.format(value))
    if record.get("skipped_steps"):
        parts.append(f"skipped {record['skipped_steps']}")
    if eta_s is not None:
        parts.append(f"eta {format_duration(eta_s)}")
    return " | ".join(parts)


def layer_records(load_LE: Optional[torch.Tensor]) -> Dict[str, Any]:
    """`maxvio_layers` and `expert_load` (tokens per expert) of every MoE layer from a step's load
    [layers, experts]; empty without MoE layers."""
    if load_LE is None or load_LE.numel() == 0:
        return {}
    load = load_LE.float().cpu()
    return {"maxvio_layers": [round(v, 4) for v in maxvio_per_layer(load).tolist()],
            "expert_load": load.round().long().tolist()}


class MetricsLogger:
    """Console + metrics.jsonl + W&B for rank 0; every method is a no-op on other ranks."""

    def __init__(self, out_dir: Path, config: Dict[str, Any], wandb_cfg, total_steps: int,
                 resume_step: int, enabled: bool):
        self.enabled, self.total_steps = enabled, total_steps
        self.path = out_dir / "metrics.jsonl"
        self.run = None
        self.artifacts = bool(wandb_cfg.get("artifacts", False))
        if not enabled:
            return
        self._truncate_after(resume_step)
        mode = wandb_mode(wandb_cfg.mode)
        if mode != "disabled":
            self.run = self._start_wandb(out_dir, config, wandb_cfg, mode)

    def _truncate_after(self, step: int) -> None:
        """Keep only records up to `step` (those the resumed checkpoint has seen); drop torn lines."""
        if not self.path.is_file():
            return
        kept = []
        for number, line in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                print(f"warning: {self.path}:{number}: dropped a torn line ({line[:40]!r}...)", flush=True)
                continue
            if record["step"] <= step:
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))

    @staticmethod
    def _start_wandb(out_dir: Path, config: Dict[str, Any], wandb_cfg, mode: str):
        import wandb

        wandb_dir = out_dir / "wandb"
        wandb_dir.mkdir(parents=True, exist_ok=True)
        id_file = wandb_dir / "run_id"
        if not id_file.is_file():
            id_file.write_text(secrets.token_hex(4))
        run = wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, name=wandb_cfg.name,
                         tags=list(wandb_cfg.tags) or None, dir=str(out_dir), mode=mode, config=config,
                         id=id_file.read_text().strip(), resume="allow", settings=wandb.Settings(console="off"))
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        return run

    def log(self, record: Dict[str, Any], eta_s: Optional[float] = None, console: bool = True,
            router_biases: Optional[List[torch.Tensor]] = None) -> None:
        """Append `record` to metrics.jsonl, send it to W&B (with `router_biases`, at validation steps,
        also the figures and the bias histogram in the same row), and print a console line."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.run is not None:
            row = {k: v for k, v in record.items() if not isinstance(v, list)}
            if router_biases is not None:
                row.update(self._media(router_biases))
            self.run.log(row)
        if console:
            print(console_line(record, self.total_steps, eta_s), flush=True)

    def _media(self, router_biases: List[torch.Tensor]) -> Dict[str, Any]:
        """The figures of training/plot.py (from metrics.jsonl so far) and a histogram of the router
        biases (`e_score_correction_bias` of every MoE layer given), as W&B media."""
        import matplotlib.pyplot as plt
        import wandb

        from .plot import figures, read_records

        media: Dict[str, Any] = {}
        for name, fig in figures(read_records(self.path)).items():
            media[f"plots/{name}"] = wandb.Image(fig)
            plt.close(fig)
        if router_biases:
            media["router_bias"] = wandb.Histogram(torch.cat([b.detach().float().cpu().flatten()
                                                              for b in router_biases]).numpy())
        return media

    def log_checkpoint(self, path: Path) -> None:
        """With `logging.wandb.artifacts`: the checkpoint folder `.../step_<N>` as a W&B artifact of type
        "model" (one artifact per run, a version per checkpoint, aliases step_<N> and latest)."""
        if self.run is None or not self.artifacts:
            return
        import wandb

        artifact = wandb.Artifact(f"checkpoint-{self.run.id}", type="model", metadata={"checkpoint": path.name})
        artifact.add_dir(str(path))
        self.run.log_artifact(artifact, aliases=[path.name, "latest"])

    def log_files(self, paths: List[Path]) -> None:
        """Name new files under out_dir (profiler traces) on the console and upload them to the W&B run."""
        if paths:
            self.print(f"written: {', '.join(str(p) for p in paths)}")
        if self.run is not None:
            for path in paths:
                self.run.save(str(path), base_path=str(self.path.parent), policy="now")

    def print(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
