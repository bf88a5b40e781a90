"""The benchmark's two models (bench/model_vs_hf.py) compute the same thing: equal logits, loss and
gradients on the benchmark config; and the benchmark prints rows in the shared JSON format."""
import io
import json
from contextlib import redirect_stdout

import torch
import torch.nn.functional as F

from bench import model_vs_hf


def test_same_logits_loss_and_gradients_as_transformers():
    ours, peer = model_vs_hf.build_pair("tiny")
    for m in ours.moe_layers():
        m.aux_loss_weight = 0.0  # transformers has no balance loss; compare the language-model loss alone
    tokens = torch.randint(0, ours.cfg.vocab_size, (2, 33))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    logits = ours(inputs)
    peer_logits = peer(input_ids=inputs, use_cache=False).logits
    torch.testing.assert_close(logits, peer_logits, atol=1e-5, rtol=0)
    F.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
    F.cross_entropy(peer_logits.flatten(0, 1), labels.flatten()).backward()
    peer_params = dict(peer.named_parameters())
    for name, p in ours.named_parameters():
        peer_p = peer_params[name if name == "lm_head.weight" else f"model.{name}"]
        assert peer_p.shape == p.shape, name
        torch.testing.assert_close(p.grad, peer_p.grad, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert len(peer_params) == len(dict(ours.named_parameters()))


def test_bench_prints_json_rows():
    out = io.StringIO()
    with redirect_stdout(out):
        assert model_vs_hf.main(["--dtypes", "fp32,bf16", "--batch", "1", "--seq", "16", "--warmup", "1",
                                 "--repeats", "1"]) == 0
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["case"] for r in rows] == ["fwd_bwd_fp32", "fwd_bwd_bf16"]
    for r in rows:
        assert r["bench"] == "model_vs_hf" and r["unit"] == "tokens/s"
        assert r["peer"] == "transformers DeepseekV3ForCausalLM"
        assert r["ours"] > 0 and r["peer_value"] > 0
        assert abs(r["ratio"] - r["ours"] / r["peer_value"]) < 0.01 * r["ratio"] + 0.001


def test_bench_profile_rows_account_for_the_step():
    """--profile splits each model's step into op groups; GEMMs are a real share of both."""
    out = io.StringIO()
    with redirect_stdout(out):
        assert model_vs_hf.main(["--dtypes", "fp32", "--batch", "1", "--seq", "32", "--warmup", "1",
                                 "--repeats", "2", "--profile"]) == 0
    rows = {r["case"]: r for r in map(json.loads, out.getvalue().splitlines())}
    groups = [f"profile_fp32_{g}" for g in list(model_vs_hf.OP_GROUPS) + ["other"]]
    assert list(rows) == ["fwd_bwd_fp32"] + groups
    for side in ("ours", "peer_value"):
        total = sum(rows[g][side] for g in groups)
        assert total > 0 and rows["profile_fp32_gemm"][side] > 0.05 * total
