"""Pipeline pieces that need no process group: layer split, placement, limits, the stage modules run
back to back in one process against the whole model, schedule action lists and the bubble bench."""
import copy

import pytest
import torch

from bench.pipeline import bench, formula
from model.config import ModelConfig
from model.transformer import Transformer, lm_loss
from parallel.pipeline_schedules import (SCHEDULE_CLASSES, _stand_in_stage, check_microbatches, count_actions,
                                         schedule_actions, simulate)
from parallel.pipeline_stages import (V_SHAPED, LocalModel, StageModule, check_schedule, rank_stages, split_layers,
                                      stage_rank)

CFG = dict(vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=4,
           first_k_dense_replace=1, num_attention_heads=2, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
           topk_group=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
           num_nextn_predict_layers=2)


def test_split_layers_default_explicit_and_errors():
    assert split_layers(4, 4) == [[0], [1], [2], [3]]
    assert split_layers(7, 3) == [[0, 1], [2, 3, 4], [5, 6]]
    assert split_layers(6, 4) == [[0], [1, 2], [3, 4], [5]]
    assert split_layers(5, 2) == [[0, 1, 2], [3, 4]]
    assert split_layers(4, 3, [0, 3, 1]) == [[], [0, 1, 2], [3]]
    with pytest.raises(ValueError, match="num_hidden_layers .3. must be >= the number of pipeline stages"):
        split_layers(3, 4)
    with pytest.raises(ValueError, match="has 2 entries but there are 3 stages"):
        split_layers(4, 3, [2, 2])
    with pytest.raises(ValueError, match="sum to model.num_hidden_layers"):
        split_layers(4, 2, [1, 2])
    with pytest.raises(ValueError, match="every middle stage needs at least one layer"):
        split_layers(4, 3, [2, 0, 2])


def test_schedule_settings_are_checked():
    assert check_schedule("1f1b", 2, None) == 1
    assert check_schedule("interleaved_1f1b", 4, 3) == 3
    assert check_schedule("dualpipev", 2, None) == 2
    for bad, match in [(("gpipe", 2, None), "parallel.schedule must be one of"),
                       (("1f1b", 1, None), "parallel.pp >= 2"),
                       (("1f1b", 2, 2), "needs parallel.schedule=interleaved_1f1b"),
                       (("interleaved_1f1b", 2, 1), "stages_per_rank >= 2"),
                       (("zbv", 2, 3), "exactly 2 stages per rank")]:
        with pytest.raises(ValueError, match=match):
            check_schedule(*bad)
    check_microbatches("dualpipev", 2, 2, 4)
    with pytest.raises(ValueError, match="DualPipeV needs at least as many micro-batches as stages"):
        check_microbatches("dualpipev", 4, 2, 7)
    with pytest.raises(ValueError, match="1F1B needs at least parallel.pp = 4"):
        check_microbatches("1f1b", 4, 1, 3)
    with pytest.raises(ValueError, match="multiple of max.1, n // pp. = 2"):
        check_microbatches("interleaved_1f1b", 2, 2, 5)


@pytest.mark.parametrize("schedule", ["interleaved_1f1b", "zbv", "dualpipev"])
def test_placement_matches_torch_schedules(schedule):
    pp, spr = 4, 2
    stages = [_stand_in_stage(0, pp, pp * spr) for _ in range(spr)]
    sched = SCHEDULE_CLASSES[schedule](stages, 8)
    assert sched.stage_index_to_group_rank == {s: stage_rank(s, pp, schedule) for s in range(pp * spr)}
    assert rank_stages(0, pp, pp * spr, schedule) == ([0, 7] if schedule in V_SHAPED else [0, 4])


def _stage_chain(model, n_stages, v_shaped):
    layout = split_layers(model.cfg.num_hidden_layers, n_stages)
    return [StageModule(model, s, n_stages, layout[s], carry_embedding=not v_shaped, local_mtp_embedding=v_shaped)
            for s in range(n_stages)]


@pytest.mark.parametrize("v_shaped,fused_head_loss", [(False, False), (True, False), (True, True)])
def test_stages_back_to_back_equal_the_whole_model(v_shaped, fused_head_loss):
    """Loss values and every gradient of the chained stage modules equal lm_loss on the whole model
    (plain head loss); with `fused_head_loss` the last stage computes them without logits."""
    cfg = ModelConfig(**CFG)
    model = Transformer(cfg)
    whole = copy.deepcopy(model)
    model.fused_head_loss = fused_head_loss
    head_calls = []
    model.lm_head.register_forward_hook(lambda *args: head_calls.append(1))
    tokens = torch.randint(0, cfg.vocab_size, (3, 11))
    ref = lm_loss(whole, tokens)
    (ref["loss"] + 0.3 * ref["mtp_loss"]).backward()
    chain = _stage_chain(model, 4, v_shaped)
    labels = tokens[:, 1:]
    acts = (tokens[:, :-1],)
    for stage in chain:
        out = stage(*acts, labels=labels)
        acts = out if isinstance(out, tuple) else (out,)
    losses = acts[0]
    (losses[0] + 0.3 * losses[1]).backward()
    torch.testing.assert_close(losses, torch.stack([ref["loss"], ref["mtp_loss"]]).detach(), rtol=0, atol=1e-6)
    want = dict(whole.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name].grad, rtol=1e-5, atol=1e-7, msg=name)
    assert bool(head_calls) != fused_head_loss


def test_stage_modules_keep_the_model_names():
    cfg = ModelConfig(**CFG)
    model = Transformer(cfg)
    full = set(model.state_dict())
    chain = _stage_chain(model, 4, v_shaped=True)
    rank0 = LocalModel(model, [chain[0], chain[3]])
    rank1 = LocalModel(model, [chain[1], chain[2]])
    names0, names1 = set(rank0.state_dict()), set(rank1.state_dict())
    assert names0 | names1 == full
    assert names0 & names1 == set()
    assert "embed_tokens.weight" in names0 and "lm_head.weight" in names0 and "mtp.1.eh_proj.weight" in names0
    assert {n.split(".")[1] for n in names1 if n.startswith("layers.")} == {"1", "2"}


def test_action_lists_and_simulation():
    actions = schedule_actions("1f1b", 4, 8)
    assert [str(a) for a in actions[3][:4]] == ["3F0", "3B0", "3F1", "3B1"]
    assert [str(a) for a in actions[0][:5]] == ["0F0", "0F1", "0F2", "0F3", "0B0"]
    for schedule, spr in [("1f1b", 1), ("interleaved_1f1b", 2), ("zbv", 2), ("dualpipev", 2)]:
        counts = count_actions(schedule_actions(schedule, 4, 8))
        work = counts.get("F", 0), counts.get("B", 0) + counts.get("I", 0), counts.get("B", 0) + counts.get("W", 0)
        assert work == (32 * spr,) * 3, (schedule, counts)
    sim = simulate(actions, 4)
    assert sim["makespan"] == 8 * 3 + 3 * 3 and sim["bubble_per_rank"] == 9.0


def test_bubble_bench_rows():
    rows = {row["case"].split()[0]: row for row in bench(4, 8)}
    assert set(rows) == {"1f1b", "interleaved_1f1b", "zbv", "dualpipev"}
    assert rows["1f1b"]["ours"] == pytest.approx(9 / 33) and rows["1f1b"]["ratio"] == pytest.approx(1.0)
    assert rows["interleaved_1f1b"]["ours"] == pytest.approx(rows["interleaved_1f1b"]["peer_value"])
    assert rows["zbv"]["ours"] < rows["interleaved_1f1b"]["ours"] < rows["1f1b"]["ours"]
    assert rows["dualpipev"]["ours"] < rows["1f1b"]["ours"]
    assert formula("dualpipev", 4)["bubble"] == 3 * (3 + 2 - 3)
    for row in rows.values():
        assert set(row) == {"bench", "case", "unit", "ours", "peer", "peer_value", "ratio"}
