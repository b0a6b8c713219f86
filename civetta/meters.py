"""What the engine measures as it runs: the bytes graph nodes keep for backward, graph nodes and
matmul FLOPs, and, when asked for, a log of every GEMM and the bytes ops write (for the cost
model).

The meters are process-wide (one rank is one process) and cost a few dict operations per op. The
GEMM log is off by default; off, it costs one attribute test per matmul and per op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

PHASES = ("forward", "backward-input", "backward-weight")


class ActivationMeter:
    """Bytes of the arrays that graph nodes keep for their backward, while they wait for it.

    Each op declares the arrays its backward closure keeps (`make_node(..., saved=...)`: a
    matmul's operands, an exp's output, a softmax's probabilities, a mask, an index array).
    A node holds, from its creation until backward consumes it or it is garbage collected, the
    memory buffers those arrays live in:

    - a buffer is counted whole (a view keeps its base alive) and once, however many nodes keep
      it or views of it: the meter keeps a reference count per buffer;
    - buffers of leaf tensors (parameters, inputs, constants) are not activations: not counted;
    - under `precision.autocast` a float32 buffer counts in bytes of the simulated dtype (an
      emulated bf16 activation is 2 bytes an element); other dtypes count their own bytes.

    An op that declares nothing (`saved=None`) keeps the old rule: its output, when the op
    allocated it. The peak is what a training step needed to keep alive for its backward pass;
    it is identical on data-free (`civetta.meta`) arrays, which know their base and size.
    """

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self.nodes = 0  # graph nodes ever built: the engine's per-op dispatch, counted
        # id(buffer) -> [buffer, nodes holding it, counted bytes]; the reference keeps the id
        # from being reused while the entry exists.
        self._buffers: dict[int, list[Any]] = {}

    def reset_peak(self) -> None:
        self.peak = self.live

    def hold(self, buffers: list[Any], itemsize: int | None = None) -> tuple[int, ...]:
        """Hold `buffers` (arrays that own their memory) for one node; returns the keys to
        `release`. `itemsize`: the simulated bytes per float32 element under autocast."""
        entries = self._buffers
        keys = []
        for buffer in buffers:
            key = id(buffer)
            entry = entries.get(key)
            if entry is None:
                nbytes = buffer.nbytes
                if itemsize is not None and buffer.dtype == np.float32:
                    nbytes = nbytes // 4 * itemsize
                entries[key] = [buffer, 1, nbytes]
                self.live += nbytes
            else:
                entry[1] += 1
            keys.append(key)
        if self.live > self.peak:
            self.peak = self.live
        return tuple(keys)

    def release(self, keys: tuple[int, ...]) -> None:
        """A node's backward ran or the node died: drop its hold on each buffer."""
        entries = self._buffers
        for key in keys:
            entry = entries[key]
            entry[1] -= 1
            if not entry[1]:
                del entries[key]
                self.live -= entry[2]

    def held_buffers(self) -> int:
        """How many distinct buffers nodes hold now."""
        return len(self._buffers)


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
    # Run inside a fused kernel (flash attention): operands and results partly on chip, at the
    # kernel's own efficiency rather than a GEMM's.
    fused: bool = False

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
        self,
        m: int,
        k: int,
        n: int,
        batch: int,
        phase: str,
        dtype: Any,
        precision: Any = None,
        fused: bool = False,
    ) -> None:
        """Log one product of operands of `dtype`; under an autocast `precision` a float32
        product runs in the simulated dtype."""
        if self.enabled:
            if precision is not None and dtype == np.float32:
                dtype = precision.dtype
            name = np.dtype(dtype).name
            self.gemms.append(Gemm(int(m), int(k), int(n), int(batch), phase, name, fused))

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
