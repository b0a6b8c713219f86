"""Data parallelism: each rank of the dp group takes a slice of the global batch, and the
gradients are averaged once per step, after the last microbatch.

Gradients are packed into flat buckets of at most `bucket_mb` megabytes, in reverse parameter
order (the order backward produces them, so a real framework could start each all-reduce while
the rest of backward runs), and each bucket is all-reduced in place.
"""

from __future__ import annotations

import numpy as np

from civetta import meta
from parallel.comm import Group

MB = 1 << 20


def plan_buckets(sizes: list[tuple[str, int]], cap_bytes: int) -> list[list[str]]:
    """Group (name, nbytes) pairs, taken in reverse order, into buckets of at most `cap_bytes`
    (a parameter larger than the cap gets a bucket of its own)."""
    buckets: list[list[str]] = []
    current: list[str] = []
    filled = 0
    for name, nbytes in reversed(sizes):
        if current and filled + nbytes > cap_bytes:
            buckets.append(current)
            current, filled = [], 0
        current.append(name)
        filled += nbytes
    if current:
        buckets.append(current)
    return buckets


class GradientAverager:
    """Averages named gradients over the dp group with bucketed in-place all-reduces.

    The flat bucket buffers are allocated once and reused every step; the returned gradients
    are views into them, valid until the next call.
    """

    def __init__(self, group: Group, bucket_mb: float, divisor: int | None = None) -> None:
        self.group = group
        # What the sum is divided by: the group's size, or more when the group's ranks stand
        # for others too (expert gradients: summed over edp, averaged over dp × cp).
        self.divisor = group.size if divisor is None else divisor
        self.cap_bytes = max(1, int(bucket_mb * MB))
        self._layout: list[list[tuple[str, tuple[int, ...], int, int]]] = []
        self._buffers: list[np.ndarray] = []
        self._signature: tuple = ()

    def _prepare(self, grads: dict[str, np.ndarray]) -> None:
        # The kind of array is part of the signature: a data-free step keeps data-free buffers.
        signature = tuple((name, g.shape, g.dtype.str, type(g)) for name, g in grads.items())
        if signature == self._signature:
            return
        self._signature = signature
        dtype = np.result_type(*(g.dtype for g in grads.values()))
        like = next(iter(grads.values()))
        sizes = [(name, g.size * dtype.itemsize) for name, g in grads.items()]
        self._layout, self._buffers = [], []
        for bucket in plan_buckets(sizes, self.cap_bytes):
            entries, offset = [], 0
            for name in bucket:
                size = grads[name].size
                entries.append((name, grads[name].shape, offset, offset + size))
                offset += size
            self._layout.append(entries)
            self._buffers.append(meta.empty(offset, dtype, like=like))

    def __call__(self, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not grads:
            return grads
        if self.group.size == 1 and self.divisor == 1:
            return grads
        self._prepare(grads)
        scale = 1.0 / self.divisor
        averaged: dict[str, np.ndarray] = {}
        for entries, buffer in zip(self._layout, self._buffers, strict=True):
            for name, _, start, stop in entries:
                buffer[start:stop] = grads[name].reshape(-1)
            self.group.all_reduce(buffer, out=buffer)
            buffer *= buffer.dtype.type(scale)
            for name, shape, start, stop in entries:
                averaged[name] = buffer[start:stop].reshape(shape)
        return {name: averaged[name] for name in grads}
