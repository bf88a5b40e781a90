"""DualPipeV's overlapped forward and backward (DeepSeek-V3 section 3.2.1, Figure 4).

In DualPipeV's steady phase each rank runs OVERLAP_F_B actions: the forward of one micro-batch on
one of its two stages and the backward of another micro-batch on the other stage. torch's pipelining
runtime runs the two one after the other unless a function is registered for that action type;
`DualPipeOverlap` registers one that runs the backward chunk in a helper thread and the forward
chunk in the calling thread, and hands a *baton* (the right to compute) between them exactly where a
chunk would block on communication:

    forward chunk:   attention, router | counts | shared expert | dispatch wait | experts | combine wait | ...
    backward chunk:  ... | combine^-1 wait | experts^-1, shared expert^-1 | dispatch^-1 wait | router^-1, attention^-1

A chunk holds the baton while it computes (attention, router, shared expert, experts) and gives it away
just before it blocks in a wait: the counts exchange and every all-to-all wait of the MoE layers'
dispatch and combine, forward and backward (`BatonWaitHooks`, the dispatchers' `wait_hooks`, called by
parallel/dispatch_flight.py), and the wait for its pipeline input; it takes the baton back once the data
is there. The attention, dispatch, MLP and combine of the two chunks thus interleave as in Figure 4.
Which chunk waits is told by the thread: the forward chunk runs in the calling thread, everything else
(the backward chunk's autograd, on CPU in the helper thread, on CUDA in autograd's device threads) is
the backward chunk. Outside an overlapped action the hooks do nothing; nothing in `model/` knows of them.

Order of collectives: the two chunks run on different stages, and the upper stage of the V (stages
P..2P-1) talks to its expert-parallel peers over a second communicator with the same ranks (a copy of
the dispatcher whose process groups are replaced by twins). Each communicator is thus used by one
chunk at a time, in program order, on every rank of its group, which is what gloo (and NCCL) need to
match collectives; the two chunks' all-to-alls may be in flight together.

Results are bitwise those of the sequential run: the two chunks write no common tensor (only the
backward accumulates gradients), every operation is the same, and the helper thread computes under
the caller's autocast, intra-op thread count and CUDA device and stream.
"""
from __future__ import annotations

import contextlib
import copy
import threading
from typing import Callable, ContextManager, Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining.schedules import FORWARD, FULL_BACKWARD, OVERLAP_F_B, SEND_B, SEND_F

from model.moe import MoE

from .dispatch import ExpertParallelDispatcher, WaitHooks

FWD, BWD = "F", "B"
COMPUTE, COMM = "compute", "comm"
_WAITING, _DONE = "waiting", "done"


class Baton:
    """Which chunk of an overlapped action may compute. Each side is computing (holds the baton),
    communicating, waiting for the baton, or done; a side that stops computing hands the baton to a
    waiting side at once. `overlaps` counts the times a side got the baton while the other side was
    communicating (one chunk's computation during the other's all-to-all)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.active = False
        self.forward_thread: Optional[int] = None
        self._state: Dict[str, str] = {}
        self._holder: Optional[str] = None
        self.overlaps = 0

    def open(self, first: str) -> None:
        """Start an overlapped action; `first` computes first, the other side waits."""
        with self._cond:
            self.active, self.forward_thread = True, threading.get_ident()
            self._holder = first
            self._state = {first: COMPUTE, _other(first): _WAITING}

    def close(self) -> None:
        with self._cond:
            self.active, self.forward_thread, self._holder = False, None, None
            self._cond.notify_all()

    def switch(self, side: str, step: str) -> None:
        """`side` reaches a boundary: COMM (it stops computing) or COMPUTE (it waits for the baton)."""
        with self._cond:
            if not self.active or self._state.get(side) in (None, _DONE):
                return
            if step == COMM and self._state[side] == COMPUTE:
                self._state[side] = COMM
                self._release(side)
            elif step == COMPUTE and self._state[side] == COMM:
                self._state[side] = _WAITING
                if self._holder is None:
                    self._give(side)
            while self.active and self._state[side] == _WAITING:
                self._cond.wait()

    def finish(self, side: str) -> None:
        """`side` has nothing left to compute (also after an error): hand the baton over."""
        with self._cond:
            if self.active and side in self._state:
                self._state[side] = _DONE
                self._release(side)

    def _release(self, side: str) -> None:
        if self._holder == side:
            self._holder = None
            other = _other(side)
            if self._state[other] == _WAITING:
                self._give(other)

    def _give(self, side: str) -> None:
        self._holder, self._state[side] = side, COMPUTE
        if self._state[_other(side)] == COMM:
            self.overlaps += 1
        self._cond.notify_all()


def _other(side: str) -> str:
    return BWD if side == FWD else FWD


class BatonWaitHooks(WaitHooks):
    """Dispatcher wait hooks: a chunk gives the baton away before it blocks on an all-to-all and takes
    it back after (the forward chunk is the thread that opened the action, any other thread is the
    backward chunk)."""

    def __init__(self, baton: Baton) -> None:
        self.baton = baton

    def _side(self) -> str:
        return FWD if threading.get_ident() == self.baton.forward_thread else BWD

    def before(self) -> None:
        if self.baton.active:
            self.baton.switch(self._side(), COMM)

    def after(self) -> None:
        if self.baton.active:
            self.baton.switch(self._side(), COMPUTE)


def twin_groups_dispatcher(dispatcher, cache: Dict[int, dist.ProcessGroup]):
    """A shallow copy of `dispatcher` whose process groups (attributes, or lists/tuples of them) are
    replaced by new groups of the same ranks; the dispatcher itself when it holds none. Shared state
    (e.g. traffic counters) stays shared. Only the members of a group create its twin, in the order
    they meet its dispatchers, which is the same on every member."""
    def twin(value):
        if isinstance(value, dist.ProcessGroup):
            if id(value) not in cache:
                cache[id(value)] = dist.new_group(dist.get_process_group_ranks(value),
                                                  backend=dist.get_backend(value), use_local_synchronization=True)
            return cache[id(value)]
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, dist.ProcessGroup) for v in value):
            return type(value)(twin(v) for v in value)
        return None

    twins = {name: t for name, value in vars(dispatcher).items() if (t := twin(value)) is not None}
    if not twins:
        return dispatcher
    out = copy.copy(dispatcher)
    for name, value in twins.items():
        setattr(out, name, value)
    return out


def _callers_thread_state(device: torch.device) -> Callable[[], ContextManager[None]]:
    """A context manager factory that re-enters, in another thread, the caller's autocast, intra-op
    thread count and CUDA device and stream (thread-local state that a new thread does not inherit)."""
    casts = [(d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
    cache, n_threads = torch.is_autocast_cache_enabled(), torch.get_num_threads()
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def enter() -> Iterator[None]:
        torch.set_num_threads(n_threads)
        with contextlib.ExitStack() as stack:
            if stream is not None:
                torch.cuda.set_device(device)
                stack.enter_context(torch.cuda.stream(stream))
            for device_type, dtype in casts:
                stack.enter_context(torch.autocast(device_type, dtype=dtype, cache_enabled=cache))
            yield

    return enter


class DualPipeOverlap:
    """Registers the overlapped forward-and-backward with a DualPipeV schedule object.

    `stage_modules` are this rank's pipeline stage modules (with `.stage`), `pp` the pipeline size:
    the MoE layers of stages >= pp get dispatchers on twin communicators, every expert-parallel
    dispatcher gets the baton's wait hooks. `baton.overlaps` counts the hand-offs during communication
    since construction.
    """

    def __init__(self, schedule, stage_modules: Sequence[nn.Module], pp: int):
        if not hasattr(schedule, "register_custom_function"):
            raise RuntimeError(f"parallel.overlap=true needs torch's pipelining runtime with register_custom_function "
                               f"(torch >= 2.10), this is torch {torch.__version__}: set parallel.overlap=false")
        self.baton = Baton()
        self.sends: list = []
        self.early_sends = 0  # sends posted inside an overlapped action, when their chunk was done
        self._sends_after: Optional[Dict[object, list]] = None
        hooks = BatonWaitHooks(self.baton)
        self.moe_layers: Dict[int, List[MoE]] = {}
        cache: Dict[int, dist.ProcessGroup] = {}
        twins: Dict[int, object] = {}
        for module in stage_modules:
            layers = self.moe_layers[module.stage] = [m for m in module.modules() if isinstance(m, MoE)]
            for moe in layers:
                if module.stage >= pp:
                    if id(moe.dispatcher) not in twins:
                        twins[id(moe.dispatcher)] = twin_groups_dispatcher(moe.dispatcher, cache)
                    moe.dispatcher = twins[id(moe.dispatcher)]
                if isinstance(moe.dispatcher, ExpertParallelDispatcher):
                    moe.dispatcher.wait_hooks = hooks
        schedule.register_custom_function(OVERLAP_F_B, self.run)

    def run(self, action, ctx) -> None:
        """The OVERLAP_F_B action: what torch's runtime does for its two sub-actions (wait for the input
        from the neighbouring rank, compute, hand the result to the other local stage), with the
        backward in a helper thread and each chunk waiting for its input without the baton."""
        schedule = ctx.schedule_ref
        fwd, bwd = action.sub_actions
        if fwd.computation_type != FORWARD or bwd.computation_type != FULL_BACKWARD or fwd.stage_index == bwd.stage_index:
            raise RuntimeError(f"overlapped action {action} must pair a forward and a full backward of two stages")
        stages = {s.stage_index: s for s in schedule._stages}
        f_stage, b_stage = stages[fwd.stage_index], stages[bwd.stage_index]
        f_recv = (_received(schedule.fwd_recv_ops, (fwd.stage_index, fwd.microbatch_index), action)
                  if not f_stage.is_first and fwd.stage_index - 1 not in stages else [])
        b_recv = (_received(schedule.bwd_recv_ops, (bwd.stage_index, bwd.microbatch_index), action)
                  if not b_stage.is_last and bwd.stage_index + 1 not in stages else [])
        errors: List[BaseException] = []
        post = self._early_sender(schedule, action, {FWD: (f_stage, fwd.microbatch_index),
                                                     BWD: (b_stage, bwd.microbatch_index)})

        def backward(enter) -> None:
            try:
                with enter():
                    self.baton.switch(BWD, COMPUTE)
                    self._wait(BWD, b_recv)
                    mb = bwd.microbatch_index
                    loss = schedule._maybe_get_loss(b_stage, mb)
                    schedule.backward_counter[bwd.stage_index] += 1
                    last = schedule.backward_counter[bwd.stage_index] == schedule._n_microbatches
                    b_stage.backward_one_chunk(mb, loss=loss, full_backward=True, last_backward=last)
                    if bwd.stage_index - 1 in stages:
                        stages[bwd.stage_index - 1].set_local_bwd_input(b_stage.get_local_bwd_output(mb), mb)
                post(BWD)
            except BaseException as e:  # re-raised in the calling thread
                errors.append(e)
            finally:
                self.baton.finish(BWD)

        b_talks = bool(self.moe_layers.get(bwd.stage_index))
        first = BWD if b_talks or not self.moe_layers.get(fwd.stage_index) else FWD
        self.baton.open(first)
        helper = threading.Thread(target=backward, args=(_callers_thread_state(f_stage.device),),
                                  name="dualpipe-backward", daemon=True)
        helper.start()
        try:
            self.baton.switch(FWD, COMPUTE)
            self._wait(FWD, f_recv)
            mb = fwd.microbatch_index
            out = f_stage.forward_one_chunk(mb, ctx.arg_mbs[mb], ctx.kwarg_mbs[mb])
            schedule._maybe_compute_loss(f_stage, out, ctx.target_mbs, mb)
            if fwd.stage_index + 1 in stages:
                stages[fwd.stage_index + 1].set_local_fwd_input(out, mb)
            post(FWD)
        finally:
            self.baton.finish(FWD)
            helper.join()
            self.baton.close()
        if errors:
            raise errors[0]

    def _early_sender(self, schedule, action, chunks: Dict[str, tuple]) -> Callable[[str], None]:
        """`post(side)`, called when a chunk is done: post the sends that the schedule runs right after
        this action (its SEND_F / SEND_B of the two chunks) as soon as their chunk is done, in the
        schedule's order (point-to-point operations between two ranks match in posting order), so the
        neighbouring rank gets a chunk's output while the other chunk still computes. The schedule's own
        SEND actions then send nothing (the stages' `send_now`)."""
        if self._sends_after is None:
            self._sends_after = _sends_after_overlaps(schedule.pipeline_order_with_comms[schedule.rank])
        owners = []
        for send in self._sends_after.get(action, []):
            side = FWD if send.computation_type == SEND_F else BWD
            stage, mb = chunks[side]
            if send.stage_index != stage.stage_index or send.microbatch_index != mb:
                return lambda side: None
            owners.append(side)
        done: set = set()
        lock = threading.Lock()

        def post(side: str) -> None:
            with lock:
                done.add(side)
                while owners and owners[0] in done:
                    side_done = owners.pop(0)
                    stage, mb = chunks[side_done]
                    self.sends.extend(stage.send_now(side_done, mb))
                    self.early_sends += 1

        return post

    def wait_sends(self) -> None:
        """Wait for the sends posted early in this step (the schedule waits for its own at its end)."""
        works, self.sends = self.sends, []
        for work in works:
            work.wait()

    def _wait(self, side: str, works: list) -> None:
        """Wait for a chunk's pipeline input without the baton: the other chunk computes meanwhile."""
        if works:
            self.baton.switch(side, COMM)
            for work in works:
                work.wait()
            self.baton.switch(side, COMPUTE)


def _sends_after_overlaps(order: list) -> Dict[object, list]:
    """For each OVERLAP_F_B action of a rank's order with communication: the SEND_F / SEND_B actions
    that directly follow it."""
    out: Dict[object, list] = {}
    for i, action in enumerate(order):
        if action is not None and action.computation_type == OVERLAP_F_B:
            sends = []
            for nxt in order[i + 1:]:
                if nxt is None or nxt.computation_type not in (SEND_F, SEND_B):
                    break
                sends.append(nxt)
            out[action] = sends
    return out


def _received(ops: dict, key: tuple, action) -> list:
    """The receive operations (posted earlier by the runtime) that bring a chunk its input."""
    if key not in ops:
        raise RuntimeError(f"overlapped action {action}: stage {key[0]} micro-batch {key[1]} runs before its input "
                           "was received")
    return ops.pop(key)
