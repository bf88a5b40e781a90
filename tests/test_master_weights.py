"""Master weights in one process (parallel/data_parallel.py, training/cpu_adam.py): bf16 parameters
accumulate their gradients in fp32 and are stepped through fp32 masters exactly like fp32 parameters;
DeepSpeed's CPU Adam (the offload optimizer) matches torch's AdamW and round-trips the by-name state."""
import pytest
import torch
from torch import nn

from parallel.data_parallel import Zero1
from parallel.mesh import ParallelLayout
from training.optim import AdamW

HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def test_bf16_gradients_accumulate_in_fp32():
    """Two micro-batches with gradients 1 and 2^-9: a bf16 sum loses the second, fp32 keeps it."""
    ones = torch.ones(4)
    bf16_sum = nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    for scale in (1.0, 2.0 ** -9):
        (bf16_sum * ones.bfloat16() * scale).sum().backward()
    assert torch.equal(bf16_sum.grad.float(), ones)  # the premise: autograd's bf16 accumulation drops 2^-9

    p = nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    zero = Zero1([("w.weight", p)], ParallelLayout(), lambda named: AdamW(named, moments_dtype="fp32", **HYPER),
                 shard=False)
    for scale in (1.0, 2.0 ** -9):
        (p * ones.bfloat16() * scale).sum().backward()
        assert p.grad is None  # the bf16 gradient is dropped once added to the fp32 buffer
    zero.reduce_gradients()
    assert zero.shards[0].grad.dtype == torch.float32
    assert torch.equal(zero.shards[0].grad, ones * (1 + 2.0 ** -9))


def test_bf16_params_step_like_fp32_params():
    """Same fp32 gradients (bf16-exact values): the fp32 masters follow an fp32 model bit for bit, the
    bf16 parameters are those masters rounded, and the checkpoint's master state is the fp32 weight."""
    torch.manual_seed(0)
    init = {"a.weight": torch.randn(6, 5).bfloat16().float(), "a.bias": torch.randn(6).bfloat16().float()}
    ref = {n: nn.Parameter(t.clone()) for n, t in init.items()}
    low = {n: nn.Parameter(t.bfloat16()) for n, t in init.items()}
    ref_opt = AdamW(ref.items(), moments_dtype="fp32", **HYPER)
    zero = Zero1(low.items(), ParallelLayout(), lambda named: AdamW(named, moments_dtype="fp32", **HYPER),
                 shard=False)
    for _ in range(3):
        grads = {n: torch.randn_like(t).bfloat16().float() for n, t in init.items()}
        for n in init:
            ref[n].grad = grads[n].clone()
            (low[n] * grads[n].bfloat16()).sum().backward()
        ref_opt.step()
        zero.reduce_gradients()
        zero.step()
        zero.zero_grad()
    masters = zero.master_state()
    for n in init:
        assert torch.equal(masters[n], ref[n].detach())
        assert torch.equal(low[n].detach(), ref[n].detach().bfloat16())
        assert not torch.equal(low[n].detach().float(), ref[n].detach())  # masters carry more than bf16


def test_cpu_adamw_matches_torch_adamw_and_round_trips_state():
    """DeepSpeed's kernel (adamw_mode) against torch.optim.AdamW on the same fp32 tensors; its state
    loads into training.optim.AdamW and back."""
    from training.cpu_adam import CPUAdamW

    torch.manual_seed(1)
    init = {"layers.0.w.weight": torch.randn(64, 33), "norm.weight": torch.randn(64)}
    ours = {n: nn.Parameter(t.clone()) for n, t in init.items()}
    theirs = {n: nn.Parameter(t.clone()) for n, t in init.items()}
    opt = CPUAdamW(ours.items(), **HYPER)
    ref = torch.optim.AdamW([{"params": [theirs["layers.0.w.weight"]], "weight_decay": 0.1},
                             {"params": [theirs["norm.weight"]], "weight_decay": 0.0}],
                            lr=HYPER["lr"], betas=HYPER["betas"], eps=HYPER["eps"])
    order = []
    for _ in range(5):
        for n in init:
            g = torch.randn_like(init[n])
            ours[n].grad, theirs[n].grad = g.clone(), g.clone()
        opt.step(before=lambda p: order.append(("before", p)), after=lambda p: order.append(("after", p)))
        ref.step()
    for n in init:
        torch.testing.assert_close(ours[n].detach(), theirs[n].detach(), rtol=1e-6, atol=1e-6)
    assert [kind for kind, _ in order[:4]] == ["before", "after", "before", "after"]

    state = opt.state_dict()
    assert int(state["step"]) == 5 and state["exp_avg"]["norm.weight"].dtype == torch.float32
    plain = AdamW([(n, nn.Parameter(t.clone())) for n, t in init.items()], moments_dtype="fp32", **HYPER)
    plain.load_state_dict(state)
    again = CPUAdamW([(n, nn.Parameter(t.clone())) for n, t in init.items()], **HYPER)
    again.load_state_dict(plain.state_dict())
    for key in ("exp_avg", "exp_avg_sq"):
        for n in init:
            assert torch.equal(again.state_dict()[key][n], state[key][n])
    assert int(again.step_count) == 5


def test_adamw_refuses_low_precision_parameters():
    with pytest.raises(ValueError, match="Zero1"):
        AdamW([("w", nn.Parameter(torch.zeros(2, dtype=torch.bfloat16)))], lr=1e-3)


@pytest.mark.parametrize("param_dtype, moments_dtype, offload", [("fp32", "bf16", False), ("bf16", "bf16", False),
                                                                 ("bf16", "fp32", False), ("fp32", "fp32", True),
                                                                 ("bf16", "fp32", True)])
def test_state_bytes_per_element_is_what_zero1_allocates(param_dtype, moments_dtype, offload):
    """The per-element figure a memory estimate uses equals the bytes Zero1 really allocates for its
    masters, the inner optimizer's moments and (offload) the host gradients, per shard element."""
    from parallel.data_parallel import state_bytes_per_element
    from training.cpu_adam import CPUAdamW

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[param_dtype]
    params = [("a.weight", nn.Parameter(torch.zeros(8, 4, dtype=dtype))), ("b", nn.Parameter(torch.zeros(3, dtype=dtype)))]
    make = (lambda named: CPUAdamW(named, **HYPER)) if offload else \
        (lambda named: AdamW(named, moments_dtype=moments_dtype, **HYPER))
    zero = Zero1(params, ParallelLayout(), make, shard=False, offload=offload)
    elements = sum(p.numel() for _, p in params)
    held = sum(t.numel() * t.element_size() for s in zero.optimizer.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))
    held += sum(s.numel() * s.element_size() for s, sep in zip(zero.shards, zero.separate) if sep)
    held += sum(g.numel() * g.element_size() for g in zero.host_grads)
    expected = state_bytes_per_element(param_dtype, moments_dtype, offload)
    assert held == (expected["host"] if offload else expected["device"]) * elements
