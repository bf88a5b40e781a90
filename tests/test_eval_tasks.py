"""Evaluation tasks against references: transformers' DeepseekV3ForCausalLM and tokenizer (choice
log-likelihoods, greedy generation), an fp64 per-token computation (bits per byte), full-prefix
recomputation (the KV cache), and the `python -m eval` command line."""
import json
import math
from pathlib import Path

import pytest
import torch

import model as model_lib
from data.tokenizer import train_tokenizer
from eval.__main__ import main as eval_main
from eval.bpb import evaluate_bpb, sliding_windows
from eval.choice import evaluate_choice, read_choice_examples
from eval.generate import (answer_matches, extract_answer, generate_text, greedy_generate, normalize_answer,
                           read_gen_examples)

SAMPLES = Path(__file__).resolve().parents[1] / "eval" / "samples"
CONTEXT = 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny shapes gain nothing from a second thread, and one thread is immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """(hf_dir, transformers model, transformers tokenizer, our model, our tokenizer): same weights and vocabulary."""
    from transformers import AutoTokenizer, DeepseekV3Config, DeepseekV3ForCausalLM

    hf_dir = tmp_path_factory.mktemp("hf")
    tok = train_tokenizer([(SAMPLES / "text.txt").read_text()], 320, hf_dir)
    cfg = DeepseekV3Config(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        max_position_embeddings=CONTEXT, num_nextn_predict_layers=0, initializer_range=0.1,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    torch.manual_seed(1)
    hf = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        hf.model.layers[1].mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    hf.save_pretrained(hf_dir)
    ours = model_lib.load(hf_dir)
    return hf_dir, hf, AutoTokenizer.from_pretrained(hf_dir), ours, tok


def test_sliding_windows_score_every_token_once_with_enough_context():
    for n, L, S in [(1, 8, 8), (7, 8, 3), (8, 8, 8), (9, 8, 8), (50, 8, 3), (50, 8, 1), (23, 5, 5)]:
        scored = []
        for start, end, k in sliding_windows(n, L, S):
            assert 0 < end - start <= L and 1 <= k <= end - start
            targets = list(range(end - k + 1, end + 1))
            assert all(t - start >= min(t, L - S + 1) for t in targets)  # tokens before t in view
            scored += targets
        assert scored == list(range(1, n + 1))
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(10, 8, 9)


def _reference_bpb(logits64, prefix, docs_ids, texts, L, S):
    """Each target token j of each document scored in fp64 (transformers' model) from the window that first reaches it:
    windows end at L, L+S, L+2S, ... (capped at the last target) and read the L tokens before."""
    nll = 0.0
    for ids in docs_ids:
        seq = torch.tensor([prefix] + ids)
        n = len(ids)
        by_window = {}
        for j in range(1, n + 1):
            end = min(L + max(0, math.ceil((j - L) / S)) * S, n)
            by_window.setdefault(end, []).append(j)
        for end, targets in by_window.items():
            start = max(0, end - L)
            logits = logits64(seq[start:end][None])[0]
            logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
            nll -= sum(float(logp[j - 1 - start, seq[j]]) for j in targets)
    return nll / (math.log(2) * sum(len(t.encode("utf-8")) for t in texts))


def test_bpb_matches_fp64_direct_computation(hf_pair):
    from transformers import DeepseekV3ForCausalLM

    *_, ours, tok = hf_pair
    texts = [(SAMPLES / "text.txt").read_text()[:500], "Café au lait, 12 ships. " * 3]
    docs = [tok.encode(t) for t in texts]
    assert len(docs[0]) > 4 * 48
    result = evaluate_bpb(ours, tok, texts, context_length=48, stride=20, batch_size=4)
    with torch.no_grad():
        hf64 = DeepseekV3ForCausalLM.from_pretrained(hf_pair[0], dtype=torch.float64, experts_implementation="eager")
        expected = _reference_bpb(lambda x: hf64(x).logits, tok.bos_id, docs, texts, 48, 20)
    assert result["tokens"] == sum(map(len, docs)) and result["bytes"] == sum(len(t.encode()) for t in texts)
    assert abs(result["bpb"] - expected) < 1e-6, (result["bpb"], expected)


def test_choice_loglikelihoods_and_accuracy_equal_transformers(hf_pair):
    _, hf, hf_tok, ours, tok = hf_pair
    examples = read_choice_examples(SAMPLES / "choice.jsonl")
    metrics, lls = evaluate_choice(ours, tok, examples, CONTEXT, batch_size=5)
    ref_lls = []
    with torch.no_grad():
        for ex in examples:
            row = []
            ctx = hf_tok.encode(ex["context"])
            for choice in ex["choices"]:
                whole = hf_tok.encode(ex["context"] + " " + choice)
                logp = torch.log_softmax(hf(torch.tensor([whole[:-1]])).logits[0].double(), dim=-1)
                row.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
            ref_lls.append(row)
    assert torch.allclose(torch.tensor(lls), torch.tensor(ref_lls), atol=1e-4, rtol=0)
    argmax = lambda v: max(range(len(v)), key=v.__getitem__)  # noqa: E731
    acc = sum(argmax(r) == ex["label"] for r, ex in zip(ref_lls, examples)) / len(examples)
    acc_norm = sum(argmax([ll / len(c) for ll, c in zip(r, ex["choices"])]) == ex["label"]
                   for r, ex in zip(ref_lls, examples)) / len(examples)
    assert (metrics["acc"], metrics["acc_norm"], metrics["n"]) == (acc, acc_norm, len(examples))
    assert len({tuple(r) for r in lls}) == len(lls) and min(max(r) - min(r) for r in lls) > 1e-2


def test_greedy_generation_equals_transformers_generate_and_recompute(hf_pair):
    _, hf, hf_tok, ours, tok = hf_pair
    for ex in read_gen_examples(SAMPLES / "gen.jsonl")[:3]:
        ids = tok.encode(ex["prompt"])
        assert ids == hf_tok.encode(ex["prompt"])
        ours_out = greedy_generate(ours, ids, 24, eos_id=tok.eos_id)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        assert ours_out == ref[0, len(ids):].tolist()
        assert greedy_generate(ours, ids, 24, eos_id=tok.eos_id, use_cache=False) == ours_out


def test_latent_cache_logits_equal_full_forward(hf_pair):
    """Prefill, then one token, then a chunk of three: each step's logits equal the full forward's."""
    from model.mla import LatentKVCache

    *_, ours, _ = hf_pair
    tokens = torch.randint(0, ours.cfg.vocab_size, (2, 20))
    with torch.no_grad():
        full = ours(tokens)
        cache = LatentKVCache()
        steps = [ours(tokens[:, :16], cache=cache), ours(tokens[:, 16:17], cache=cache),
                 ours(tokens[:, 17:20], cache=cache)]
    assert cache.length() == 20
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_generation_stops_at_stop_string_and_fits_context(hf_pair):
    *_, ours, tok = hf_pair
    prompt = "The keeper of the lighthouse"
    full, full_ids = generate_text(ours, tok, prompt, 20)
    visible = full.strip()
    assert len(visible) >= 4, full
    stop = visible[len(visible) // 2: len(visible) // 2 + 2]
    text, ids = generate_text(ours, tok, prompt, 20, stop_strings=[stop])
    assert text == full[:full.find(stop)] and stop not in text
    assert len(ids) <= len(full_ids) and ids == full_ids[:len(ids)]
    long_prompt = (SAMPLES / "text.txt").read_text()
    text, ids = generate_text(ours, tok, long_prompt, 10, context_length=CONTEXT)
    expected = greedy_generate(ours, tok.encode(long_prompt)[-(CONTEXT - 10):], 10, eos_id=tok.eos_id)
    assert ids == expected
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_text(ours, tok, prompt, CONTEXT, context_length=CONTEXT)


def test_generation_bench_prints_blueprint_line(capsys):
    from bench.generation import main as bench_main

    assert bench_main(["--context", "24", "--new-tokens", "3", "--repeats", "1", "--threads", "1"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert set(line) >= {"bench", "case", "unit", "ours", "peer", "peer_value", "ratio"}
    assert line["outputs_equal"] is True and line["ratio"] == pytest.approx(line["ours"] / line["peer_value"])


def test_answer_extraction_and_normalization():
    assert extract_answer("so 3 * 4 = 12 pens.\n#### 12\nQuestion:") == "12"
    assert normalize_answer(" $1,234. ") == "1234" and normalize_answer("12.0") == "12"
    assert normalize_answer("The  Answer") == "the answer"
    assert answer_matches("reasoning...\n#### 1,200", "#### 1200") == {"exact_match": True,
                                                                      "exact_match_flexible": True}
    assert answer_matches("it is 7, then 12.", "#### 12") == {"exact_match": False, "exact_match_flexible": True}
    assert answer_matches("#### 13", "#### 12")["exact_match_flexible"] is False
    assert answer_matches(" L", "L")["exact_match"]


def test_cli_prints_one_json_line_per_task(hf_pair, capsys, tmp_path):
    hf_dir, *_, ours, tok = hf_pair
    cases = [("bpb", SAMPLES / "text.txt", ["--stride", "16"]),
             ("choice", SAMPLES / "choice.jsonl", ["--batch-size", "4"]),
             ("gen", SAMPLES / "gen.jsonl", ["--max-new-tokens", "6", "--limit", "2"])]
    for task, data, extra in cases:
        samples = tmp_path / f"{task}.jsonl"
        assert eval_main([str(hf_dir), "--task", task, "--data", str(data), "--device", "cpu",
                          "--samples", str(samples), *extra]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == 1
        result = json.loads(lines[0])
        assert result["task"] == task and result["context_length"] == CONTEXT
        if task == "bpb":
            assert result["stride"] == 16 and result["bpb"] > 0
        elif task == "choice":
            expected, _ = evaluate_choice(ours, tok, read_choice_examples(data), CONTEXT)
            assert result["acc"] == expected["acc"] and result["n"] == 8
        else:
            assert result["n"] == 2 and len(samples.read_text().splitlines()) == 2
    assert eval_main([str(hf_dir), "--task", "bpb", "--data", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err


def test_task_files_with_bad_lines_name_the_file_and_line(tmp_path):
    good = {"context": "a", "choices": ["b", "c"], "label": 1}
    path = tmp_path / "task.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n")
    assert [ex["label"] for ex in read_choice_examples(path)] == [1, 1]
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"task\.jsonl:2: not valid JSON"):
        read_choice_examples(path)
    path.write_text(json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(ValueError, match=r"task\.jsonl:1: each line must be an object"):
        read_gen_examples(path)
