"""lm-evaluation-harness: `python -m eval.harness --model moeforge` on a training checkpoint against
lm-eval's own `hf` model on the Hugging Face export of that checkpoint, on local tasks (multiple
choice, rolling log-likelihood, generation), and `python -m eval --task choice` on the checkpoint.
The three commands run side by side, offline; the same for a transformers checkpoint imported with
its own tokenizer (no FIM tokens, DeepSeek's special-token names)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from data.tokenizer import train_tokenizer
from model import ModelConfig, Transformer
from model.hf import export_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "eval" / "samples"

TASKS = """\
task: mf_choice
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{choice}"}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list: [{{metric: acc, aggregation: mean, higher_is_better: true}},
              {{metric: acc_norm, aggregation: mean, higher_is_better: true}}]
---
task: mf_rolling
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{texts}"}}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list: [{{metric: word_perplexity}}, {{metric: byte_perplexity}}, {{metric: bits_per_byte}}]
---
task: mf_gen
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{gen}"}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["\\n\\n", "Question:"], max_gen_toks: 12, do_sample: false}}
metric_list: [{{metric: exact_match, aggregation: mean, higher_is_better: true}}]
"""


def _checkpoint(out_dir: Path) -> None:
    """A training checkpoint as the trainer lays it out: out_dir/{tokenizer, checkpoints/step_3}."""
    tok = train_tokenizer([(SAMPLES / "text.txt").read_text()], 320, out_dir / "tokenizer")
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                      num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4, n_routed_experts=8,
                      n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, q_lora_rank=None,
                      kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                      max_position_embeddings=64, num_nextn_predict_layers=1)
    torch.manual_seed(3)
    net = Transformer(cfg)
    net.init_weights(std=0.1)
    with torch.no_grad():
        net.layers["1"].mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    step = out_dir / "checkpoints" / "step_3"
    dcp.save({"model": net.state_dict()}, checkpoint_id=str(step), no_dist=True)
    (step / "model_config.json").write_text(json.dumps(cfg.to_dict()))
    (step / "meta.json").write_text(json.dumps({"step": 3}))


def _start(args, tmp: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp / "datasets"), HF_HOME=str(tmp / "hf_home"), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    return out


def _lm_eval_outputs(output_path: Path, tasks=("mf_choice", "mf_rolling", "mf_gen")):
    """(results dict, {task: samples sorted by doc_id}) written by lm-eval under `output_path`."""
    results = json.loads(next(output_path.rglob("results_*.json")).read_text())["results"]
    samples = {}
    for task in tasks:
        lines = next(output_path.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()
        samples[task] = sorted((json.loads(line) for line in lines), key=lambda s: s["doc_id"])
    return results, samples


def _side_by_side(ours_path: Path, hf_dir: Path, task_dir: Path, tasks, tmp_path: Path):
    """Run `python -m eval --task choice` on `ours_path`, lm-eval's `moeforge` on it and lm-eval's `hf`
    on `hf_dir` side by side: (the eval JSON line, ours (results, samples), peer (results, samples))."""
    common = ["--tasks", *tasks, "--include_path", str(task_dir), "--device", "cpu", "--log_samples"]
    ours = _start(["-m", "eval.harness", "--model", "moeforge", "--model_args", f"path={ours_path}",
                   "--batch_size", "4", "--output_path", str(tmp_path / "ours"), *common], tmp_path)
    peer = _start(["-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={hf_dir},dtype=float32",
                   "--batch_size", "1", "--output_path", str(tmp_path / "peer"), *common], tmp_path)
    cli = _start(["-m", "eval", str(ours_path), "--task", "choice", "--data", str(SAMPLES / "choice.jsonl"),
                  "--device", "cpu"], tmp_path)
    cli_result = json.loads(_finish(cli).strip().splitlines()[-1])
    _finish(ours)
    _finish(peer)
    return cli_result, _lm_eval_outputs(tmp_path / "ours", tasks), _lm_eval_outputs(tmp_path / "peer", tasks)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_moeforge_in_lm_eval_equals_hf_model_on_export(tmp_path):
    out_dir, hf_dir, task_dir = tmp_path / "run", tmp_path / "hf", tmp_path / "tasks"
    _checkpoint(out_dir)
    export_checkpoint(out_dir, hf_dir)
    assert (hf_dir / "tokenizer.json").is_file()
    task_dir.mkdir()
    texts = tmp_path / "texts.jsonl"
    text = (SAMPLES / "text.txt").read_text()
    texts.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "Two notebooks, both full."}) + "\n")
    yaml = TASKS.format(choice=SAMPLES / "choice.jsonl", texts=texts, gen=SAMPLES / "gen.jsonl")
    for i, doc in enumerate(yaml.split("---\n")):
        (task_dir / f"task{i}.yaml").write_text(textwrap.dedent(doc))
    cli_result, (ours_results, ours_samples), (peer_results, peer_samples) = _side_by_side(
        out_dir, hf_dir, task_dir, ("mf_choice", "mf_rolling", "mf_gen"), tmp_path)

    for metric in ("acc,none", "acc_norm,none"):
        assert ours_results["mf_choice"][metric] == peer_results["mf_choice"][metric]
    assert cli_result["acc"] == ours_results["mf_choice"]["acc,none"]
    ours_ll = [float(r[0][0]) for s in ours_samples["mf_choice"] for r in s["resps"]]
    peer_ll = [float(r[0][0]) for s in peer_samples["mf_choice"] for r in s["resps"]]
    assert len(ours_ll) == 24 and ours_ll == pytest.approx(peer_ll, abs=1e-4)
    assert len(set(round(x, 2) for x in ours_ll)) > 12  # the model is not uniform: choices differ

    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ours_results["mf_rolling"][metric] == pytest.approx(peer_results["mf_rolling"][metric], rel=1e-5)
    assert len(ours_samples["mf_rolling"]) == 2

    assert [s["resps"] for s in ours_samples["mf_gen"]] == [s["resps"] for s in peer_samples["mf_gen"]]
    assert ours_results["mf_gen"]["exact_match,none"] == peer_results["mf_gen"]["exact_match,none"]


def test_an_imported_model_with_its_own_tokenizer_scores_as_lm_evals_hf_model(tmp_path):
    """A transformers DeepseekV3 checkpoint whose tokenizer (DeepSeek's special-token names, no FIM
    tokens, vocabulary = the model's) is used as it is: imported with `model.hf import`, it gives
    through `python -m eval --task choice` and lm-eval's `moeforge` the choice results of lm-eval's
    `hf` model on the original directory."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    hf_dir, ckpt, task_dir = tmp_path / "hf", tmp_path / "imported", tmp_path / "tasks"
    hf_dir.mkdir()
    bos, eos = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([(SAMPLES / "text.txt").read_text()], trainers.BpeTrainer(
        vocab_size=400, special_tokens=[bos, eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
        "add_bos_token": False, "model_max_length": 64}))
    cfg = DeepseekV3Config(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        max_position_embeddings=64, num_nextn_predict_layers=0, initializer_range=0.1,
        bos_token_id=tok.token_to_id(bos), eos_token_id=tok.token_to_id(eos))
    torch.manual_seed(5)
    DeepseekV3ForCausalLM(cfg).save_pretrained(hf_dir)
    imported = subprocess.run([sys.executable, "-m", "model.hf", "import", str(hf_dir), str(ckpt)], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
    assert imported.returncode == 0, imported.stderr
    task_dir.mkdir()
    (task_dir / "task0.yaml").write_text(textwrap.dedent(TASKS.split("---\n")[0]).format(
        choice=SAMPLES / "choice.jsonl"))
    cli_result, (ours_results, ours_samples), (peer_results, peer_samples) = _side_by_side(
        ckpt, hf_dir, task_dir, ("mf_choice",), tmp_path)
    for metric in ("acc,none", "acc_norm,none"):
        assert ours_results["mf_choice"][metric] == peer_results["mf_choice"][metric]
    assert cli_result["acc"] == peer_results["mf_choice"]["acc,none"]
    assert cli_result["acc_norm"] == peer_results["mf_choice"]["acc_norm,none"]
    ours_ll = [float(r[0][0]) for s in ours_samples["mf_choice"] for r in s["resps"]]
    peer_ll = [float(r[0][0]) for s in peer_samples["mf_choice"] for r in s["resps"]]
    assert len(ours_ll) == 24 and ours_ll == pytest.approx(peer_ll, abs=1e-4)
    assert len(set(round(x, 2) for x in ours_ll)) > 12  # the model is not uniform: choices differ
