"""What the engine measures as it runs: live activation bytes, graph nodes and matmul FLOPs.

Both meters are process-wide (one rank is one process) and cost an integer add per op.
"""

from __future__ import annotations


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
