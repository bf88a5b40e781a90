"""Parameter counts and FLOPs per token (model/flops.py, model/summary.py) against published figures,
the parameters of real models, and FLOPs counted while a model runs."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model.flops import flops_per_token, param_counts
from model.summary import load_model_config, meta_param_counts, summarize
from model.transformer import Transformer
from parallel.summary import main as planner_main

from conftest import ROOT


def test_v3_671b_matches_published_sizes():
    cfg, seq_len = load_model_config("v3_671b")
    counts = summarize(cfg, seq_len)
    # DeepSeek-V3: "671B total parameters, 37B activated for each token", MTP reported separately.
    assert abs(counts["total_params"] / 671e9 - 1) < 0.005
    assert abs(counts["active_params"] - 37e9) < 0.5e9  # the published 37B is rounded to the billion
    assert abs(counts["active_params"] / 37e9 - 1) < 0.0125
    # The released checkpoint (685B) = main model + MTP module with its copies of embedding and head.
    vocab_matrix = cfg.vocab_size * cfg.hidden_size
    assert abs((counts["total_params"] + counts["mtp_params"] + 2 * vocab_matrix) / 685e9 - 1) < 0.005
    assert counts["embedding_params"] == 2 * vocab_matrix
    assert counts["flops_per_token"] > 6 * counts["active_params"]


def test_v2_lite_shape_matches_published_sizes():
    cfg, _ = load_model_config("v2_lite")
    counts = param_counts(cfg)
    # DeepSeek-V2-Lite: 15.7B total, 2.4B activated (rounded figures).
    assert abs(counts["total_params"] / 15.7e9 - 1) < 0.005
    assert abs(counts["active_params"] - 2.4e9) < 0.06e9


VARIANTS = [
    [],
    ["q_lora_rank=null", "tie_word_embeddings=true"],
    ["first_k_dense_replace=0", "n_shared_experts=2", "num_nextn_predict_layers=2"],
    ["n_routed_experts=0", "first_k_dense_replace=4"],
]


@pytest.mark.parametrize("overrides", VARIANTS)
def test_formulas_match_model_built_on_meta_device(overrides):
    cfg, _ = load_model_config("tiny", overrides)
    assert param_counts(cfg) == meta_param_counts(cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    own = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    assert param_counts(cfg)["total_params"] == own


def _grouped_mm_flops(x_shape, w_shape, *args, **kwargs):
    """2 * rows * inner * out over all groups; the weight gradient form (2-D x 2-D) sums over groups."""
    return 2 * x_shape[0] * x_shape[1] * w_shape[-1]


def _counted_matmul_flops(model, run) -> float:
    """FLOPs of the weight matmuls (mm and grouped mm; attention and the MoE combine are batched
    matmuls or fused kernels and are left out) of `run()`, a forward + backward, counted op by op."""
    mapping = {torch.ops.aten._grouped_mm: _grouped_mm_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        run()
    counts = counter.get_flop_counts()["Global"]
    return float(counts.get(torch.ops.aten.mm, 0) + counts.get(torch.ops.aten._grouped_mm, 0))


def _attention_term(cfg, depth: int, seq_len: int) -> float:
    return 6 * depth * seq_len * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) / 2


def test_flops_per_token_matches_counted_flops():
    """The weight-matmul FLOPs counted in a forward + backward pass equal 6 x the active matmul
    parameters per token, i.e. flops_per_token without its attention term."""
    cfg, _ = load_model_config("tiny", ["num_nextn_predict_layers=0"])
    model = Transformer(cfg)
    B, S = 2, 64
    tokens = torch.randint(0, cfg.vocab_size, (B, S))
    counted = _counted_matmul_flops(model, lambda: model(tokens).float().sum().backward()) / (B * S)
    assert counted == flops_per_token(cfg, S) - _attention_term(cfg, cfg.num_hidden_layers, S)


def test_flops_per_token_counts_mtp():
    cfg, _ = load_model_config("tiny", ["num_nextn_predict_layers=1"])
    without = dataclasses.replace(cfg, num_nextn_predict_layers=0)
    model = Transformer(cfg)
    B, S = 2, 64
    tokens = torch.randint(0, cfg.vocab_size, (B, S))

    def run():
        logits, mtp = model(tokens, return_mtp=True)
        (logits.float().sum() + mtp[0].float().sum()).backward()
    counted = _counted_matmul_flops(model, run) / (B * S)
    expected = flops_per_token(cfg, S) - _attention_term(cfg, cfg.num_hidden_layers + 1, S)
    assert flops_per_token(cfg, S) > flops_per_token(without, S)
    assert counted == pytest.approx(expected, rel=0.01)  # the MTP module sees S - 1 positions, the formula S


def test_summary_cli_prints_one_json_line():
    out = subprocess.run([sys.executable, "-m", "parallel.summary", "v3_671b", "train.seq_len=8192"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    row = json.loads(lines[0])
    cfg, _ = load_model_config("v3_671b")
    assert row["seq_len"] == 8192
    assert row["flops_per_token"] == flops_per_token(cfg, 8192)
    assert {k: row[k] for k in param_counts(cfg)} == param_counts(cfg)


def test_summary_rejects_unknown_override(capsys):
    assert planner_main(["tiny", "hiden_size=3"]) == 2
    assert "hiden_size" in capsys.readouterr().err


REPORT_LAYOUT = ["parallel.pp=16", "parallel.ep=64", "parallel.dp=2", "parallel.schedule=dualpipev", "precision=fp8",
                 "train.seq_len=4096", "train.micro_batch=1"]


def _json_lines(text):
    return [json.loads(line) for line in text.strip().splitlines()]


def test_summary_prints_memory_with_what_training_uses(capsys):
    """Unset settings are training's: configs/precision/fp8.yaml (fused head loss, parameter dtype),
    configs/optim/adamw.yaml (moments), configs/parallel/default.yaml (ZeRO-1 on when dp x ep > 1)."""
    from omegaconf import OmegaConf
    from parallel.memory import Layout, memory_per_gpu
    assert planner_main(["tiny", "parallel.pp=2", "parallel.ep=2", "parallel.dp=2", "parallel.schedule=dualpipev",
                         "train.micro_batch=2", "precision=fp8"]) == 0
    [row] = _json_lines(capsys.readouterr().out)
    precision = OmegaConf.load(ROOT / "configs/precision/fp8.yaml")
    assert row["layout"]["fused_head_loss"] is precision.fused_head_loss is True
    assert row["layout"]["param_dtype"] == precision.get("param_dtype", "fp32")
    assert row["layout"]["zero"] is True and row["layout"]["world_size"] == 8
    cfg, seq_len = load_model_config("tiny")
    expected = memory_per_gpu(cfg, Layout(pp=2, ep=2, dp=2, schedule="dualpipev", micro_batch=2, precision="fp8",
                                          seq_len=seq_len, fused_head_loss=True, param_dtype=row["layout"]["param_dtype"]))
    assert row["memory_breakdown"] == pytest.approx(expected["memory_breakdown"])
    assert row["memory_gib_per_gpu"] == pytest.approx(sum(row["memory_breakdown"].values()))
    assert planner_main(["tiny"]) == 0
    assert _json_lines(capsys.readouterr().out)[0]["layout"]["zero"] is False  # one GPU: nothing to shard


def test_summary_rejects_impossible_layouts(capsys):
    assert planner_main(["tiny", "parallel.ep=3"]) == 2
    assert "parallel.ep" in capsys.readouterr().err
    assert planner_main(["tiny", "parallel.tp=2"]) == 2
    assert "parallel.tp" in capsys.readouterr().err
    assert planner_main(["tiny", "--fit", "8"]) == 2
    assert "--gpu-mem" in capsys.readouterr().err


def test_the_reports_layout_fits_an_80_gb_gpu(capsys):
    """Acceptance: v3_671b at pp=16 DualPipeV x ep=64 x dp=2, fp8, 4096-token micro-batches needs at
    most 64 GiB per GPU, and `--fit 2048 --gpu-mem 80` lists that layout."""
    assert planner_main(["v3_671b", *REPORT_LAYOUT]) == 0
    [row] = _json_lines(capsys.readouterr().out)
    assert row["memory_gib_per_gpu"] <= 64, row["memory_breakdown"]
    assert planner_main(["v3_671b", "precision=fp8", "train.seq_len=4096", "--fit", "2048", "--gpu-mem", "80"]) == 0
    rows = _json_lines(capsys.readouterr().out)
    want = {"pp": 16, "ep": 64, "dp": 2, "schedule": "dualpipev", "micro_batch": 1, "offload": "none"}
    found = [r for r in rows if all(r["layout"][k] == v for k, v in want.items())]
    assert len(found) == 1 and found[0]["memory_gib_per_gpu"] == pytest.approx(row["memory_gib_per_gpu"])


def test_fit_lists_only_layouts_that_fit_best_first(capsys):
    assert planner_main(["tiny", "precision=fp8", "train.seq_len=512", "--fit", "4", "--gpu-mem", "4.08",
                         "--margin", "4"]) == 0
    rows = _json_lines(capsys.readouterr().out)
    assert rows and all(r["memory_gib_per_gpu"] <= 0.08 and r["layout"]["world_size"] == 4 for r in rows)
    keys = [(round(r["bubble_fraction"], 2), r["comm_gib_per_gpu_per_step"]) for r in rows]
    assert keys == sorted(keys)
    assert {r["layout"]["pp"] for r in rows} >= {1, 2}
    assert all(r["bubble_fraction"] == 0 for r in rows if r["layout"]["pp"] == 1)
    assert any(r["memory_gib_per_gpu"] > 0.08 for r in _fit_all(capsys))  # some layouts were left out
    assert planner_main(["tiny", "--fit", "4", "--gpu-mem", "4.001", "--margin", "4"]) == 1
    assert "no layout" in capsys.readouterr().err


def _fit_all(capsys):
    assert planner_main(["tiny", "precision=fp8", "train.seq_len=512", "--fit", "4", "--gpu-mem", "100"]) == 0
    return _json_lines(capsys.readouterr().out)


def test_model_imports_nothing_from_parallel_training_or_data():
    """The layering rule: no module of model/ imports parallel/, training/ or data/, not even inside a
    function or a `__main__` block."""
    import ast
    bad = []
    for path in sorted((ROOT / "model").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            for sub in ast.walk(node):
                names = ([a.name for a in sub.names] if isinstance(sub, ast.Import)
                         else [sub.module or ""] if isinstance(sub, ast.ImportFrom) and not sub.level else [])
                bad += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("parallel", "training", "data")]
    assert not bad


def test_model_summary_as_a_command_names_the_planner_command():
    out = subprocess.run([sys.executable, "-m", "model.summary", "v3_671b"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1 and "python -m parallel.summary" in out.stderr and not out.stdout
