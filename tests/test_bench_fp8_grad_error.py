"""bench.fp8_grad_error: the parts a parameter is reported under, the error and gain arithmetic, and one
real measurement (a short fp8 run of `tiny`, its state's gradient in fp8, bf16 and fp32 against fp64)."""
import pytest
import torch

from bench import fp8_grad_error


@pytest.mark.parametrize("name, part", [
    ("embed_tokens.weight", "embed_tokens"),
    ("lm_head.weight", "lm_head"),
    ("layers.0.self_attn.kv_b_proj.weight", "layers.0 attention"),
    ("layers.0.self_attn.q_a_layernorm.weight", "layers.0 attention"),
    ("layers.0.mlp.down_proj.weight", "layers.0 mlp"),
    ("layers.3.mlp.gate.weight", "layers.3 router"),
    ("layers.3.mlp.experts.gate_up_proj", "layers.3 experts"),
    ("layers.3.mlp.shared_experts.up_proj.weight", "layers.3 shared experts"),
    ("layers.3.post_attention_layernorm.weight", "layers.3 norms"),
    ("mtp.0.block.self_attn.o_proj.weight", "mtp.0 attention"),
    ("mtp.0.enorm.weight", "mtp.0 norms"),
    ("mtp.0.eh_proj.weight", "mtp.0 eh_proj"),
])
def test_every_parameter_has_its_part(name, part):
    assert fp8_grad_error.part_of(name) == part


def test_relative_error_and_gain_against_the_reference():
    ref = {"layers.0.mlp.up_proj.weight": torch.tensor([3.0, 4.0]), "lm_head.weight": torch.tensor([0.0, 0.0])}
    shrunk = {k: 0.9 * v for k, v in ref.items()}
    got = fp8_grad_error.compare(shrunk, ref)
    assert got["relerr"] == pytest.approx(0.1) and got["gain"] == pytest.approx(0.9)
    assert got["parts"] == {"layers.0 mlp": pytest.approx(0.1)}  # a part without gradient has no ratio
    orthogonal = fp8_grad_error.compare({"layers.0.mlp.up_proj.weight": torch.tensor([4.0, -3.0])}, ref)
    assert orthogonal["gain"] == pytest.approx(0.0) and orthogonal["relerr"] == pytest.approx(2 ** 0.5)


def test_measures_a_real_state_against_fp64(tmp_path):
    (row,) = fp8_grad_error.measure("tiny", 7, 1, tmp_path, steps=3)
    assert row["step"] == 4 and row["fp64_grad_norm"] > 0
    assert row["fp32"]["relerr"] < 1e-4 and row["fp32"]["gain"] == pytest.approx(1, abs=1e-4)
    # bf16 rounds to 8 significant bits, E4M3 to 4: the fp8 gradient is several times further from fp64
    # (measured 1.9% vs 0.28%), and neither is far off
    assert row["bf16"]["relerr"] < 0.01 and 3 * row["bf16"]["relerr"] < row["fp8"]["relerr"] < 0.2
    assert row["fp8"]["gain"] == pytest.approx(1, abs=0.05)
    assert set(row["fp8"]["parts"]) >= {"embed_tokens", "lm_head", "layers.0 attention", "layers.1 experts"}


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit, match="unknown"):
        fp8_grad_error.main(["--configs", "huge"])
    with pytest.raises(SystemExit, match="--batches"):
        fp8_grad_error.main(["--batches", "0"])
