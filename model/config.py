"""ModelConfig: the hyper-parameters of a DeepSeek-V3-style model.

Field names are those of Hugging Face's ``DeepseekV3Config`` so a ``config.json`` maps onto this
class one to one (DeepSeek-V3 technical report, section 2 and table of hyper-parameters in 4.2).
Every field is checked on construction; an impossible combination raises ``ValueError`` naming the
field(s) and what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional


@dataclass
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    num_attention_heads: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    q_lora_rank: Optional[int] = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    rope_interleave: bool = True
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 1
    initializer_range: float = 0.006
    embed_init_std: Optional[float] = None  # input embedding's std; None: initializer_range (model/init.py)
    aux_loss_alpha: float = 1e-4
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    @property
    def n_moe_layers(self) -> int:
        return max(self.num_hidden_layers - self.first_k_dense_replace, 0)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layers at index >= first_k_dense_replace use MoE (MTP blocks are MoE too)."""
        return self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace

    def validate(self) -> None:
        """Raise ValueError naming the field when the configuration is impossible."""
        positive = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                    "v_head_dim", "max_position_embeddings"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        non_negative = ["n_routed_experts", "n_shared_experts", "first_k_dense_replace",
                        "num_nextn_predict_layers"]
        for name in non_negative:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"model.{name} must be an integer >= 0, got {value!r}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ValueError(f"model.q_lora_rank must be a positive integer or null, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"model.qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ValueError(f"model.first_k_dense_replace ({self.first_k_dense_replace}) must be <= "
                             f"model.num_hidden_layers ({self.num_hidden_layers})")
        if self.n_routed_experts > 0:
            self._validate_routing()
        if self.rms_norm_eps <= 0:
            raise ValueError(f"model.rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.initializer_range <= 0:
            raise ValueError(f"model.initializer_range must be > 0, got {self.initializer_range}")
        if self.embed_init_std is not None and self.embed_init_std <= 0:
            raise ValueError(f"model.embed_init_std must be > 0 or null, got {self.embed_init_std}")
        if self.rope_theta <= 0:
            raise ValueError(f"model.rope_theta must be > 0, got {self.rope_theta}")
        self._validate_rope_scaling()

    def _validate_routing(self) -> None:
        if self.moe_intermediate_size <= 0:
            raise ValueError(f"model.moe_intermediate_size must be > 0, got {self.moe_intermediate_size}")
        if self.n_group <= 0 or self.n_routed_experts % self.n_group:
            raise ValueError(f"model.n_routed_experts ({self.n_routed_experts}) must be divisible by "
                             f"model.n_group ({self.n_group})")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"model.topk_group ({self.topk_group}) must be between 1 and "
                             f"model.n_group ({self.n_group})")
        reachable = self.topk_group * self.experts_per_group
        if not 1 <= self.num_experts_per_tok <= reachable:
            raise ValueError(f"model.num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and "
                             f"model.topk_group x experts per group = {self.topk_group} x "
                             f"{self.experts_per_group} = {reachable}")
        if self.routed_scaling_factor <= 0:
            raise ValueError(f"model.routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")

    def _validate_rope_scaling(self) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        kind = rs.get("rope_type", rs.get("type", "default"))
        if kind not in ("yarn", "default"):
            raise ValueError(f"model.rope_scaling.rope_type must be 'yarn' or 'default', got {kind!r}")
        if kind == "yarn" and not float(rs.get("factor", 0)) >= 1.0:
            raise ValueError(f"model.rope_scaling.factor must be >= 1 for YaRN, got {rs.get('factor')!r}")

    @property
    def yarn(self) -> Optional[Dict[str, Any]]:
        """The YaRN parameters when rope scaling is on, else None."""
        rs = self.rope_scaling
        if not rs or rs.get("rope_type", rs.get("type", "default")) != "yarn":
            return None
        return rs

    @property
    def softmax_scale(self) -> float:
        """(nope + rope)^-0.5, times mscale^2 when YaRN is on (report section 4.3)."""
        scale = self.qk_head_dim ** -0.5
        yarn = self.yarn
        if yarn and yarn.get("mscale_all_dim"):
            m = yarn_mscale(float(yarn["factor"]), float(yarn["mscale_all_dim"]))
            scale *= m * m
        return scale

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "ModelConfig":
        """Build from a dict, ignoring keys that are not fields (e.g. a full HF config.json)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    if factor <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0
