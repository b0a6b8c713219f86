"""Memory per GPU by category: parameters, gradients, optimizer state and activations.

Model state (bytes per parameter):

- mixed precision (bf16/fp16): 2 (half weights) + 2 (half gradients) + 12 for Adam (fp32 master
  weights, first and second moments) or 4 for SGD without momentum (the fp32 master): the
  "16 bytes per parameter" of ZeRO (Rajbhandari et al. 2020);
- float32 / float64: 4 / 8 for weights and gradients, 2 states for Adam, none for plain SGD.

ZeRO shards over the data-parallel group: stage 1 the optimizer state, stage 2 also the
gradients, stage 3 also the weights.

Activations are what the traced pieces of the model keep for backward (`parallel.cost.trace`),
times the block-microbatches a pipeline rank holds at its peak, walked from its schedule
(`parallel.cost.projection.peak_in_flight_layers`): a pipeline's first stage holds the
activations of the microbatches in flight. Korthikanti et al.
2022's closed form (s·b·h·(34 + 5·a·s/h) bytes per block in 16-bit) is an independent check in
the tests, not the model.
"""

from __future__ import annotations

from dataclasses import dataclass

HALF = ("bf16", "fp16")
ELEMENT_BYTES = {"float64": 8, "float32": 4, "tf32": 4, "bf16": 2, "fp16": 2}


def element_bytes(dtype: str) -> int:
    return ELEMENT_BYTES[dtype]


def state_bytes_per_param(dtype: str, optimizer: str) -> tuple[int, int, int]:
    """(weights, gradients, optimizer state) bytes per parameter before any ZeRO sharding."""
    if dtype in HALF:
        master = 4  # fp32 copy the optimizer updates
        return 2, 2, master + (8 if optimizer == "adamw" else 0)
    e = element_bytes(dtype)
    return e, e, (2 * e if optimizer == "adamw" else 0)


@dataclass(frozen=True)
class MemoryPerGPU:
    params: int
    grads: int
    optimizer: int
    activations: int
    gathered: int = 0  # ZeRO-3's whole parameters (and one unit's gradient) alive at once
    reserve: int = 0  # what the caching allocator holds beyond the live tensors

    @property
    def total(self) -> int:
        state = self.params + self.grads + self.optimizer
        return state + self.activations + self.gathered + self.reserve

    def as_dict(self) -> dict[str, int]:
        return {
            "params": self.params,
            "grads": self.grads,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "gathered": self.gathered,
            "reserve": self.reserve,
            "total": self.total,
        }


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
