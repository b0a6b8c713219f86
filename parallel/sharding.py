"""How a tensor-parallel parameter is cut into shards, as pure functions of the full array.

A placement is (axis, packed): the parameter is split along `axis` into equal parts, one per tp
rank; with `packed` > 1 the axis holds that many equal blocks (q, k, v) and each block is split
on its own, so rank r holds part r of every block. Checkpoints use these to put shards back
together and to cut them again for another layout.
"""

from __future__ import annotations

import numpy as np

Placement = tuple[int, int]  # (axis, packed blocks)


def take_shard(full: np.ndarray, placement: Placement, rank: int, size: int) -> np.ndarray:
    """Rank `rank`'s shard of `full` (a copy)."""
    axis, packed = placement
    blocks = np.split(full, packed, axis=axis)
    return np.concatenate([np.split(block, size, axis=axis)[rank] for block in blocks], axis=axis)


def join_shards(shards: list[np.ndarray], placement: Placement) -> np.ndarray:
    """The full array from every rank's shard, in tp-rank order."""
    axis, packed = placement
    if packed == 1:
        return np.concatenate(shards, axis=axis)
    parts = [np.split(shard, packed, axis=axis) for shard in shards]
    return np.concatenate([part[i] for i in range(packed) for part in parts], axis=axis)
