"""Mixed precision, emulated: low-precision values, float32 arithmetic.

Inside `autocast(policy)` every op's output, and every gradient the engine passes back, is
rounded to bfloat16 or float16 at the op boundary; the arrays stay float32, so matmuls and
reductions accumulate in float32 as tensor cores and mixed-precision kernels do. Master weights
and optimizer state stay float32 (the trainer keeps them); the model computes with weights
rounded to the low precision. float16's narrow range is real here: values above 65504 become
inf, which is what dynamic loss scaling (`LossScaler`) detects and recovers from.

Memory is accounted in bytes of the simulated dtype (2 per element).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from civetta import meta, tensor


@functools.cache
def _dtype(name: str) -> np.dtype:
    """numpy's float16, or ml_dtypes' bfloat16, imported at first use: ml_dtypes 0.7 takes
    over a second to import here, which every rank of every job paid."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


@dataclass(frozen=True)
class Precision:
    name: str  # "bf16" | "fp16"
    dtype_name: str  # "bfloat16" | "float16"

    @property
    def dtype(self) -> np.dtype:
        return _dtype(self.dtype_name)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    def round(self, array: np.ndarray) -> np.ndarray:
        """The nearest low-precision values, as float32 (overflow gives ±inf); a data-free
        array has no values to round and stays as it is."""
        if array.dtype != np.float32 or meta.is_meta(array):
            return array
        with np.errstate(over="ignore"):
            return array.astype(self.dtype).astype(np.float32)


PRECISIONS = {
    "bf16": Precision("bf16", "bfloat16"),
    "fp16": Precision("fp16", "float16"),
}


@contextlib.contextmanager
def autocast(policy: Precision | None) -> Iterator[None]:
    """Round op outputs and gradients to `policy`'s precision inside the block."""
    previous = tensor.set_precision(policy)
    try:
        # float16 overflows are expected and handled by loss scaling, not warned about.
        with np.errstate(over="ignore", invalid="ignore"):
            yield
    finally:
        tensor.set_precision(previous)


class LossScaler:
    """Dynamic loss scaling for float16 (Micikevicius et al. 2018).

    The loss gradient is multiplied by `scale` so small gradients survive float16; a step whose
    gradients overflowed is skipped and the scale halved; after `window` good steps in a row the
    scale doubles.
    """

    def __init__(self, initial: float = 2.0**16, window: int = 1000) -> None:
        self.scale = float(initial)
        self.window = window
        self.good_steps = 0
        self.skipped = 0

    def update(self, overflow: bool) -> bool:
        """Record a step's outcome; returns whether the optimizer may take the step."""
        if overflow:
            self.scale /= 2.0
            self.good_steps = 0
            self.skipped += 1
            return False
        self.good_steps += 1
        if self.good_steps >= self.window:
            self.scale *= 2.0
            self.good_steps = 0
        return True


class MasterWeights:
    """float32 master copies of the parameters, which the optimizer updates; the model's own
    parameters hold their low-precision roundings, refreshed by `publish` after each step."""

    def __init__(self, params: dict[str, tensor.Tensor], policy: Precision) -> None:
        self.policy = policy
        self.params = params
        self.master = {name: tensor.Tensor(p.data.copy()) for name, p in params.items()}
        self.publish()

    def publish(self) -> None:
        for name, p in self.params.items():
            p.data[...] = self.policy.round(self.master[name].data)

    def nbytes(self) -> int:
        return sum(m.data.nbytes for m in self.master.values())


def has_overflow(arrays: Iterator[np.ndarray] | list[np.ndarray]) -> bool:
    """Whether any gradient holds inf or NaN (a float16 overflow). Data-free gradients
    (`civetta.meta`) have no values and never overflow: a data-free step is a step taken."""
    return any(not np.isfinite(a).all() for a in arrays if a is not None and not meta.is_meta(a))
