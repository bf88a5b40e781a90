"""The mapping between this model and Hugging Face's DeepseekV3 checkpoint format (config and tensor names).

Tensor names: ours are Hugging Face's without the `model.` prefix, except that
- routed experts are fused here (`mlp.experts.gate_up_proj` [E, 2I, D], gate rows first, and
  `mlp.experts.down_proj` [E, D, I]) and per expert in the checkpoint
  (`mlp.experts.{e}.{gate,up,down}_proj.weight`, as `save_pretrained` and DeepSeek's release write);
- MTP module j is `mtp.{j}.{enorm,hnorm,eh_proj,block.*,norm}` here and layer `num_hidden_layers + j`
  in the checkpoint (DeepSeek-V3 release layout): `enorm`, `hnorm`, `eh_proj`, the block's own
  weights, `shared_head.norm`, plus copies of the shared `embed_tokens` and head
  (`shared_head.head`), which are written on export and skipped on import.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Tuple

import torch

from .config import ModelConfig

YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate")
PASSTHROUGH_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_MTP_OWN = {"enorm.weight", "hnorm.weight", "eh_proj.weight"}
_MTP_COPIES = {"embed_tokens.weight", "shared_head.head.weight"}


@dataclass(frozen=True)
class Target:
    """Where a checkpoint tensor goes: `state[name]`, or expert `expert`'s rows [rows[0], rows[1]) of it."""
    name: str
    expert: Optional[int] = None
    rows: Optional[Tuple[int, int]] = None

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.expert is None:
            return tensor
        if self.rows is None:
            return tensor[self.expert]
        return tensor[self.expert, self.rows[0]:self.rows[1]]


# ---------------------------------------------------------------- config.json


def model_config_from_hf(hf: Dict[str, Any], where: str = "config.json") -> ModelConfig:
    """ModelConfig from a DeepseekV3 config.json dict; ValueError naming the key for what we cannot run."""
    if hf.get("model_type") != "deepseek_v3":
        raise ValueError(f"{where}: model_type is {hf.get('model_type')!r}; only 'deepseek_v3' is supported")
    required = {"hidden_act": "silu", "attention_bias": False, "scoring_func": "sigmoid",
                "topk_method": "noaux_tc", "moe_layer_freq": 1, "rope_interleave": True}
    for key, allowed in required.items():
        if key in hf and hf[key] is not None and hf[key] != allowed:
            raise ValueError(f"{where}: {key} is {hf[key]!r}; only {allowed!r} is supported")
    fields = set(ModelConfig.__dataclass_fields__) - {"rope_theta", "rope_scaling", "extra"}
    values = {k: hf[k] for k in fields if k in hf}
    for key in ("n_group", "topk_group"):
        if values.get(key) is None:
            values[key] = 1
    if values.get("first_k_dense_replace") is None:
        values["first_k_dense_replace"] = 0
    values["rope_theta"], values["rope_scaling"] = rope_from_hf(hf, where)
    values["extra"] = {k: hf[k] for k in PASSTHROUGH_KEYS if k in hf}
    return ModelConfig.from_dict(values)


def rope_from_hf(hf: Dict[str, Any], where: str) -> Tuple[float, Optional[Dict[str, Any]]]:
    """(rope_theta, our rope_scaling) from `rope_scaling` (older files) or `rope_parameters` (newer)."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    theta = float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "yarn":
        raise ValueError(f"{where}: rope type {kind!r} is not supported (allowed: 'default', 'yarn')")
    if params.get("attention_factor") is not None:
        raise ValueError(f"{where}: rope attention_factor is not supported; give mscale/mscale_all_dim instead")
    if params.get("factor") is None:
        raise ValueError(f"{where}: YaRN rope scaling needs 'factor'")
    return theta, {"rope_type": "yarn", **{k: params[k] for k in YARN_KEYS if params.get(k) is not None}}


def hf_config_from_model(cfg: ModelConfig, dtype: torch.dtype) -> Dict[str, Any]:
    """config.json contents for `DeepseekV3ForCausalLM` (also readable by DeepSeek's own code)."""
    values = {k: v for k, v in cfg.to_dict().items() if k not in ("rope_scaling", "extra")}
    yarn = {k: cfg.yarn[k] for k in YARN_KEYS if cfg.yarn and cfg.yarn.get(k) is not None}
    rope_scaling = {"type": "yarn", "rope_type": "yarn", **yarn} if cfg.yarn else None
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        **values,
        "num_key_value_heads": cfg.num_attention_heads,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "moe_layer_freq": 1,
        "rope_scaling": rope_scaling,
        "rope_parameters": {"rope_type": "yarn" if cfg.yarn else "default", "rope_theta": cfg.rope_theta, **yarn},
        "use_cache": True,
        "dtype": dtype_name,
        **cfg.extra,
    }


# ---------------------------------------------------------------- tensor names


def hf_tensors(model: torch.nn.Module, part: Optional[str] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor view) for every tensor of the checkpoint, in state_dict order; only
    those of submodule `part` (e.g. "layers.3", "mtp.0") when given.

    Views share memory with the model; MTP copies of embedding and head are the same tensors again.
    """
    cfg: ModelConfig = model.cfg
    state = model.state_dict()
    for name, tensor in state.items():
        if part is not None and not name.startswith(part + "."):
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name in ("embed_tokens.weight", "norm.weight"):
            yield f"model.{name}", tensor
        elif name == "lm_head.weight":
            yield name, tensor
        elif name.startswith("layers."):
            index, rest = name[len("layers."):].split(".", 1)
            yield from _block_tensors(f"model.layers.{index}.", rest, tensor, cfg)
        elif name.startswith("mtp."):
            j, rest = name[len("mtp."):].split(".", 1)
            prefix = f"model.layers.{cfg.num_hidden_layers + int(j)}."
            if rest in _MTP_OWN:
                yield prefix + rest, tensor
            elif rest == "norm.weight":
                yield prefix + "shared_head.norm.weight", tensor
                yield prefix + "embed_tokens.weight", state["embed_tokens.weight"]
                yield prefix + "shared_head.head.weight", state["lm_head.weight"]
            elif rest.startswith("block."):
                yield from _block_tensors(prefix, rest[len("block."):], tensor, cfg)
            else:
                raise KeyError(f"no checkpoint name for MTP tensor {name}")
        else:
            raise KeyError(f"no checkpoint name for tensor {name}")


def _block_tensors(prefix: str, rest: str, tensor: torch.Tensor, cfg: ModelConfig) -> Iterator[Tuple[str, torch.Tensor]]:
    inter = cfg.moe_intermediate_size
    if rest == "mlp.experts.gate_up_proj":
        for e in range(tensor.shape[0]):
            yield f"{prefix}mlp.experts.{e}.gate_proj.weight", tensor[e, :inter]
            yield f"{prefix}mlp.experts.{e}.up_proj.weight", tensor[e, inter:]
    elif rest == "mlp.experts.down_proj":
        for e in range(tensor.shape[0]):
            yield f"{prefix}mlp.experts.{e}.down_proj.weight", tensor[e]
    else:
        yield prefix + rest, tensor


def target_of(hf_name: str, cfg: ModelConfig) -> Optional[Target]:
    """Where checkpoint tensor `hf_name` goes in our state_dict; a Target with name "" means skip
    (a copy of a shared tensor); None means the name is unknown."""
    if hf_name in ("model.embed_tokens.weight", "model.norm.weight"):
        return Target(hf_name[len("model."):])
    if hf_name == "lm_head.weight":
        return Target(hf_name)
    m = _LAYER.match(hf_name)
    if m is None:
        return None
    layer, rest = int(m.group(1)), m.group(2)
    if rest.endswith("rotary_emb.inv_freq"):
        return Target("")
    if layer < cfg.num_hidden_layers:
        return _block_target(f"layers.{layer}.", rest, cfg)
    j = layer - cfg.num_hidden_layers
    if j >= cfg.num_nextn_predict_layers:
        return None
    if rest in _MTP_OWN:
        return Target(f"mtp.{j}.{rest}")
    if rest == "shared_head.norm.weight":
        return Target(f"mtp.{j}.norm.weight")
    if rest in _MTP_COPIES:
        return Target("")
    return _block_target(f"mtp.{j}.block.", rest, cfg)


def _block_target(prefix: str, rest: str, cfg: ModelConfig) -> Target:
    m = _EXPERT.match(rest)
    if m is None:
        return Target(prefix + rest)
    e, part, inter = int(m.group(1)), m.group(2), cfg.moe_intermediate_size
    if part == "down":
        return Target(prefix + "mlp.experts.down_proj", e)
    rows = (0, inter) if part == "gate" else (inter, 2 * inter)
    return Target(prefix + "mlp.experts.gate_up_proj", e, rows)
