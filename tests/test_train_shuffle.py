"""BlockShuffle: a permutation of the stream's sequences per block, the same for any data-parallel
layout, and resumable mid-block."""
import pytest
import torch

from training.shuffle import BlockShuffle

SEQ = 4


class Stream:
    """Sequence k of the stream is [k*SEQ, ..., k*SEQ + SEQ] (like PackedDataset with dp_world=1)."""

    def __init__(self):
        self.k = 0

    def next_batch(self, n):
        rows = torch.arange(self.k, self.k + n)[:, None] * SEQ + torch.arange(SEQ + 1)
        self.k += n
        return rows

    def state_dict(self):
        return {"k": self.k}

    def load_state_dict(self, state):
        self.k = state["k"]


def test_each_block_is_a_permutation_of_the_stream():
    shuffled = BlockShuffle(Stream(), block=10, seed=3)
    rows = torch.cat([shuffled.next_batch(4) for _ in range(5)])  # two whole blocks
    firsts = (rows[:, 0] // SEQ).tolist()
    assert sorted(firsts[:10]) == list(range(10)) and sorted(firsts[10:]) == list(range(10, 20))
    assert firsts[:10] != list(range(10)) and firsts[:10] != [k - 10 for k in firsts[10:]]
    assert torch.equal(rows[:, 1:] - rows[:, :-1], torch.ones(20, SEQ, dtype=torch.long))


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_split_the_single_process_batch(world):
    single = BlockShuffle(Stream(), block=6, seed=0)
    ranks = [BlockShuffle(Stream(), block=6, seed=0, dp_rank=r, dp_world=world) for r in range(world)]
    for _ in range(4):
        assert torch.equal(torch.cat([r.next_batch(8) for r in ranks]), single.next_batch(8))


def test_state_restore_continues_exactly():
    a = BlockShuffle(Stream(), block=7, seed=1)
    for _ in range(3):
        a.next_batch(3)
    state = a.state_dict()
    b = BlockShuffle(Stream(), block=7, seed=1)
    b.load_state_dict(state)
    for _ in range(5):
        assert torch.equal(a.next_batch(3), b.next_batch(3))
    fresh = BlockShuffle(Stream(), block=7, seed=1)
    fresh.load_state_dict(BlockShuffle(Stream(), block=7, seed=1).state_dict())
    assert torch.equal(fresh.next_batch(3), BlockShuffle(Stream(), block=7, seed=1).next_batch(3))
    with pytest.raises(ValueError, match="shuffle block=7 but this run has block=8"):
        BlockShuffle(Stream(), block=8, seed=1).load_state_dict(state)
