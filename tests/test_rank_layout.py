"""Acceptance: the report's layout of `v3_671b` (pp=16 DualPipeV x ep=64 x dp=2) built rank by rank on
the meta device with the trainer's rank construction (parallel/rank_model.py, no process group):
every rank would materialize exactly the parameters the memory planner counts for it
(parallel/memory.py), only the layers of its own stages and only its own 1/64 of the routed experts.
Under DualPipeV the first stage and the last (with the head and the MTP module) are both on pipeline
rank 0, which therefore holds one embedding and one head, shared with the MTP module."""
import pytest

from model.summary import load_model_config
from parallel.expert_parallel import is_expert_param
from parallel.memory import Layout, pipeline_stages, rank_param_counts
from parallel.rank_model import build_rank_model

LAYOUT = Layout(pp=16, ep=64, dp=2, schedule="dualpipev", precision="fp8", fused_head_loss=True)


@pytest.mark.parametrize("pp_rank,ep_rank", [(0, 0), (7, 13), (15, 63)])
def test_each_rank_of_the_reports_layout_holds_what_the_planner_counts(pp_rank, ep_rank):
    cfg, _ = load_model_config("v3_671b")
    rank = build_rank_model(cfg, seed=0, device="meta", pp=LAYOUT.pp, pp_rank=pp_rank, ep=LAYOUT.ep,
                            ep_rank=ep_rank, schedule=LAYOUT.schedule, fp8=True)
    params = rank.named_parameters()
    counts = rank_param_counts(cfg, LAYOUT)[pp_rank]
    assert all(p.is_meta for p in params.values())
    assert rank.numel() == counts["dense"] + counts["experts"]
    assert sum(p.numel() for n, p in params.items() if is_expert_param(n)) == counts["experts"]
    own = {i for stage in pipeline_stages(cfg, LAYOUT)[pp_rank] for i in stage}
    assert {int(n.split(".")[1]) for n in params if n.startswith("layers.")} == own
    ends = {n.split(".")[0] for n in params if not n.startswith("layers.")}
    assert ends == ({"embed_tokens", "norm", "lm_head", "mtp"} if pp_rank == 0 else set())
    per_rank = cfg.n_routed_experts // LAYOUT.ep
    offsets = {n: o for n, o in rank.expert_offsets().items() if n in params}
    assert offsets and set(offsets.values()) == {ep_rank * per_rank}
    assert all(params[n].shape[0] == per_rank for n in offsets)
