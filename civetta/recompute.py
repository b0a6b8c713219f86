"""Activation recomputation: trade a second forward for not keeping activations.

`checkpoint(fn, *inputs)` runs `fn` without building a graph, so none of its intermediate
activations stay alive; the one node it leaves behind keeps only its inputs for backward (the
activation meter counts those, not its output). Its backward runs `fn` again with a graph — for
the moment of that inner backward the rebuilt graph's saved arrays are alive again, as on a GPU
— and backpropagates through it. Parameters that `fn`
uses (through its module closure) receive their gradients during that inner backward, so the
result is exactly the gradient of `fn` — and the recomputed forward's FLOPs are counted again
by the FLOP meter, as hardware FLOPs.

Korthikanti et al. 2022 call recomputing whole transformer blocks *full* recomputation and
recomputing only the attention core (scores, softmax, weighted values) *selective*.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from civetta.tensor import Tensor, enable_grad, is_grad_enabled, make_node, no_grad

_recomputing = 0  # depth of recomputed forwards running now (inside a backward)


def is_recomputing() -> bool:
    """Whether the forward running now is a recomputation, whose side records (routing
    statistics) the first forward already made."""
    return _recomputing > 0


def checkpoint(fn: Callable[..., Tensor], *inputs: Tensor) -> Tensor:
    """`fn(*inputs)` whose activations are recomputed during backward instead of kept."""
    if not is_grad_enabled() or not any(x.requires_grad for x in inputs):
        return fn(*inputs)
    with no_grad():
        out = fn(*inputs)
    arrays = [x.data for x in inputs]
    needs = [x.requires_grad for x in inputs]

    def backward(g: np.ndarray) -> tuple[np.ndarray | None, ...]:
        global _recomputing
        leaves = [Tensor(a, requires_grad=need) for a, need in zip(arrays, needs, strict=True)]
        _recomputing += 1
        try:
            with enable_grad():
                recomputed = fn(*leaves)
        finally:
            _recomputing -= 1
        recomputed.backward(g)
        return tuple(leaf.grad if need else None for leaf, need in zip(leaves, needs, strict=True))

    return make_node(out.data, inputs, backward, saved=arrays)
