"""Hugging Face import / export (model/hf.py) against transformers' DeepseekV3ForCausalLM."""
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import ROOT
from model import ModelConfig, Transformer, load
from model.hf import dequantize_fp8, export_hf, import_hf, load_hf_model
from model.hf_names import hf_config_from_model, model_config_from_hf

from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=64)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}
CASES = {
    "qlora_groups_yarn": dict(q_lora_rank=24, n_group=4, topk_group=2, first_k_dense_replace=1,
                              routed_scaling_factor=1.7, rope_scaling=YARN),
    "no_qlora_two_dense": dict(q_lora_rank=None, n_group=2, topk_group=1, first_k_dense_replace=2,
                               routed_scaling_factor=2.5, rope_theta=5000.0),
}
TOKENS = torch.randint(0, BASE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(5))


def our_config(case: str, **changes) -> ModelConfig:
    return ModelConfig(**{**BASE, **CASES[case], "num_nextn_predict_layers": 0, **changes})


def hf_model(case: str) -> DeepseekV3ForCausalLM:
    """transformers' model with random weights, random norm scales and a positive router bias."""
    fields = {**BASE, **CASES[case]}
    rope = fields.pop("rope_scaling", None)
    theta = fields.pop("rope_theta", 10000.0)
    config = DeepseekV3Config(**fields, num_key_value_heads=fields["num_attention_heads"], initializer_range=0.05,
                              rope_parameters={**(rope or {"rope_type": "default"}), "rope_theta": theta},
                              num_nextn_predict_layers=0)
    torch.manual_seed(1)
    model = DeepseekV3ForCausalLM(config).float().eval()
    _perturb(model.named_parameters(), model.named_buffers())
    return model


@torch.no_grad()
def _perturb(params, buffers):
    for name, p in params:
        if "norm" in name:
            p.uniform_(0.5, 1.5)
    for name, b in buffers:
        if name.endswith("e_score_correction_bias"):
            b.uniform_(0.05, 0.4)


def our_model(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(2)
    model = Transformer(cfg)
    model.init_weights(std=0.05)
    _perturb(model.named_parameters(), model.named_buffers())
    return model.eval()


def hf_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


def our_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_of_save_pretrained_matches_transformers(case, tmp_path):
    peer = hf_model(case)
    peer.save_pretrained(tmp_path / "hf")
    expected = hf_logits(peer)
    assert expected.abs().max() > 0.1  # not a degenerate model
    ours = load_hf_model(tmp_path / "hf")
    assert ours.cfg.num_nextn_predict_layers == 0
    torch.testing.assert_close(our_logits(ours), expected, atol=1e-5, rtol=0)
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "meta.json").read_text())["step"] == 0
    torch.testing.assert_close(our_logits(load(tmp_path / "ckpt")), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(our_logits(load(tmp_path / "hf")), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case,tied", [("qlora_groups_yarn", False), ("no_qlora_two_dense", False),
                                       ("qlora_groups_yarn", True)])
def test_export_loads_in_transformers(case, tied, tmp_path):
    ours = our_model(our_config(case, num_nextn_predict_layers=1, tie_word_embeddings=tied))
    export_hf(ours, tmp_path, max_shard_bytes=64 * 1024)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert all((tmp_path / s).stat().st_size < 64 * 1024 + 16 * 1024 for s in shards)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert config["num_key_value_heads"] == ours.cfg.num_attention_heads
    peer, info = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"]
    assert all(k.startswith(f"model.layers.{ours.cfg.num_hidden_layers}.") for k in info["unexpected_keys"])
    torch.testing.assert_close(hf_logits(peer.eval()), our_logits(ours), atol=1e-5, rtol=0)
    assert ("lm_head.weight" in index["weight_map"]) == (not tied)
    back = load_hf_model(tmp_path)
    assert (back.lm_head.weight is back.embed_tokens.weight) == tied
    mine = ours.state_dict()
    assert back.state_dict().keys() == mine.keys()
    assert all(torch.equal(v, mine[k]) for k, v in back.state_dict().items())


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_round_trip(case):
    cfg = our_config(case, num_nextn_predict_layers=1, tie_word_embeddings=True)
    assert model_config_from_hf(hf_config_from_model(cfg, torch.bfloat16)) == cfg


def test_reads_deepseek_release_config():
    """config.json as DeepSeek released it: rope_scaling with `type`, FP8 quantization_config."""
    release = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 7168,
               "num_key_value_heads": 128, "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc",
               "scoring_func": "sigmoid", "rope_theta": 10000, "max_position_embeddings": 163840,
               "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                                "original_max_position_embeddings": 4096, "type": "yarn"},
               "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                       "weight_block_size": [128, 128]}, "bos_token_id": 0, "eos_token_id": 1}
    cfg = model_config_from_hf(release)
    assert cfg.yarn["factor"] == 40 and cfg.yarn["original_max_position_embeddings"] == 4096
    assert cfg.rope_theta == 10000 and cfg.max_position_embeddings == 163840
    assert cfg.extra == {"bos_token_id": 0, "eos_token_id": 1}
    with pytest.raises(ValueError, match="scoring_func"):
        model_config_from_hf({**release, "scoring_func": "softmax"})
    with pytest.raises(ValueError, match="rope_interleave"):
        model_config_from_hf({**release, "rope_interleave": False})
    with pytest.raises(ValueError, match="rope type 'linear'"):
        model_config_from_hf({**release, "rope_scaling": {"type": "linear", "factor": 2}})


def test_absent_mtp_weights_import_without_mtp(tmp_path):
    peer = hf_model("no_qlora_two_dense")
    peer.config.num_nextn_predict_layers = 1  # transformers keeps the field but saves no MTP weights
    peer.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no MTP weights"):
        ours = load_hf_model(tmp_path)
    assert ours.cfg.num_nextn_predict_layers == 0
    torch.testing.assert_close(our_logits(ours), hf_logits(peer), atol=1e-5, rtol=0)


def quantize_blocks(w: torch.Tensor, block: int = 128):
    """Reference 128x128 block quantization to float8_e4m3fn: scale = amax / 448 per block."""
    rows, cols = w.shape
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale = torch.empty(math.ceil(rows / block), math.ceil(cols / block))
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            s = tile.abs().max().clamp_min(1e-12) / 448
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / s).to(torch.float8_e4m3fn)
            scale[i, j] = s
    return q, scale


def test_fp8_release_format_imports_within_fp8_rounding(tmp_path):
    cfg = ModelConfig(vocab_size=50, hidden_size=160, intermediate_size=200, moe_intermediate_size=136,
                      num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, n_routed_experts=4,
                      num_experts_per_tok=2, n_group=1, topk_group=1, q_lora_rank=144, kv_lora_rank=72,
                      qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_nextn_predict_layers=0)
    original = our_model(cfg)
    export_hf(original, tmp_path / "bf")
    tensors = {}
    for shard in sorted((tmp_path / "bf").glob("*.safetensors")):
        tensors.update(load_file(shard))
    weights, scales, expected = {}, {}, {}
    for name, w in tensors.items():
        if name.endswith("proj.weight") and w.dim() == 2:
            q, s = quantize_blocks(w)
            weights[name], scales[name + "_scale_inv"] = q, s
            rows = s.repeat_interleave(128, 0)[:w.shape[0]].repeat_interleave(128, 1)[:, :w.shape[1]]
            expected[name] = (q.float() * rows, rows)
        else:
            weights[name] = w
    hf_dir = tmp_path / "fp8"
    hf_dir.mkdir()
    save_file(weights, str(hf_dir / "weights.safetensors"), metadata={"format": "pt"})
    save_file(scales, str(hf_dir / "scales.safetensors"), metadata={"format": "pt"})  # scales in another shard
    weight_map = {**{n: "weights.safetensors" for n in weights}, **{n: "scales.safetensors" for n in scales}}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = json.loads((tmp_path / "bf" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (hf_dir / "config.json").write_text(json.dumps(config))

    export_hf(load_hf_model(hf_dir), tmp_path / "back")  # read the imported weights under checkpoint names
    back = {}
    for shard in sorted((tmp_path / "back").glob("*.safetensors")):
        back.update(load_file(shard))
    worst = 0.0
    for name, (dequant, scale) in expected.items():
        assert torch.equal(back[name], dequant), name
        error = (back[name] - tensors[name]).abs()
        assert bool((error <= tensors[name].abs() * 2**-4 + scale * 2**-10).all()), name
        worst = max(worst, float(error.max()))
    assert worst > 0  # the weights really went through FP8
    assert len(expected) >= 10
    for name in set(tensors) - set(expected):
        assert torch.equal(back[name], tensors[name]), name


def test_dequantize_fp8_checks_scale_shape():
    with pytest.raises(ValueError, match="expected \\(2, 2\\)"):
        dequantize_fp8(torch.zeros(160, 130, dtype=torch.float8_e4m3fn), torch.ones(1, 1))


def test_mtp_round_trip(tmp_path):
    cfg = our_config("qlora_groups_yarn", num_hidden_layers=2, num_nextn_predict_layers=2)
    ours = our_model(cfg)
    export_hf(ours, tmp_path / "hf")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    L = cfg.num_hidden_layers
    for k in range(2):
        for part in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head", "embed_tokens",
                     "self_attn.q_a_proj", "mlp.experts.7.up_proj", "mlp.gate", "input_layernorm"):
            assert f"model.layers.{L + k}.{part}.weight" in index, part
    with safe_open(str(tmp_path / "hf" / index[f"model.layers.{L}.shared_head.head.weight"]), "pt") as f:
        assert torch.equal(f.get_tensor(f"model.layers.{L}.shared_head.head.weight"), ours.lm_head.weight)
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    back = load(tmp_path / "ckpt")
    mine, theirs = ours.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name
    with torch.no_grad():
        logits, mtp = ours(TOKENS, return_mtp=True)
        logits2, mtp2 = back(TOKENS, return_mtp=True)
    assert torch.equal(logits, logits2) and len(mtp) == len(mtp2) == 2
    for a, b in zip(mtp, mtp2):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("exported")
    export_hf(our_model(our_config("no_qlora_two_dense")), path, max_shard_bytes=32 * 1024)
    (path / "tokenizer.json").write_text('{"model": {}}')
    (path / "tokenizer_config.json").write_text("{}")
    (path / "spm.model").write_bytes(b"\x00\x01")
    return path


def _run(*args):
    return subprocess.run([sys.executable, "-m", "model.hf", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)


def test_cli_import_then_export(exported, tmp_path):
    out = _run("import", exported, tmp_path / "run" / "checkpoints" / "step_0")
    assert out.returncode == 0, out.stderr
    step = tmp_path / "run" / "checkpoints" / "step_0"
    assert sorted(p.name for p in (step / "tokenizer").iterdir()) == ["spm.model", "tokenizer.json",
                                                                         "tokenizer_config.json"]
    shutil.move(str(step / "tokenizer"), str(tmp_path / "run" / "tokenizer"))  # the trainer keeps it in out_dir
    out = _run("export", tmp_path / "run", tmp_path / "hf2", "--max-shard-size", "32KB")
    assert out.returncode == 0, out.stderr
    for name in ("tokenizer.json", "tokenizer_config.json", "spm.model"):
        assert (tmp_path / "hf2" / name).read_bytes() == (exported / name).read_bytes()
    before, after = {}, {}
    for src, dst in ((exported, before), (tmp_path / "hf2", after)):
        for shard in src.glob("*.safetensors"):
            dst.update(load_file(shard))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert _run("import", exported, step).returncode == 2  # refuses to overwrite a checkpoint


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite_shard(hf_dir, change):
    index_path = hf_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = hf_dir / index["weight_map"]["model.embed_tokens.weight"]
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in tensors or v != shard.name}
    index["weight_map"].update({k: shard.name for k in tensors})
    index_path.write_text(json.dumps(index))


def test_clear_errors(exported, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_model(tmp_path)
    bad = _copy(exported, tmp_path / "llama")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        load_hf_model(bad)

    unknown = _copy(exported, tmp_path / "unknown")
    _rewrite_shard(unknown, lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="model.layers.0.self_attn.extra.weight"):
        load_hf_model(unknown)

    missing = _copy(exported, tmp_path / "missing")
    _rewrite_shard(missing, lambda t: t.pop("model.embed_tokens.weight"))
    with pytest.raises(ValueError, match="missing: model.embed_tokens.weight"):
        load_hf_model(missing)

    shape = _copy(exported, tmp_path / "shape")
    _rewrite_shard(shape, lambda t: t.update({"model.embed_tokens.weight": torch.zeros(3, 3)}))
    with pytest.raises(ValueError, match="model.embed_tokens.weight .* has shape \\(3, 3\\)"):
        load_hf_model(shape)


def test_import_and_export_report_progress_over_all_tensor_bytes(tmp_path, monkeypatch):
    """`model.hf import` and `export` advance a progress bar by every tensor byte they read or write."""
    import io

    from tqdm import tqdm

    import model.hf as hf

    bars = []

    def recording_bar(total_bytes, desc):
        bars.append(tqdm(total=total_bytes, desc=f"model.hf {desc}", file=io.StringIO(), disable=False))
        return bars[-1]

    monkeypatch.setattr(hf, "_progress", recording_bar)
    ours = our_model(our_config("no_qlora_two_dense"))
    export_hf(ours, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    exported = sum(t.nbytes for s in (tmp_path / "hf").glob("*.safetensors") for t in load_file(str(s)).values())
    assert [bar.desc for bar in bars] == ["model.hf export", "model.hf import"]
    assert all(bar.total == bar.n == exported for bar in bars), [(b.desc, b.n, b.total, exported) for b in bars]
