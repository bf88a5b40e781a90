"""The training loop: build everything from a validated config, resume, train, validate, checkpoint.

Per step: take the global batch of the batch-size schedule (this rank's rows, built one step ahead
in a worker thread and copied from pinned memory: training/prefetch.py), split it into
micro-batches, set LR / λ / γ from tokens seen, run `step.train_step`; then, when due, validation
(`eval.every`), a metrics record (`logging.every`, every skipped step, every validation) and a
checkpoint (`checkpoint.every` steps, `checkpoint.every_minutes` of wall time; synchronous or in
the background, training/checkpointer.py). SIGTERM / SIGINT / `checkpoint.signal` (a scheduler's
preemption notice) finish the current step, save a checkpoint, wait for it and return normally;
`train.max_skipped_in_row` non-finite steps in a row save a checkpoint and raise `TrainingError`.
Every decision that ends in a collective (stop, save by time) is all-reduced first, so all ranks
take it at the same step. Resume restores model, optimizer, counters, data position and RNG, so a
resumed run repeats the uninterrupted one bit for bit; the checkpoint is chosen by rank 0 and its
saved config compared with the new one (training/run_config.py).
"""
from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from model.config import ModelConfig
from model.flops import flops_per_token
from parallel.expert_parallel import shard_expert_state

from . import checkpoint
from .build import build_rank, expert_parallel, optimizer_factory, parallel_layout, pipeline_parallel
from .checkpointer import Checkpointer
from .ema import EMA
from .config import ConfigError, batch_unit, data_parallel_size, micro_batch_size, resolve_path
from .distributed import Dist
from .hardware import memory_metrics, peak_tflops
from .init_from import load_initial_weights
from .inputs import Inputs, train_batches
from .metrics import MetricsLogger, layer_records
from .optim import set_lr
from .profile import StepProfiler
from .prefetch import BatchPrefetcher
from .schedule import Schedules
from .step import StepResult, parallel_train_step, parallel_validate, train_step, validate


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row); a checkpoint was saved."""


@dataclass
class Progress:
    step: int = 0
    tokens: int = 0
    skipped_steps: int = 0
    skipped_in_row: int = 0
    elapsed: float = 0.0


class StopSignal:
    """SIGTERM / SIGINT / `preemption` (a signal name, or None) set a flag that the loop checks after
    each step; a second SIGINT interrupts."""

    def __init__(self, preemption: Optional[str] = None) -> None:
        self.signum: Optional[int] = None
        signals = [signal.SIGTERM, signal.SIGINT] + ([signal.Signals[preemption]] if preemption else [])
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast for bf16 and fp8 (FP8 GEMMs live inside the model), nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def peak_flops(cfg: DictConfig, device: torch.device) -> Optional[float]:
    """Per-device dense peak FLOP/s in the run's precision for MFU (training/hardware.py; None for a
    GPU missing from its table when train.peak_tflops is not set)."""
    tflops = peak_tflops(device, cfg.precision.name, cfg.train.peak_tflops)
    return tflops * 1e12 if tflops is not None else None


class Trainer:
    def __init__(self, cfg: DictConfig, mcfg: ModelConfig, dist: Dist, inputs: Inputs):
        from data.dataset import shard_stats

        self.cfg, self.mcfg, self.dist, self.inputs = cfg, mcfg, dist, inputs
        self.out_dir = resolve_path(cfg.out_dir, Path.cwd())
        self.dp = data_parallel_size(cfg, dist.world)
        layout = parallel_layout(cfg, mcfg, dist.device, self.dp)
        rank = build_rank(cfg, mcfg, dist.device, layout)
        self.model = rank.model
        self.initialized_from: Optional[Path] = None
        self.init_from_skipped = bool(cfg.init_from) and bool(checkpoint.list_checkpoints(self.out_dir / "checkpoints"))
        if cfg.init_from and not self.init_from_skipped:
            self.initialized_from = load_initial_weights(rank, resolve_path(cfg.init_from, Path.cwd()), mcfg, layout)
        self.ep = expert_parallel(self.model, cfg, layout)
        make_optimizer = optimizer_factory(cfg)
        self.par = pipeline_parallel(self.model, cfg, layout, make_optimizer, self.dp)
        self.optimizer = self.par.optimizer if self.par else make_optimizer(self.model.named_parameters())
        self.micro_batch = micro_batch_size(cfg, self.dp)
        self.schedules = Schedules(cfg.optim, cfg.train, batch_unit(cfg, self.dp))
        self.batches = BatchPrefetcher(train_batches(cfg, inputs, dp_rank=self.par.replica if self.par else dist.rank,
                                                     dp_world=self.dp), dist.device)
        self.bytes_per_token = shard_stats(inputs.val_dir)["bytes_per_token"]
        self.autocast = autocast_for(cfg.precision.name, dist.device)
        self.flops_per_token = flops_per_token(mcfg, cfg.train.seq_len)
        peak = peak_flops(cfg, dist.device)
        self.peak = peak * dist.world if peak is not None else None
        self.progress = Progress()
        module = self.par.module if self.par is not None else self.model
        self.ema = EMA(module.named_parameters(remove_duplicate=False), cfg.train.ema_decay) \
            if cfg.train.ema_decay else None
        asynchronous = cfg.checkpoint["async"]
        self.checkpointer = Checkpointer(
            self.out_dir, cfg.checkpoint.keep,
            asynchronous=dist.device.type == "cuda" if asynchronous is None else asynchronous,
            pin_memory=dist.device.type == "cuda", group=dist.checkpoint_group,
            on_saved=self._saved)
        self.logger: Optional[MetricsLogger] = None

    def describe_optimizer(self) -> str:
        """What steps the weights, e.g. "CPUAdamW (DeepSpeedCPUAdam), fp32 master weights in host memory,
        sharded (ZeRO-1)" (printed by train.py)."""
        zero = self.par.zero if self.par is not None else None
        inner = zero.optimizer if zero is not None else self.optimizer
        text = type(inner).__name__ + (f" ({type(inner.kernel).__name__})" if hasattr(inner, "kernel") else "")
        if zero is None:
            return text
        where = "host" if zero.offload else self.dist.device.type
        return f"{text}, fp32 master weights in {where} memory, {'sharded (ZeRO-1)' if zero.shard else 'unsharded'}"

    # ----------------------------------------------------------------- checkpoints
    def _saved(self, path: Path, seconds: float) -> None:
        """A checkpoint is complete (maybe in the background): say so, and make it a W&B artifact."""
        if self.dist.is_main:
            print(f"checkpoint saved: {path} ({seconds:.2f} s)", flush=True)
            if self.logger is not None:
                self.logger.log_checkpoint(path)

    def _state(self) -> Dict[str, Any]:
        if self.par is not None:
            state = self.par.checkpoint_state()
        else:
            state = {"model": self.model.state_dict(), "optim": self.optimizer.state_dict()}
            state = self.ep.checkpoint_state(state) if self.ep else state
        if self.ema is not None:
            layout = self.par.layout if self.par is not None else self.ep.layout if self.ep else None
            ema = {"ema": self.ema.state_dict()}
            state.update(shard_expert_state(ema, layout) if layout is not None else ema)
        return state

    def save(self) -> None:
        """Checkpoint the current step (see Checkpointer: possibly still being written on return)."""
        p = self.progress
        train = {"step": torch.tensor(p.step), "tokens": torch.tensor(p.tokens),
                 "skipped_steps": torch.tensor(p.skipped_steps), "skipped_in_row": torch.tensor(p.skipped_in_row),
                 "elapsed": torch.tensor(p.elapsed, dtype=torch.float64), "rng_cpu": torch.get_rng_state(),
                 "data": checkpoint.json_tensor(self.batches.state_dict())}
        if self.dist.device.type == "cuda":
            train["rng_cuda"] = torch.cuda.get_rng_state(self.dist.device)
        meta = {**asdict(p), "lr": self.schedules.lr(p.tokens), "mtp_lambda": self.schedules.mtp_lambda(p.tokens),
                "bias_gamma": self.schedules.bias_gamma(p.tokens), "data": self.batches.state_dict(),
                "world": self.dist.world, "config": OmegaConf.to_container(self.cfg, resolve=True)}
        self.checkpointer.save(p.step, {**self._state(), "train": train}, self.mcfg.to_dict(), meta)

    def _check_config(self) -> None:
        """Rank 0 compares the newest checkpoint's config with this one; all ranks raise or go on."""
        from .run_config import check_resume

        verdict = None
        if self.dist.is_main:
            saved = checkpoint.newest_meta(self.out_dir)
            if saved is not None and "config" in saved:
                try:
                    verdict = ("warning", check_resume(saved["config"], OmegaConf.to_container(self.cfg, resolve=True),
                                                       checkpoint.step_dir(self.out_dir, saved["step"])))
                except ConfigError as err:
                    verdict = ("error", str(err))
        verdict = checkpoint.broadcast_object(verdict, self.dist.checkpoint_group)
        if verdict and verdict[0] == "error":
            raise ConfigError(verdict[1])
        if verdict and verdict[1] and self.dist.is_main:
            print(verdict[1], flush=True)

    def resume(self) -> Optional[Path]:
        """Load the newest loadable checkpoint (rank 0 chooses); None when starting from scratch."""
        self._check_config()
        state = self._state()
        found = checkpoint.load_latest(self.out_dir, state, self.dist.checkpoint_group, optional=("ema",))
        if found is None:
            return None
        path, train = found
        if self.par is not None:
            self.par.load_checkpoint_state(state)
        else:
            state = self.ep.local_state(state) if self.ep else state
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optim"])
        self.progress = Progress(step=int(train["step"]), tokens=int(train["tokens"]),
                                 skipped_steps=int(train["skipped_steps"]),
                                 skipped_in_row=int(train["skipped_in_row"]), elapsed=float(train["elapsed"]))
        self.batches.load_state_dict(checkpoint.tensor_json(train["data"]))
        torch.set_rng_state(train["rng_cpu"])
        if "rng_cuda" in train and self.dist.device.type == "cuda":
            torch.cuda.set_rng_state(train["rng_cuda"], self.dist.device)
        if self.ema is not None and "ema" not in state:
            self.ema.reset()
            if self.dist.is_main:
                print(f"warning: {path} holds no EMA weights; the EMA restarts from its weights", flush=True)
        return path

    # ----------------------------------------------------------------- one step
    def _next_rows(self) -> torch.Tensor:
        """This step's rows on the device; starts building the next step's in the background."""
        p, s, seq_len = self.progress, self.schedules, self.cfg.train.seq_len
        batch = s.batch_size(p.tokens)
        rows = self.batches.take(batch)
        if p.step + 1 < self.cfg.train.steps:
            self.batches.ahead(s.batch_size(p.tokens + batch * seq_len))
        return rows

    def step(self, rows: Optional[torch.Tensor] = None) -> StepResult:
        """One optimizer step on `rows` (default: the next global batch; no logging, validation or
        checkpoint)."""
        cfg, p, s = self.cfg, self.progress, self.schedules
        rows = self._next_rows() if rows is None else rows
        batch = s.batch_size(p.tokens)  # the global batch (rows are this rank's share of it)
        set_lr(self.optimizer, s.lr(p.tokens + batch * cfg.train.seq_len))
        if self.par is not None:
            result = parallel_train_step(self.par, rows, mtp_lambda=s.mtp_lambda(p.tokens),
                                         gamma=s.bias_gamma(p.tokens), alpha=self.mcfg.aux_loss_alpha,
                                         grad_clip=cfg.optim.grad_clip, autocast=self.autocast, ep=self.ep)
        else:
            result = train_step(self.model, self.optimizer, list(rows.split(self.micro_batch)),
                                mtp_lambda=s.mtp_lambda(p.tokens), gamma=s.bias_gamma(p.tokens),
                                alpha=self.mcfg.aux_loss_alpha, grad_clip=cfg.optim.grad_clip,
                                autocast=self.autocast, dist=self.dist, ep=self.ep)
        if self.ema is not None and not result.skipped:
            self.ema.update()
        p.step += 1
        p.tokens += batch * cfg.train.seq_len
        p.skipped_steps += result.skipped
        p.skipped_in_row = p.skipped_in_row + 1 if result.skipped else 0
        return result

    def _validate(self) -> Dict[str, float]:
        from data.dataset import eval_batches

        e = self.cfg.eval
        batches = eval_batches(self.inputs.val_dir, self.cfg.train.seq_len, e.batch_size, max_batches=e.batches,
                               eos_id=self.inputs.tokenizer.eos_id)
        if self.par is not None:
            val_loss, val_bpb = parallel_validate(self.par, batches, self.bytes_per_token, autocast=self.autocast)
        else:
            val_loss, val_bpb = validate(self.model, batches, self.bytes_per_token, autocast=self.autocast,
                                         dist=self.dist)
        return {"val_loss": val_loss, "val_bpb": val_bpb}

    def _memory(self) -> Dict[str, float]:
        """Memory figures of training/hardware.py, max over ranks."""
        mem = memory_metrics(self.dist.device)
        values = torch.tensor(list(mem.values()), dtype=torch.float64, device=self.dist.device)
        self.dist.all_reduce_(values, op=torch.distributed.ReduceOp.MAX)
        return dict(zip(mem, values.tolist()))

    def _router_biases(self):
        """The router bias of each MoE layer of this rank."""
        return [m.gate.e_score_correction_bias for m in (self.par or self.model).moe_layers()]

    def _stop_or_save_by_time(self, stop: StopSignal, last_save: float) -> Tuple[bool, bool]:
        """(a stop signal arrived on some rank, `checkpoint.every_minutes` have passed on some rank)."""
        minutes = self.cfg.checkpoint.every_minutes
        due = bool(minutes) and time.monotonic() - last_save >= 60 * minutes
        flags = torch.tensor([float(stop.signum is not None), float(due)], device=self.dist.device)
        flags = self.dist.all_reduce_(flags, op=torch.distributed.ReduceOp.MAX).tolist()
        return bool(flags[0]), bool(flags[1])

    # ----------------------------------------------------------------- the loop
    def run(self) -> Dict[str, Any]:
        """Train to `train.steps` (or until stopped); returns the last metrics record."""
        cfg, p, total = self.cfg, self.progress, self.cfg.train.steps
        logger = MetricsLogger(self.out_dir, OmegaConf.to_container(cfg, resolve=True), cfg.logging.wandb,
                               total, p.step, enabled=self.dist.is_main)
        if p.step >= total:
            logger.print(f"nothing to do: {self.out_dir} already holds step {p.step} of train.steps={total}")
        self.logger = logger
        stop = StopSignal(cfg.checkpoint.signal)
        profiler = StepProfiler(cfg.profile.steps, self.out_dir, self.dist.rank, self.dist.device)
        last_save = time.monotonic()
        last: Dict[str, Any] = {}
        window_tokens, window_time, window_steps = 0, 0.0, 0
        try:
            while p.step < total:
                rows = self._next_rows()
                t0 = time.perf_counter()
                tokens_before = p.tokens
                profiler.before_step(p.step + 1)
                result = self.step(rows)
                dt = time.perf_counter() - t0
                logger.log_files(profiler.after_step(p.step))
                window_tokens, window_time, window_steps = (window_tokens + p.tokens - tokens_before,
                                                            window_time + dt, window_steps + 1)
                record: Dict[str, Any] = {}
                if (cfg.eval.every and p.step % cfg.eval.every == 0) or p.step == total:
                    record.update(self._validate())
                if record or result.skipped or p.step % cfg.logging.every == 0 or p.step == total:
                    tokens_per_s = window_tokens / max(window_time, 1e-9)
                    record = {"step": p.step, "tokens": p.tokens, "loss": result.loss, "mtp_loss": result.mtp_loss,
                              "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": result.grad_norm,
                              "tokens_per_s": tokens_per_s,
                              "mfu": tokens_per_s * self.flops_per_token / self.peak if self.peak else None,
                              "maxvio": result.maxvio, "time": p.elapsed + time.perf_counter() - t0,
                              "skipped_steps": p.skipped_steps, "balance_loss": result.balance_loss,
                              **self._memory(), **result.traffic,
                              **layer_records(result.load if self.par is None else self.par.layer_load(result.load)),
                              **record}
                    if result.skipped:
                        record["skipped"] = True
                        logger.print(f"warning: step {p.step} skipped: loss {result.loss}, grad_norm "
                                     f"{result.grad_norm} ({p.skipped_in_row} in a row)")
                    logger.log(record, eta_s=(total - p.step) * window_time / window_steps,
                               router_biases=self._router_biases() if "val_loss" in record else None)
                    last = record
                    window_tokens, window_time, window_steps = 0, 0.0, 0
                p.elapsed += time.perf_counter() - t0
                stopping, by_time = self._stop_or_save_by_time(stop, last_save)
                too_many = p.skipped_in_row >= cfg.train.max_skipped_in_row
                if (cfg.checkpoint.every and p.step % cfg.checkpoint.every == 0) or p.step == total \
                        or stopping or too_many or by_time:
                    self.save()
                    last_save = time.monotonic()
                if too_many or stopping:
                    self.checkpointer.wait()
                if too_many:
                    raise TrainingError(f"stopped at step {p.step}: {p.skipped_in_row} steps in a row had a "
                                        f"non-finite loss or gradient norm (train.max_skipped_in_row="
                                        f"{cfg.train.max_skipped_in_row}); checkpoint saved in {self.out_dir}")
                if stopping:
                    logger.print(f"stopped by signal {signal.Signals(stop.signum).name} after step {p.step}; resume by running "
                                 f"the same command again")
                    break
            self.checkpointer.close()
            if self.ema is not None:
                self.ema.close()
        finally:
            logger.log_files(profiler.close())
            stop.restore()
            self.logger = None
            logger.close()
            self.batches.close()
        return last
