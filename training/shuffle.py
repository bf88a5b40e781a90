"""Sequence-level shuffling of a packed stream, one block at a time, deterministic and resumable.

`data.PackedDataset` shuffles documents, then serves consecutive windows of the packed stream, so a
long document fills many consecutive batches (the standard library's `pydoc_data/topics.py` alone
is ~100 batches of the default job), and consecutive optimizer steps see strongly correlated data.
Large-scale loaders avoid this with a shuffle index over all sequences of an epoch (Megatron-LM's
GPT dataset); `BlockShuffle` is its bounded-memory form: it reads the next `block` sequences of the
stream and serves them in the order `default_rng([seed, block number]).permutation(block)`.

The order of sequences does not depend on the data-parallel layout: every rank reads the same block
and keeps rows r*n .. (r+1)*n-1 of each global batch (n = global batch / dp_world), as
`PackedDataset` does. The state is the inner dataset's state at the start of the current block plus
the block number and the position in it; restoring re-reads the block.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np
import torch


class BlockShuffle:
    """`next_batch(global_batch)` over `dataset` (built with dp_world=1), shuffled in blocks of `block` sequences."""

    def __init__(self, dataset, block: int, seed: int, dp_rank: int = 0, dp_world: int = 1):
        if block < 1:
            raise ValueError(f"shuffle block must be >= 1 sequence, got {block}")
        self.dataset, self.block, self.seed = dataset, block, seed
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self._block_start: Dict[str, Any] = dataset.state_dict()
        self._index = -1  # number of the block in memory (-1: none read yet)
        self._position = block
        self._rows: Optional[torch.Tensor] = None
        self._order: Optional[torch.Tensor] = None

    def _read_block(self) -> None:
        """Read block `self._index` from the inner dataset, which stands at that block's start."""
        self._block_start = self.dataset.state_dict()
        self._rows = self.dataset.next_batch(self.block)
        self._order = torch.from_numpy(np.random.default_rng([self.seed, self._index]).permutation(self.block))

    def next_batch(self, global_batch: int) -> torch.Tensor:
        """This rank's rows of the next `global_batch` shuffled sequences: [global_batch // dp_world, S+1]."""
        if global_batch < 1 or global_batch % self.dp_world:
            raise ValueError(f"global_batch={global_batch} must be a positive multiple of dp_world={self.dp_world}")
        parts, needed = [], global_batch
        while needed:
            if self._position == self.block:
                self._index += 1
                self._read_block()
                self._position = 0
            take = min(needed, self.block - self._position)
            parts.append(self._rows[self._order[self._position:self._position + take]])
            self._position += take
            needed -= take
        n = global_batch // self.dp_world
        return torch.cat(parts)[self.dp_rank * n:(self.dp_rank + 1) * n]

    def state_dict(self) -> Dict[str, Any]:
        """JSON-serializable: the block's start in the inner stream, the block number and position."""
        return {"block_start": self._block_start, "block_index": self._index, "position": self._position,
                "block": self.block, "seed": self.seed}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key, mine in (("block", self.block), ("seed", self.seed)):
            if int(state[key]) != mine:
                raise ValueError(f"data state has shuffle {key}={state[key]} but this run has {key}={mine}")
        self.dataset.load_state_dict(state["block_start"])
        self._index, self._position = int(state["block_index"]), int(state["position"])
        if self._index >= 0:
            self._read_block()
        else:
            self._block_start = self.dataset.state_dict()
