"""Batches built one step ahead (training/prefetch.py): the same rows, sizes and checkpoint positions
as taking them from the dataset directly, also when the next batch size changes or a checkpoint is
loaded in between."""
import torch

from training.prefetch import BatchPrefetcher


class Counting:
    """Rows i, i+1, ... of a numbered stream; its position is the next row."""

    def __init__(self):
        self.pos = 0

    def next_batch(self, n):
        rows = torch.arange(self.pos, self.pos + n).unsqueeze(1).repeat(1, 3)
        self.pos += n
        return rows

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


def test_prefetched_batches_equal_direct_ones_and_positions_stay_exact():
    direct, ahead = Counting(), BatchPrefetcher(Counting(), torch.device("cpu"))
    sizes = [2, 2, 4, 4, 3]
    for i, n in enumerate(sizes):
        got = ahead.take(n)
        if i + 1 < len(sizes):
            ahead.ahead(sizes[i + 1] if i != 2 else 5)  # step 3 guesses a wrong size: rebuilt on take
        assert torch.equal(got, direct.next_batch(n))
        assert ahead.state_dict() == direct.state_dict()
    ahead.close()
    assert ahead.dataset.state_dict() == direct.state_dict()


def test_loading_a_position_drops_the_batch_built_ahead():
    ahead = BatchPrefetcher(Counting(), torch.device("cpu"))
    ahead.take(4)
    ahead.ahead(4)
    ahead.load_state_dict({"pos": 1})
    assert ahead.take(2)[:, 0].tolist() == [1, 2] and ahead.state_dict() == {"pos": 3}
    ahead.close()


class RankShare(Counting):
    """This rank's half of each global batch (dp = 2), counting how often a batch is built."""

    def __init__(self):
        super().__init__()
        self.built = 0

    def next_batch(self, n):
        self.built += 1
        return super().next_batch(n // 2)


def test_a_ranks_share_is_not_mistaken_for_a_wrong_size():
    ahead = BatchPrefetcher(RankShare(), torch.device("cpu"))
    for _ in range(3):
        assert ahead.take(8).shape[0] == 4
        ahead.ahead(8)
    ahead.close()
    assert ahead.dataset.built == 4 and ahead.dataset.pos == 12  # 3 taken + 1 built ahead, rewound at close
