"""What the engine measures as it runs: live activation bytes, graph nodes and matmul FLOPs,
and, when asked for, a log of every GEMM and the bytes ops write (for the cost model).

The meters are process-wide (one rank is one process) and cost an integer add per op. The GEMM
log is off by default; off, it costs one attribute test per matmul and per op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

PHASES = ("forward", "backward-input", "backward-weight")


class ActivationMeter:
    """Bytes held by graph nodes that still wait for their backward.

    A node counts the bytes of its output when the op allocated it (views count nothing); the
    count is released when backward consumes the node or the node is garbage collected. The peak
    is what a training step needed to keep alive for its backward pass.
    """

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self.nodes = 0  # graph nodes ever built: the engine's per-op dispatch, counted

    def reset_peak(self) -> None:
        self.peak = self.live


class FlopMeter:
    """Matrix-multiply FLOPs actually executed (2 per multiply-add), forward and backward.

    These are hardware FLOPs: work redone by activation recomputation counts again. Elementwise
    ops are not counted (they are a vanishing share of a transformer's arithmetic).
    """

    def __init__(self) -> None:
        self.forward = 0
        self.backward = 0

    @property
    def total(self) -> int:
        return self.forward + self.backward

    def reset(self) -> None:
        self.forward = 0
        self.backward = 0


activation_meter = ActivationMeter()
flop_meter = FlopMeter()


@dataclass(frozen=True)
class Gemm:
    """One matrix product: `batch` independent (m × k) · (k × n) products.

    `phase`: "forward", "backward-input" (a gradient the previous op waits for) or
    "backward-weight" (a weight's gradient: what a zero-bubble schedule's weight pass runs).
    `dtype`: the dtype the product runs in, the simulated one under `precision.autocast`.
    """

    m: int
    k: int
    n: int
    batch: int
    phase: str
    dtype: str

    def __post_init__(self) -> None:
        assert self.phase in PHASES, self.phase

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.m * self.k * self.n


class GemmLog:
    """The GEMMs ops run, in order, and the bytes of the fresh arrays ops produce.

    `output_bytes` counts each graph-building op's output when it is new memory (not a view), in
    bytes of the simulated dtype under autocast: the elementwise traffic an op writes. Backward
    passes and an op's internal scratch arrays are not counted. Records are identical on real
    and on data-free (`civetta.meta`) arrays.
    """

    def __init__(self) -> None:
        self.enabled = False
        self.gemms: list[Gemm] = []
        self.output_bytes = 0

    def record(
        self, m: int, k: int, n: int, batch: int, phase: str, dtype: Any, precision: Any = None
    ) -> None:
        """Log one product of operands of `dtype`; under an autocast `precision` a float32
        product runs in the simulated dtype."""
        if self.enabled:
            if precision is not None and dtype == np.float32:
                dtype = precision.dtype
            self.gemms.append(Gemm(int(m), int(k), int(n), int(batch), phase, np.dtype(dtype).name))

    def clear(self) -> None:
        self.gemms.clear()
        self.output_bytes = 0

    def flops(self, phase: str | None = None) -> int:
        return sum(g.flops for g in self.gemms if phase is None or g.phase == phase)


gemm_log = GemmLog()


@contextlib.contextmanager
def recording_gemms(clear: bool = True) -> Iterator[GemmLog]:
    """Record GEMMs and output bytes into `gemm_log` inside the block (cleared first)."""
    if clear:
        gemm_log.clear()
    previous, gemm_log.enabled = gemm_log.enabled, True
    try:
        yield gemm_log
    finally:
        gemm_log.enabled = previous
