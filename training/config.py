"""Structured configuration of a training job: dataclasses registered in Hydra's ConfigStore.

`configs/train.yaml` starts from the `job_schema` node defined here, so every group file and every
command-line override is merged into a typed node: a misspelt key (`train.stepz=3`) or a wrong type
fails at composition. `validate` then checks the settings that depend on each other (batch sizes vs
data-parallel size, seq_len vs max_position_embeddings, parallel layout, schedule fractions) before
anything is computed or written, raising `ConfigError` with a message naming the settings.

The optimizer and schedule defaults follow DeepSeek-V3 section 4.2: AdamW (0.9, 0.95), weight decay
0.1, clip 1.0; the learning rate warms up, stays constant until 10T of 14.8T tokens (0.676), decays
by cosine to 0.1x until 14.3T (0.966), stays there until 14.633T (0.989) and ends at 1/30 of the peak;
MTP weight 0.3 then 0.1 after 10T tokens; bias update speed 0.001 then 0 for the last 500B tokens.
"""
from __future__ import annotations

import importlib.util
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from model.config import ModelConfig
from parallel.mesh import check_layout

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
REPO_ROOT = CONFIG_DIR.parent
PRECISIONS = ("bf16", "fp8", "fp32")
FP8_BACKENDS = ("auto", "triton", "reference")
DISPATCHERS = ("flat", "hierarchical")
SCHEDULES = ("1f1b", "interleaved_1f1b", "zbv", "dualpipev")
WANDB_MODES = ("auto", "online", "offline", "disabled")
DATA_KINDS = ("stdlib", "shards")
DEVICES = ("auto", "cpu", "cuda")
# Signals checkpoint.signal cannot be: uncatchable, already stopping the run, or not a notice.
NOT_PREEMPTION_SIGNALS = ("SIGKILL", "SIGSTOP", "SIGTERM", "SIGINT", "SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL",
                          "SIGABRT", "SIGCHLD", "SIGPIPE")
PARAM_DTYPES = ("fp32", "bf16")
OFFLOADS = ("none", "cpu")


class ConfigError(ValueError):
    """A setting (or a combination of settings) that cannot run; the message names them."""


@dataclass
class PrecisionConfig:
    """`precision=bf16|fp8|fp32`: bf16 autocast, FP8 GEMMs (model.fp8), or plain fp32.

    `fused_head_loss`: output head + cross-entropy without keeping logits for backward
    (model/head_loss.py; on in configs/precision/fp8.yaml).

    `param_dtype`: dtype of the model's parameters. bf16 (DeepSeek-V3 section 3.3.2): fp32 master
    weights live only in the optimizer (ZeRO-1-sharded when parallel.zero=true) and weight gradients
    are accumulated in fp32 (parallel/data_parallel.py); needs precision=bf16 or fp8.

    `fp8_backend` (fp8 only): auto (Triton kernels on a GPU, an error naming the GPU and the cause
    where they cannot run), triton, reference (kernels/ops.py)."""
    name: str = "bf16"
    fused_head_loss: bool = False
    param_dtype: str = "fp32"
    fp8_backend: str = "auto"


@dataclass
class ParallelConfig:
    """Process layout: world = pp x dp x ep; dp is derived from the world size when left null.

    gpus_per_node null: $LOCAL_WORLD_SIZE (torchrun). dispatcher null: hierarchical when the EP group
    spans several nodes, else flat (rules in parallel/mesh.py). Pipeline (pp > 1): `schedule`,
    `stages_per_rank` (null: 1 for 1f1b, 2 otherwise), `layers_per_stage` (null: even split; rules in
    parallel/pipeline_stages.py). `zero`: ZeRO-1 optimizer-state sharding (parallel/data_parallel.py);
    null: on when more than one rank splits the batch (dp x ep > 1), as DeepSeek-V3 trains (section 3.2).
    `timeout_s`: a collective that waits longer (a rank died or hangs) fails with an error.
    `overlap` (schedule=dualpipev): the forward and backward chunks of each overlapped action
    interleave at the MoE layers' dispatch and combine (parallel/pipeline_overlap.py); false runs
    them one after the other. Results are bitwise the same.
    """
    pp: int = 1
    dp: Optional[int] = None
    ep: int = 1
    gpus_per_node: Optional[int] = None
    dispatcher: Optional[str] = None
    schedule: str = "1f1b"
    stages_per_rank: Optional[int] = None
    layers_per_stage: Optional[List[int]] = None
    zero: Optional[bool] = None
    timeout_s: float = 600.0
    overlap: bool = True


@dataclass
class DataConfig:
    """`data=stdlib` (built-in corpus, prepared under cache_dir) or `data=shards` (prepared shards).

    `shuffle_tokens`: training sequences are served in a random order within blocks of this many
    tokens of the packed stream (0: stream order); see training/shuffle.py.
    """
    name: str = "stdlib"
    cache_dir: str = "${cache_dir}/data"
    train_dir: Optional[str] = None
    val_dir: Optional[str] = None
    tokenizer: Optional[str] = None
    val_fraction: float = 0.05
    fim_rate: float = 0.1
    split_rate: float = 0.0
    shuffle_tokens: int = 1 << 20


@dataclass
class OptimConfig:
    """AdamW with fp32 master weights and `moments_dtype` moments; LR schedule as fractions of tokens.

    `offload=cpu`: each rank's (ZeRO-1 shard of the) fp32 master weights and both moments live in host
    memory and DeepSpeed's CPU Adam steps them (training/cpu_adam.py); its moments are fp32, so
    it needs moments_dtype=fp32. `none`: the optimizer state stays on the training device."""
    lr: float = 2.2e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    grad_clip: float = 1.0
    moments_dtype: str = "bf16"
    offload: str = "none"
    warmup_frac: float = 0.01
    decay_start_frac: float = 0.676
    decay_end_frac: float = 0.966
    min_lr_ratio: float = 0.1
    final_start_frac: float = 0.989
    final_lr_ratio: float = 0.0333


@dataclass
class TrainConfig:
    """Run length, batch shape and the token-based schedules of the MTP weight and bias update speed.

    `global_batch` sequences make one optimizer step; each data-parallel rank (dp x ep of them) gets
    global_batch / (dp x ep) and runs them `micro_batch` at a time, accumulating gradients in
    between. `micro_batch` null: no accumulation, each rank runs its whole share in one forward.

    `peak_tflops` (dense TFLOP/s of one device) is the MFU denominator; null: the device's figure in
    the run's precision from training/hardware.py (H100, H200, H800, B200, GB200; on CPU a measured
    matmul rate per thread). `deterministic`: deterministic algorithms (README, "Exactness").

    `ema_decay` > 0 keeps an exponential moving average of the weights in CPU memory, updated after
    each step off the training path and saved in checkpoints (training/ema.py); 0 turns it off.
    """
    steps: int = 1000
    seq_len: int = 256
    global_batch: int = 16
    micro_batch: Optional[int] = None
    batch_ramp_start: int = 0
    batch_ramp_frac: float = 0.0
    mtp_lambda: float = 0.3
    mtp_lambda_tail: float = 0.1
    mtp_lambda_switch_frac: float = 0.676
    bias_gamma: float = 0.001
    bias_gamma_tail: float = 0.0
    bias_gamma_switch_frac: float = 0.966
    max_skipped_in_row: int = 5
    peak_tflops: Optional[float] = None
    device: str = "auto"
    ema_decay: float = 0.0
    deterministic: bool = False


@dataclass
class WandbConfig:
    """`mode=auto`: WANDB_MODE if set, else online when an API key is present, else offline."""
    mode: str = "auto"
    project: str = "moeforge"
    entity: Optional[str] = None
    name: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    artifacts: bool = False  # every saved checkpoint also becomes a W&B artifact (type "model")


@dataclass
class LoggingConfig:
    every: int = 10
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class EvalConfig:
    """Validation every `every` steps (0: only at the end) over `batches` batches of `batch_size`."""
    every: int = 100
    batches: int = 8
    batch_size: int = 8


def _keyword_field(cls, name: str, python_name: str):
    """Expose dataclass field `python_name` to OmegaConf/Hydra as `name`, a Python keyword (`async`)."""
    f = cls.__dataclass_fields__.pop(python_name)
    f.name = name
    cls.__dataclass_fields__[name] = f
    cls.__annotations__[name] = cls.__annotations__.pop(python_name)
    setattr(cls, name, property(lambda self: getattr(self, python_name)))
    return cls


@dataclass
class CheckpointConfig:
    """A checkpoint every `every` steps and every `every_minutes` of wall time (0: off for either),
    at the end, on SIGTERM/SIGINT and on `signal` (a scheduler's preemption notice, e.g. Slurm's
    `--signal=USR1@120`; null: none), which then stops the run; the newest `keep` are kept.
    `async` (read as cfg.checkpoint["async"]): write in the background after staging the state in
    host memory (training/checkpointer.py); null: on with CUDA, off on CPU."""
    every: int = 100
    keep: int = 2
    every_minutes: float = 0.0
    signal: Optional[str] = "SIGUSR1"
    async_: Optional[bool] = None


_keyword_field(CheckpointConfig, "async", "async_")


@dataclass
class ProfileConfig:
    """`steps: "A:B"`: torch.profiler trace (and a CUDA memory snapshot) of steps A to B-1 (training/profile.py)."""
    steps: Optional[str] = None


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    seed: int = 0
    out_dir: str = "outputs/train"
    init_from: Optional[str] = None
    cache_dir: str = ".cache"


def register() -> None:
    """Put the schema in Hydra's ConfigStore (idempotent)."""
    ConfigStore.instance().store(name="job_schema", node=JobConfig)


def compose_job(overrides: List[str]) -> DictConfig:
    """Compose `configs/train.yaml` with command-line style overrides; Hydra errors propagate."""
    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None, job_name="train"):
        return compose(config_name="train", overrides=list(overrides))


def model_config(cfg: DictConfig) -> ModelConfig:
    """The validated ModelConfig of the job (ModelConfig raises ValueError naming the field)."""
    return ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))


def resolve_path(path: str, base: Path) -> Path:
    """`path` as given if absolute (or ~), else relative to `base`."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p


def data_parallel_size(cfg: DictConfig, world_size: int) -> int:
    """Ranks that split the global batch: dp x ep = world / pp (each EP rank routes its own tokens);
    dp = world / (pp x ep) is checked against `parallel.dp` when that is set."""
    par = cfg.parallel
    if par.pp < 1 or par.ep < 1:
        raise ConfigError(f"parallel.pp ({par.pp}) and parallel.ep ({par.ep}) must be >= 1")
    if world_size % (par.pp * par.ep):
        raise ConfigError(f"world size {world_size} is not a multiple of parallel.pp x parallel.ep = "
                          f"{par.pp} x {par.ep}")
    dp = world_size // (par.pp * par.ep)
    if par.dp is not None and par.dp != dp:
        raise ConfigError(f"parallel.dp={par.dp} but world size {world_size} / (parallel.pp x parallel.ep = "
                          f"{par.pp} x {par.ep}) gives dp={dp}; leave parallel.dp=null to derive it")
    return dp * par.ep


def micro_batch_size(cfg: DictConfig, dp: int) -> int:
    """Sequences per forward pass on each rank: `train.micro_batch`, or when it is null the rank's
    whole share of the global batch, train.global_batch / `dp` (no gradient accumulation)."""
    t = cfg.train
    return t.micro_batch if t.micro_batch is not None else t.global_batch // dp


def batch_unit(cfg: DictConfig, dp: int) -> int:
    """What every step's global batch is a multiple of (batch-ramp sizes are rounded down to it):
    train.micro_batch x `dp`, or `dp` when train.micro_batch is null."""
    t = cfg.train
    return (t.micro_batch if t.micro_batch is not None else 1) * dp


def _check_choice(value: str, allowed: tuple, name: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of {', '.join(allowed)}")


def _check_parallel(cfg: DictConfig, world_size: int, mcfg: ModelConfig) -> None:
    par = cfg.parallel
    if par.dispatcher is not None:
        _check_choice(par.dispatcher, DISPATCHERS, "parallel.dispatcher")
    _check_choice(par.schedule, SCHEDULES, "parallel.schedule")
    if min(par.pp, par.ep) < 1 or (par.gpus_per_node is not None and par.gpus_per_node < 1):
        raise ConfigError(f"parallel.pp ({par.pp}), parallel.ep ({par.ep}) and parallel.gpus_per_node "
                          f"({par.gpus_per_node}) must be >= 1")
    if mcfg.n_routed_experts % par.ep:
        raise ConfigError(f"model.n_routed_experts ({mcfg.n_routed_experts}) must be divisible by "
                          f"parallel.ep ({par.ep})")
    dp = data_parallel_size(cfg, world_size)
    if par.pp > 1:
        _check_pipeline(cfg, dp, mcfg)
    try:
        check_layout(world_size, pp=par.pp, dp=par.dp, ep=par.ep, gpus_per_node=par.gpus_per_node,
                     dispatcher=par.dispatcher, n_routed_experts=mcfg.n_routed_experts, n_group=mcfg.n_group)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _check_pipeline(cfg: DictConfig, dp: int, mcfg: ModelConfig) -> None:
    """Schedule, stage layout and micro-batch count of a pipeline job (parallel/pipeline_*.py rules)."""
    from parallel.pipeline_schedules import check_microbatches
    from parallel.pipeline_stages import check_schedule, split_layers

    par, t = cfg.parallel, cfg.train
    if t.batch_ramp_start:
        raise ConfigError("parallel.pp > 1 runs a fixed number of micro-batches per step; set "
                          f"train.batch_ramp_start=0 (got {t.batch_ramp_start})")
    if t.global_batch % batch_unit(cfg, dp):
        return  # reported by _check_train with the batch settings
    micro = micro_batch_size(cfg, dp)
    layers = OmegaConf.to_container(par.layers_per_stage) if par.layers_per_stage is not None else None
    try:
        spr = check_schedule(par.schedule, par.pp, par.stages_per_rank)
        check_microbatches(par.schedule, par.pp, spr, t.global_batch // (micro * dp))
        split_layers(mcfg.num_hidden_layers, par.pp * spr, layers)
    except ValueError as err:
        hint = "; train.micro_batch is null (one micro-batch per rank): set it" if t.micro_batch is None else ""
        raise ConfigError(f"{err}{hint}") from None


def _world_sizes(cfg: DictConfig, most: int = 8) -> List[int]:
    """The first `most` world sizes whose data-parallel size divides train.global_batch (what a
    restart with fewer or more processes may use)."""
    par, t = cfg.parallel, cfg.train
    step = par.pp * par.ep
    found = [w for w in range(step, t.global_batch * par.pp + 1, step)
             if t.global_batch % ((t.micro_batch or 1) * (w // par.pp)) == 0]
    return found[:most]


def _check_train(cfg: DictConfig, dp: int, mcfg: ModelConfig) -> None:
    t = cfg.train
    for name in ("steps", "seq_len", "global_batch", "micro_batch", "max_skipped_in_row"):
        if t[name] is not None and t[name] < 1:
            raise ConfigError(f"train.{name} must be >= 1, got {t[name]}")
    if t.seq_len > mcfg.max_position_embeddings:
        raise ConfigError(f"train.seq_len ({t.seq_len}) exceeds model.max_position_embeddings "
                          f"({mcfg.max_position_embeddings})")
    if t.seq_len <= mcfg.num_nextn_predict_layers:
        raise ConfigError(f"train.seq_len ({t.seq_len}) must exceed model.num_nextn_predict_layers "
                          f"({mcfg.num_nextn_predict_layers})")
    unit = batch_unit(cfg, dp)
    if t.micro_batch is None:
        unit_name = f"the data-parallel size {dp} (world size / parallel.pp; train.micro_batch is null)"
        share = f", since each rank runs global_batch / {dp} sequences in one forward"
    else:
        unit_name = f"train.micro_batch x data-parallel size = {t.micro_batch} x {dp} = {unit}"
        share = ""
    if t.global_batch % unit:
        raise ConfigError(f"train.global_batch ({t.global_batch}) must be a multiple of {unit_name}{share}; "
                          f"world sizes that divide it: {', '.join(map(str, _world_sizes(cfg)))}")
    if t.batch_ramp_start and not unit <= t.batch_ramp_start <= t.global_batch:
        raise ConfigError(f"train.batch_ramp_start ({t.batch_ramp_start}) must be 0 (no ramp) or between "
                          f"{unit_name} and train.global_batch ({t.global_batch})")
    for name in ("batch_ramp_frac", "mtp_lambda_switch_frac", "bias_gamma_switch_frac"):
        if not 0.0 <= t[name] <= 1.0:
            raise ConfigError(f"train.{name} must be in [0, 1], got {t[name]}")
    if t.peak_tflops is not None and t.peak_tflops <= 0:
        raise ConfigError(f"train.peak_tflops must be > 0 or null, got {t.peak_tflops}")
    _check_choice(t.device, DEVICES, "train.device")


def _check_optim(cfg: DictConfig) -> None:
    o = cfg.optim
    if o.lr <= 0 or o.eps <= 0 or o.weight_decay < 0 or o.grad_clip < 0:
        raise ConfigError(f"optim.lr ({o.lr}) and optim.eps ({o.eps}) must be > 0, optim.weight_decay "
                          f"({o.weight_decay}) and optim.grad_clip ({o.grad_clip}) >= 0")
    if not (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1):
        raise ConfigError(f"optim.beta1 ({o.beta1}) and optim.beta2 ({o.beta2}) must be in [0, 1)")
    _check_choice(o.moments_dtype, ("bf16", "fp32"), "optim.moments_dtype")
    _check_choice(o.offload, OFFLOADS, "optim.offload")
    if o.offload == "cpu" and o.moments_dtype != "fp32":
        raise ConfigError("optim.offload=cpu keeps fp32 moments on the host (DeepSpeed's CPU Adam); set "
                          f"optim.moments_dtype=fp32 (got {o.moments_dtype})")
    names = ("warmup_frac", "decay_start_frac", "decay_end_frac", "final_start_frac")
    values = [o[n] for n in names]
    if not all(0.0 <= v <= 1.0 for v in values) or values != sorted(values):
        raise ConfigError("optim." + " <= optim.".join(names) + f" must be ordered within [0, 1], got {values}")
    if not (0 <= o.final_lr_ratio and 0 <= o.min_lr_ratio):
        raise ConfigError(f"optim.min_lr_ratio ({o.min_lr_ratio}) and optim.final_lr_ratio "
                          f"({o.final_lr_ratio}) must be >= 0")


def _check_io(cfg: DictConfig) -> None:
    from .profile import parse_steps

    parse_steps(cfg.profile.steps)
    if cfg.logging.every < 1:
        raise ConfigError(f"logging.every must be >= 1, got {cfg.logging.every}")
    _check_choice(cfg.logging.wandb.mode, WANDB_MODES, "logging.wandb.mode")
    if cfg.eval.every < 0 or cfg.eval.batches < 1 or cfg.eval.batch_size < 1:
        raise ConfigError(f"eval.every ({cfg.eval.every}) must be >= 0, eval.batches ({cfg.eval.batches}) "
                          f"and eval.batch_size ({cfg.eval.batch_size}) >= 1")
    c = cfg.checkpoint
    if c.every < 0 or c.keep < 1 or c.every_minutes < 0:
        raise ConfigError(f"checkpoint.every ({c.every}) and checkpoint.every_minutes ({c.every_minutes}) must "
                          f"be >= 0 and checkpoint.keep ({c.keep}) >= 1")
    if c.signal is not None:
        allowed = sorted(s.name for s in signal.Signals if s.name not in NOT_PREEMPTION_SIGNALS)
        _check_choice(c.signal, tuple(allowed), "checkpoint.signal")
    if cfg.parallel.timeout_s <= 0:
        raise ConfigError(f"parallel.timeout_s must be > 0, got {cfg.parallel.timeout_s}")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1) (0: no EMA), got {cfg.train.ema_decay}")
    if cfg.init_from is not None and not resolve_path(cfg.init_from, Path.cwd()).is_dir():
        raise ConfigError(f"init_from={cfg.init_from} is not a directory (a Hugging Face model directory or a "
                          f"checkpoint)")
    d = cfg.data
    _check_choice(d.name, DATA_KINDS, "data.name")
    if d.shuffle_tokens < 0:
        raise ConfigError(f"data.shuffle_tokens must be >= 0 (0: no shuffling), got {d.shuffle_tokens}")
    if not (0 <= d.fim_rate <= 1 and 0 <= d.split_rate <= 1 and 0 < d.val_fraction < 1):
        raise ConfigError(f"data.fim_rate ({d.fim_rate}) and data.split_rate ({d.split_rate}) must be in "
                          f"[0, 1], data.val_fraction ({d.val_fraction}) in (0, 1)")
    if d.name == "shards":
        for key in ("train_dir", "val_dir", "tokenizer"):
            if not d[key]:
                raise ConfigError(f"data=shards needs data.{key}=<path>")
            if not Path(d[key]).expanduser().exists():
                raise ConfigError(f"data.{key}={d[key]} does not exist")


def validate(cfg: DictConfig, world_size: int = 1) -> ModelConfig:
    """Check every setting and their combinations; returns the ModelConfig. Raises ConfigError."""
    try:
        mcfg = model_config(cfg)
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None
    _check_choice(cfg.precision.name, PRECISIONS, "precision")
    _check_choice(cfg.precision.param_dtype, PARAM_DTYPES, "precision.param_dtype")
    if cfg.precision.param_dtype == "bf16" and cfg.precision.name == "fp32":
        raise ConfigError("precision.param_dtype=bf16 needs bf16 compute: use precision=bf16 or precision=fp8 "
                          "(precision=fp32 runs without autocast)")
    _check_choice(cfg.precision.fp8_backend, FP8_BACKENDS, "precision.fp8_backend")
    if cfg.precision.name == "fp8" and importlib.util.find_spec("model.fp8") is None:
        raise ConfigError("precision=fp8 needs model/fp8.py (apply_fp8), which this checkout does not have; "
                          "use precision=bf16 or precision=fp32")
    _check_parallel(cfg, world_size, mcfg)
    _check_train(cfg, data_parallel_size(cfg, world_size), mcfg)
    _check_optim(cfg)
    _check_io(cfg)
    return mcfg
