"""Memory per GPU of a layout (model/memory.py): parameter placement against the real pipeline stages
of a meta-device model, the effect of EP and ZeRO-1 sharding, errors, and the summary CLI."""
import json
import subprocess
import sys

import pytest
import torch

from model.memory import GIB, Layout, activation_bytes_per_token, memory_per_gpu, rank_param_counts
from model.summary import load_model_config
from model.summary import main as summary_main
from model.transformer import Transformer
from parallel.expert_parallel import is_expert_param
from parallel.pipeline_stages import LocalModel, StageModule, rank_stages, split_layers

from conftest import ROOT


def _meta_model(cfg):
    with torch.device("meta"):
        return Transformer(cfg)


def _unique_params(module):
    seen, out = set(), []
    for name, p in module.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def _reference_rank_counts(cfg, pp, ep, schedule, spr):
    """Parameters each pipeline rank really holds: the LocalModel built from the pipeline's StageModules."""
    model = _meta_model(cfg)
    n_stages = pp * spr
    layers = split_layers(cfg.num_hidden_layers, n_stages)
    v_shaped = schedule in ("zbv", "dualpipev")
    out = []
    for rank in range(pp):
        stages = [StageModule(model, s, n_stages, layers[s], carry_embedding=not v_shaped,
                              local_mtp_embedding=v_shaped) for s in rank_stages(rank, pp, n_stages, schedule)]
        params = _unique_params(LocalModel(model, stages))
        experts = sum(p.numel() for n, p in params if is_expert_param(n))
        assert experts % ep == 0
        out.append({"dense": sum(p.numel() for n, p in params if not is_expert_param(n)), "experts": experts // ep})
    return out


def test_single_gpu_params_are_exact():
    cfg, _ = load_model_config("tiny")
    numel = sum(p.numel() for _, p in _unique_params(_meta_model(cfg)))
    [counts] = rank_param_counts(cfg, Layout())
    assert counts["dense"] + counts["experts"] == numel
    mem = memory_per_gpu(cfg, Layout(precision="bf16"))["memory_breakdown"]
    assert mem["params_gib"] * GIB == 6 * numel  # fp32 weight + bf16 working copy
    assert mem["grads_gib"] * GIB == 4 * numel
    assert mem["optimizer_gib"] * GIB == 4 * numel  # two bf16 moments
    assert memory_per_gpu(cfg, Layout(precision="fp32"))["memory_breakdown"]["params_gib"] * GIB == 4 * numel


@pytest.mark.parametrize("schedule,spr", [("1f1b", 1), ("interleaved_1f1b", 2), ("dualpipev", 2)])
@pytest.mark.parametrize("ep", [1, 2])
def test_pipeline_ranks_hold_what_the_stages_hold(schedule, spr, ep):
    cfg, _ = load_model_config("tiny")
    layout = Layout(pp=2, ep=ep, schedule=schedule)
    assert rank_param_counts(cfg, layout) == _reference_rank_counts(cfg, 2, ep, schedule, spr)


def test_dualpipev_puts_embedding_and_head_on_rank_0():
    cfg, _ = load_model_config("tiny")
    counts = rank_param_counts(cfg, Layout(pp=2, schedule="dualpipev"))
    vocab = cfg.vocab_size * cfg.hidden_size
    assert counts[0]["dense"] - counts[1]["dense"] > 2 * vocab - vocab // 2


def test_ep_halves_the_routed_experts():
    cfg, _ = load_model_config("tiny")
    one, two = rank_param_counts(cfg, Layout(ep=1))[0], rank_param_counts(cfg, Layout(ep=2))[0]
    assert two["dense"] == one["dense"]
    assert 2 * two["experts"] == one["experts"] > 0
    m1 = memory_per_gpu(cfg, Layout(ep=1, zero=False))["memory_breakdown"]
    m2 = memory_per_gpu(cfg, Layout(ep=2, zero=False))["memory_breakdown"]
    assert (m1["params_gib"] - m2["params_gib"]) * GIB == 6 * one["experts"] / 2


def test_zero1_over_dp_halves_the_optimizer_state():
    cfg, _ = load_model_config("tiny")
    full = memory_per_gpu(cfg, Layout(dp=1))["memory_breakdown"]
    half = memory_per_gpu(cfg, Layout(dp=2))["memory_breakdown"]
    off = memory_per_gpu(cfg, Layout(dp=2, zero=False))["memory_breakdown"]
    assert half["optimizer_gib"] == pytest.approx(full["optimizer_gib"] / 2, rel=1e-12)
    assert off["optimizer_gib"] == full["optimizer_gib"]
    for key in ("params_gib", "grads_gib", "activations_gib"):
        assert half[key] == full[key] == off[key]


def test_activations_follow_micro_batch_and_pipeline_depth():
    cfg, _ = load_model_config("tiny", ["num_nextn_predict_layers=0"])
    S = 256
    one = memory_per_gpu(cfg, Layout(seq_len=S, micro_batch=1))["memory_breakdown"]["activations_gib"]
    four = memory_per_gpu(cfg, Layout(seq_len=S, micro_batch=4))["memory_breakdown"]["activations_gib"]
    assert four == pytest.approx(4 * one)
    layers = sum(activation_bytes_per_token(cfg, i, "bf16") for i in range(cfg.num_hidden_layers))
    head = 6 * cfg.vocab_size * S
    assert one * GIB == layers * S + head
    fused = memory_per_gpu(cfg, Layout(seq_len=S, fused_head_loss=True))["memory_breakdown"]["activations_gib"]
    assert fused * GIB == layers * S + (2 * cfg.hidden_size + 8) * S  # head input (bf16) and label only
    # 1F1B with pp=2: rank 0 holds 2 micro-batches of its two layers (the head is on rank 1).
    rank0 = 2 * S * sum(activation_bytes_per_token(cfg, i, "bf16") for i in range(2))
    rank1 = S * sum(activation_bytes_per_token(cfg, i, "bf16") for i in range(2, 4)) + head
    got = memory_per_gpu(cfg, Layout(seq_len=S, pp=2))
    peak = got["layout"]["peak_pp_rank"]
    assert got["memory_breakdown"]["activations_gib"] * GIB == [rank0, rank1][peak]


def test_fp8_caches_less_than_bf16():
    cfg, _ = load_model_config("v3_671b")
    assert activation_bytes_per_token(cfg, 10, "fp8") < activation_bytes_per_token(cfg, 10, "bf16")


@pytest.mark.parametrize("layout,message", [
    (Layout(ep=3), "parallel.ep"),
    (Layout(pp=8), "num_hidden_layers"),
    (Layout(pp=2, schedule="gpipe"), "parallel.schedule"),
    (Layout(dp=0), "parallel.dp"),
    (Layout(precision="fp16"), "precision"),
])
def test_impossible_layouts_raise_clear_errors(layout, message):
    cfg, _ = load_model_config("tiny")
    with pytest.raises(ValueError, match=message):
        memory_per_gpu(cfg, layout)


def test_summary_cli_prints_memory_and_layout():
    out = subprocess.run([sys.executable, "-m", "model.summary", "tiny", "parallel.pp=2", "parallel.ep=2",
                          "parallel.dp=2", "parallel.schedule=dualpipev", "train.micro_batch=2", "precision=fp8"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    cfg, seq_len = load_model_config("tiny")
    expected = memory_per_gpu(cfg, Layout(pp=2, ep=2, dp=2, schedule="dualpipev", micro_batch=2,
                                          precision="fp8", seq_len=seq_len, fused_head_loss=True))
    assert row["layout"]["fused_head_loss"] is True  # configs/precision/fp8.yaml turns it on
    assert row["memory_gib_per_gpu"] == pytest.approx(expected["memory_gib_per_gpu"])
    assert row["memory_breakdown"] == pytest.approx(expected["memory_breakdown"])
    assert row["layout"]["world_size"] == 8 and row["layout"]["schedule"] == "dualpipev"
    assert row["memory_gib_per_gpu"] == pytest.approx(sum(row["memory_breakdown"].values()))


def test_summary_cli_rejects_impossible_layouts(capsys):
    assert summary_main(["tiny", "parallel.ep=3"]) == 2
    assert "parallel.ep" in capsys.readouterr().err
    assert summary_main(["tiny", "parallel.tp=2"]) == 2
    assert "parallel.tp" in capsys.readouterr().err


def test_fp8_activation_formula_matches_saved_tensors():
    """The per-layer formula against the bytes autograd really keeps (bench.activation_memory's
    saved-tensor hooks) for the FP8 recipe on tiny: Transformer blocks, main layers and MTP block."""
    from bench.activation_memory import build, per_token
    cfg, _ = load_model_config("tiny")
    measured = per_token(build(cfg, recipe=True), seq_len=64)["blocks"]
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    formula = sum(activation_bytes_per_token(cfg, i, "fp8") for i in range(layers))
    assert abs(formula / measured - 1) < 0.05, (formula, measured)
