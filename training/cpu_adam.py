"""AdamW on the CPU with DeepSpeed's `DeepSpeedCPUAdam` kernel, for `optim.offload=cpu`.

DeepSeek-V3 section 3.3.2 keeps fp32 master weights and the optimizer state per ZeRO-1 shard; with
offload that shard (fp32 master weights, fp32 first and second moments) lives in host memory and
DeepSpeed's SIMD C++ kernel (`adamw_mode=True`: decoupled weight decay) updates it.
`parallel.data_parallel.Zero1(offload=True)` moves the gradients to the host and the updated
weights back; this module only steps host tensors.

The kernel is a C++ extension that DeepSpeed compiles with the system's C++ compiler and ninja on
first use (about 90 s) into TORCH_EXTENSIONS_DIR, which defaults here to `.cache/torch_extensions`
in the repository, so tests, restarts and every rank reuse one build. DeepSpeed is imported only
when an offloaded optimizer is built. The state dict has the by-name format of `training.optim.AdamW`,
so a checkpoint written with offload resumes without it and the other way round.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from .optim import decay_groups, load_named_state_dict, named_state_dict

EXTENSIONS_DIR = Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"


class OffloadError(RuntimeError):
    """DeepSpeed's CPU Adam cannot be built or loaded; the message says what is missing."""


def load_cpu_adam_op():
    """DeepSpeed's `cpu_adam` extension, built once under TORCH_EXTENSIONS_DIR (default
    `.cache/torch_extensions` in the repository); `OffloadError` naming what is missing otherwise."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(EXTENSIONS_DIR))
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder
    except ImportError as err:
        raise OffloadError(f"optim.offload=cpu needs DeepSpeed ({err}); install it (pip install deepspeed) "
                           "or use optim.offload=none") from None
    try:
        return CPUAdamBuilder().load()
    except Exception as err:  # the builder raises many kinds; say which tool is missing when we can
        missing = [tool for tool in (os.environ.get("CXX", "c++"), "ninja") if shutil.which(tool) is None]
        cause = f"{', '.join(missing)} not found on PATH" if missing else str(err).strip().splitlines()[-1]
        raise OffloadError(f"optim.offload=cpu: building DeepSpeed's cpu_adam op into "
                           f"{os.environ['TORCH_EXTENSIONS_DIR']} failed ({cause}); it needs a C++ compiler "
                           "and ninja, or use optim.offload=none") from None


class CPUAdamW(torch.optim.Optimizer):
    """AdamW over named fp32 CPU tensors, stepped by DeepSpeed's `DeepSpeedCPUAdam` kernel (adamw_mode).

    Same hyper-parameters, weight-decay groups and state dict ({"step", "exp_avg", "exp_avg_sq"} by
    name, fp32 moments) as `training.optim.AdamW`. `step(before, after)` calls `before(p)` ahead of
    and `after(p)` behind each parameter's update (Zero1 waits for that gradient's copy to the host,
    then sends the updated weights back, overlapping both with the other parameters' updates). A
    torch Optimizer, so optimizer-step hooks (e.g. the FP8 weight cache of kernels/weights.py) run.
    """

    def __init__(self, named_params: Iterable[Tuple[str, nn.Parameter]], lr: float, betas=(0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.1, decay_embeddings: bool = False):
        named = [(n, p) for n, p in named_params if p.requires_grad]
        for n, p in named:
            if p.device.type != "cpu" or p.dtype != torch.float32:
                raise ValueError(f"CPUAdamW steps fp32 CPU tensors, {n} is {p.dtype} on {p.device}")
        load_cpu_adam_op()
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        self.names: Dict[nn.Parameter, str] = {p: n for n, p in named}
        groups = decay_groups(named, weight_decay, decay_embeddings)
        super().__init__(groups, {"lr": lr, "betas": tuple(betas), "eps": eps})
        # DeepSpeed's optimizer object owns the C++ optimizer instance (created and destroyed with it);
        # its kernel steps this optimizer's tensors with this optimizer's hyper-parameters.
        self.kernel = DeepSpeedCPUAdam([p for _, p in named] or [torch.zeros(1)], lr=lr, betas=tuple(betas),
                                       eps=eps, weight_decay=weight_decay, adamw_mode=True)
        self.step_count = torch.zeros((), dtype=torch.int64)
        for _, p in named:
            self.state[p].update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))

    @torch.no_grad()
    def step(self, closure=None, before: Optional[Callable[[torch.Tensor], None]] = None,
             after: Optional[Callable[[torch.Tensor], None]] = None) -> None:
        """One AdamW step of every parameter that has a gradient (DeepSpeed's kernel, fp32)."""
        if closure is not None:
            raise ValueError("CPUAdamW.step does not take a closure")
        self.step_count += 1
        n = int(self.step_count)
        kernel = self.kernel
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if before is not None:
                    before(p)
                state = self.state[p]
                if p.numel():
                    kernel.ds_opt_adam.adam_update(kernel.opt_id, n, group["lr"], beta1, beta2, group["eps"],
                                                   group["weight_decay"], True, p.data, p.grad.data,
                                                   state["exp_avg"], state["exp_avg_sq"])
                if after is not None:
                    after(p)

    def state_dict(self) -> Dict[str, object]:
        """`training.optim.named_state_dict` of this optimizer (fp32 moments)."""
        return named_state_dict(self.names, self.state, self.step_count)

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Copy a by-name state (from this class or `training.optim.AdamW`) into this optimizer."""
        load_named_state_dict(self.names, self.state, self.step_count, state)
