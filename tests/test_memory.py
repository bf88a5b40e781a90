"""Memory per GPU of a layout (parallel/memory.py, model/memory.py): parameter placement against the
real pipeline stages of a meta-device model, EP and ZeRO-1 sharding, parameter dtypes, micro-batches
in flight against the schedules' own action lists, activations against saved-tensor bytes, errors."""
import pytest
import torch

from model.memory import GIB, activation_bytes_per_token, head_bytes_per_token
from model.summary import load_model_config
from model.transformer import Transformer
from parallel.expert_parallel import is_expert_param
from parallel.memory import (Layout, _forward_backward_order, held_microbatches, memory_per_gpu,
                             rank_memory, rank_param_counts)
from parallel.pipeline_stages import LocalModel, StageModule, rank_stages, split_layers


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


def test_single_gpu_bytes_per_parameter():
    cfg, _ = load_model_config("tiny")
    params = _unique_params(_meta_model(cfg))
    numel = sum(p.numel() for _, p in params)
    [counts] = rank_param_counts(cfg, Layout())
    assert counts["dense"] + counts["experts"] == numel
    skip = ("embed_tokens.", "norm", "layernorm", "mlp.gate.weight")
    assert counts["gemm"] == sum(p.numel() for n, p in params if not any(s in n for s in skip))
    mem = memory_per_gpu(cfg, Layout(precision="bf16"))["memory_breakdown"]
    assert mem["params_gib"] * GIB == 4 * numel  # fp32 parameters are their own master weights
    assert mem["weight_copies_gib"] * GIB == 2 * counts["gemm"]  # autocast's bf16 copies
    assert mem["grads_gib"] * GIB == 4 * numel
    assert mem["optimizer_gib"] * GIB == 4 * numel  # two bf16 moments
    fp8 = memory_per_gpu(cfg, Layout(precision="fp8", fused_head_loss=True))["memory_breakdown"]
    head = cfg.vocab_size * cfg.hidden_size  # kept in bf16, cast per chunk by the fused head loss
    assert fp8["weight_copies_gib"] * GIB == pytest.approx((2 + 8 / 128 ** 2) * (counts["gemm"] - head))
    half = memory_per_gpu(cfg, Layout(precision="fp8", param_dtype="bf16"))["memory_breakdown"]
    assert half["params_gib"] * GIB == 2 * numel and half["grads_gib"] * GIB == 4 * numel
    assert half["optimizer_gib"] * GIB == 8 * numel  # fp32 master weight + two bf16 moments


@pytest.mark.parametrize("schedule,spr", [("1f1b", 1), ("interleaved_1f1b", 2), ("dualpipev", 2)])
@pytest.mark.parametrize("ep", [1, 2])
def test_pipeline_ranks_hold_what_the_stages_hold(schedule, spr, ep):
    cfg, _ = load_model_config("tiny")
    layout = Layout(pp=2, ep=ep, schedule=schedule)
    got = [{k: c[k] for k in ("dense", "experts")} for c in rank_param_counts(cfg, layout)]
    assert got == _reference_rank_counts(cfg, 2, ep, schedule, spr)


def test_dualpipev_puts_embedding_and_head_on_rank_0():
    cfg, _ = load_model_config("tiny")
    counts = rank_param_counts(cfg, Layout(pp=2, schedule="dualpipev"))
    vocab = cfg.vocab_size * cfg.hidden_size
    assert counts[0]["dense"] - counts[1]["dense"] > 2 * vocab - vocab // 2


def test_ep_halves_the_routed_experts_and_zero_shards_the_optimizer():
    cfg, _ = load_model_config("tiny")
    one, two = rank_param_counts(cfg, Layout(ep=1))[0], rank_param_counts(cfg, Layout(ep=2))[0]
    assert two["dense"] == one["dense"]
    assert 2 * two["experts"] == one["experts"] > 0
    m1 = memory_per_gpu(cfg, Layout(ep=1, zero=False))["memory_breakdown"]
    m2 = memory_per_gpu(cfg, Layout(ep=2, zero=False))["memory_breakdown"]
    assert (m1["params_gib"] - m2["params_gib"]) * GIB == 4 * one["experts"] / 2
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
    assert got["memory_breakdown"]["activations_gib"] * GIB == [rank0, rank1][got["layout"]["peak_pp_rank"]]
    bf16 = activation_bytes_per_token(cfg, 3, "fp8", "bf16")
    assert activation_bytes_per_token(cfg, 3, "fp8") - bf16 == 2 * 2 * cfg.hidden_size  # two norms keep the residual
    assert head_bytes_per_token(cfg, "fp8", True) == 2 * cfg.hidden_size + 8


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved_1f1b", "zbv", "dualpipev"])
def test_micro_batches_in_flight_come_from_the_schedule(schedule):
    """The peak is walked on the schedule's own action lists; it stops growing at 2 x stages
    micro-batches (what the estimate walks when train.global_batch is not given), and 1F1B's
    closed form equals its executed order."""
    pp, weights = 4, [1.0, 10.0, 100.0, 1000.0, 1e4, 1e5, 1e6, 1e7]
    n_stages = pp * (1 if schedule == "1f1b" else 2)
    short = Layout(pp=pp, schedule=schedule)
    for n in (2 * n_stages, 4 * n_stages):
        layout = Layout(pp=pp, schedule=schedule, global_batch=n)
        assert held_microbatches(layout, weights[:n_stages]) == held_microbatches(short, weights[:n_stages])
    if schedule == "1f1b":
        walked = []
        for order in _forward_backward_order("1f1b", pp, None, 2 * n_stages):
            held = peak = 0
            for sign, _ in order:
                held += sign
                peak = max(peak, held)
            walked.append(peak)
        assert walked == [pp - r for r in range(pp)]


def test_fp8_caches_less_than_bf16():
    cfg, _ = load_model_config("v3_671b")
    assert activation_bytes_per_token(cfg, 10, "fp8") < activation_bytes_per_token(cfg, 10, "bf16")


@pytest.mark.parametrize("layout,message", [
    (Layout(ep=3), "parallel.ep"),
    (Layout(pp=8), "num_hidden_layers"),
    (Layout(pp=2, schedule="gpipe"), "parallel.schedule"),
    (Layout(dp=0), "parallel.dp"),
    (Layout(precision="fp16"), "precision"),
    (Layout(precision="fp32", param_dtype="bf16"), "precision.param_dtype"),
    (Layout(pp=2, schedule="dualpipev", global_batch=2), "DualPipeV"),
    (Layout(dp=2, global_batch=3), "train.global_batch"),
])
def test_impossible_layouts_raise_clear_errors(layout, message):
    cfg, _ = load_model_config("tiny")
    with pytest.raises(ValueError, match=message):
        memory_per_gpu(cfg, layout)


@pytest.mark.parametrize("param_dtype", ["fp32", "bf16"])
def test_fp8_activation_formula_matches_saved_tensors(param_dtype):
    """The per-layer formula against the bytes autograd really keeps (bench.activation_memory's
    saved-tensor hooks) for the FP8 recipe on tiny: Transformer blocks, main layers and MTP block;
    with bf16 parameters the residual stream is bf16 too."""
    from bench.activation_memory import build, per_token
    cfg, _ = load_model_config("tiny")
    model = build(cfg, recipe=True)
    if param_dtype == "bf16":
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    measured = per_token(model, seq_len=64)["blocks"]
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    formula = sum(activation_bytes_per_token(cfg, i, "fp8", param_dtype) for i in range(layers))
    assert abs(formula / measured - 1) < 0.02, (formula, measured)  # measured: 0.1%


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from train_helpers import build_corpus
    return build_corpus(tmp_path_factory.mktemp("corpus"))


SMALL_2_LAYERS = ["model.num_hidden_layers=2", "model.n_routed_experts=8", "model.n_group=2", "model.topk_group=1"]


def _bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors`."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


@pytest.mark.parametrize("model_name,extra", [("tiny", []), ("small", SMALL_2_LAYERS)])
@pytest.mark.parametrize("precision,param_dtype", [("fp8", "fp32"), ("bf16", "fp32"), ("fp8", "bf16")])
def test_estimated_state_bytes_equal_what_the_trainer_holds(corpus, model_name, extra, precision, param_dtype):
    """One step of the trainer (training/loop.py `Trainer`, one process): the bytes of its parameters,
    of its gradients when they are reduced (fp32 `.grad`, or the fp32 accumulation buffers of bf16
    parameters), and of the optimizer state after the step (moments, separate fp32 masters) equal
    the estimate's params, grads and optimizer columns for the same settings. `small` runs with 2
    layers and 8 experts (its full size does not suit a test machine)."""
    from train_helpers import job_args
    from training.config import compose_job, validate
    from training.distributed import Dist
    from training.inputs import prepare_inputs
    from training.loop import Trainer

    cfg = compose_job([*job_args(corpus, "unused"), f"model={model_name}", *extra, f"precision={precision}",
                       f"precision.param_dtype={param_dtype}", f"model.vocab_size={corpus['vocab_size']}",
                       "train.seq_len=32", "train.global_batch=2", "train.micro_batch=1"])
    mcfg = validate(cfg)
    trainer = Trainer(cfg, mcfg, Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu")),
                      prepare_inputs(cfg, mcfg))
    zero = trainer.par.zero if trainer.par is not None else None
    params = list(trainer.model.parameters())
    seen = {}

    def counting(fn):
        def wrapped(*args, **kwargs):
            grads = [p.grad for p in params if p.grad is not None]
            seen["grads"] = _bytes(grads + (list(zero.accumulated.values()) if zero is not None else []))
            return fn(*args, **kwargs)
        return wrapped

    if zero is not None:
        zero.reduce_gradients = counting(zero.reduce_gradients)
    else:
        trainer.optimizer.step = counting(trainer.optimizer.step)
    trainer.step()
    inner = zero.optimizer if zero is not None else trainer.optimizer
    state = [t for s in inner.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim]
    if zero is not None:
        state += [shard for shard, separate in zip(zero.shards, zero.separate) if separate]
    layout = Layout(precision=precision, fused_head_loss=bool(cfg.precision.fused_head_loss), param_dtype=param_dtype,
                    moments_dtype=cfg.optim.moments_dtype, zero=False, seq_len=32)
    [row] = rank_memory(mcfg, layout)
    if precision == "fp8":  # kernels/weights.py: FP8 weight + transposed copy, kept between steps
        copies = [t for p in params if hasattr(p, "_fp8_weight") for t in p._fp8_weight[1]]
        assert _bytes(copies) == pytest.approx(row["weight_copies_gib"] * GIB, rel=0.01)
    assert _bytes(params) == row["params_gib"] * GIB
    assert seen["grads"] == row["grads_gib"] * GIB
    assert _bytes(state) == row["optimizer_gib"] * GIB
