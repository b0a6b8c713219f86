"""What a model sees of context parallelism: this rank's chunks of each sequence, their global
positions, and attention over the whole sequence's keys and values.

The sequence of every microbatch is split over the cp ranks (`parallel.cp`), so every activation
is the chunk's; only attention needs the other chunks, which the back end of `parallel.cp_comm`
brings: a ring of key/value blocks passed rank to rank (`ring`), the keys and values all-gathered
(`all_gather`), or heads exchanged for sequence by all-to-all (`a2a`, DeepSpeed-Ulysses). With
causal load balancing (`parallel.cp_balance`) the sequence is cut into 2·cp chunks and rank i
holds chunks i and 2·cp − 1 − i, so every rank attends over as many (query, key) pairs. The
kernels are in `parallel.context_parallel`; a sharding (`civetta.nn.DenseSharding`) holds one of
these and asks it for positions and attention.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from civetta import meta
from civetta.tensor import Tensor
from parallel.comm import Group


class ContextShard:
    """This rank's part of context parallelism over `group`, with back end `comm`."""

    def __init__(self, group: Group, comm: str, balance: bool) -> None:
        from parallel import context_parallel as cp

        self.group, self.comm, self.balance = group, comm, balance
        self._attention = {
            "ring": cp.ring_attention,
            "all_gather": cp.all_gather_attention,
            "a2a": cp.ulysses_attention,
        }[comm]
        self._positions = cp.chunk_positions
        self._slice = cp.local_slice

    def positions(self, block: int) -> np.ndarray:
        """Global positions of the `block` tokens this rank holds of each sequence."""
        return self._positions(block * self.group.size, self.group.size, self.group.rank,
                               self.balance)  # fmt: skip

    def local_tokens(self, x: Any) -> Any:
        """This rank's chunks of (B, T) token ids or targets, real or data-free."""
        if meta.is_meta(x):
            shape = (*x.shape[:-1], x.shape[-1] // self.group.size)
            return meta.asarray(meta.token_ids(shape))
        return self._slice(np.asarray(x), self.group.size, self.group.rank, self.balance, axis=1)

    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Causal attention of this rank's queries over every chunk's keys and values."""
        return self._attention(q, k, v, self.group, self.positions(q.shape[2]), causal=True)
