"""Gradient redirections: collectives as civetta autograd ops.

A tensor-parallel layer moves activations between two states: *replicated* (every rank of the
group holds the same full tensor) and *partitioned* (each rank holds one piece, or one partial
sum, of it). Every collective that changes the state in the forward pass has a conjugate that
must run in the backward pass, because the gradient of a sum is a copy and the gradient of a
copy is a sum:

- `copy_to_region`: identity forward / all-reduce backward. A replicated input is fed to
  rank-local math (a column-parallel linear); each rank then holds only its share of the input's
  gradient, and the shares must be summed.
- `reduce_from_region`: all-reduce forward / identity backward. Partial sums (the output of a
  row-parallel linear) become the full value; the gradient of a sum reaches each term unchanged.
- `gather_from_region`: all-gather forward / keep-own-slice backward. Slices become a replicated
  tensor; the replicated gradient is sliced back to each rank's piece.
- `scatter_to_region`: keep-own-slice forward / all-gather backward. The mirror of the above.
- `reduce_scatter_to_region`: reduce-scatter forward / all-gather backward. Sequence
  parallelism's exit from a row-parallel layer: partial sums become summed slices along the
  sequence axis.
- `gather_from_sequence_region`: all-gather forward / reduce-scatter backward. Sequence
  parallelism's entry into a column-parallel layer: the slices are gathered, and the partial
  gradients each rank computes are summed and handed back slice by slice.
- `all_to_all_rows`: uneven all-to-all of rows forward / the reverse exchange backward. Expert
  parallelism sends each token to the rank of its expert and back; a row's gradient returns
  along the path the row came.

These are the "mappings" of Megatron-LM and the `tensor_parallel` helpers of picotron, written
as civetta ops. Forward calls are recorded in the ledger under phase "forward", backward calls
under "backward". In a group of one rank every op returns its input unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from civetta.tensor import Tensor, make_node
from parallel.comm import CommError, Group


def _own_slice(array: np.ndarray, group: Group, axis: int) -> np.ndarray:
    """This rank's equal piece of `array` along `axis` (a view, no copy)."""
    length = array.shape[axis]
    if length % group.size:
        raise CommError(
            f"cannot split axis {axis} of length {length} over the {group.size} ranks "
            f"of the {group.axis} group"
        )
    piece = length // group.size
    index = [slice(None)] * array.ndim
    index[axis] = slice(group.rank * piece, (group.rank + 1) * piece)
    return array[tuple(index)]


def _normalize(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise CommError(f"axis {axis} is out of range for a tensor with {ndim} dims")
    return axis % ndim


def copy_to_region(x: Tensor, group: Group) -> Tensor:
    """Identity forward; all-reduce of the gradient over `group` backward."""
    if group.size == 1:
        return x
    ledger = group.ledger

    def backward(g: np.ndarray) -> tuple[np.ndarray]:
        with ledger.phase("backward"):
            return (group.all_reduce(g),)

    # A view, so the activation meter does not count the same bytes twice.
    return make_node(x.data.view(), (x,), backward, saved=(), computed=False)


def reduce_from_region(x: Tensor, group: Group) -> Tensor:
    """All-reduce (sum) over `group` forward; identity backward."""
    if group.size == 1:
        return x
    with group.ledger.phase("forward"):
        out = group.all_reduce(x.data)

    def backward(g: np.ndarray) -> tuple[np.ndarray]:
        return (g,)

    return make_node(out, (x,), backward, saved=(), computed=False)


def gather_from_region(x: Tensor, group: Group, axis: int = -1) -> Tensor:
    """All-gather along `axis` forward; this rank's slice of the gradient backward."""
    if group.size == 1:
        return x
    axis = _normalize(axis, x.ndim)
    with group.ledger.phase("forward"):
        out = group.all_gather(x.data, axis=axis)

    def backward(g: np.ndarray) -> tuple[np.ndarray]:
        return (_own_slice(g, group, axis),)

    return make_node(out, (x,), backward, saved=(), computed=False)


def scatter_to_region(x: Tensor, group: Group, axis: int = -1) -> Tensor:
    """This rank's slice along `axis` forward; all-gather of the gradient backward."""
    if group.size == 1:
        return x
    axis = _normalize(axis, x.ndim)
    ledger = group.ledger

    def backward(g: np.ndarray) -> tuple[np.ndarray]:
        with ledger.phase("backward"):
            return (group.all_gather(g, axis=axis),)

    return make_node(_own_slice(x.data, group, axis), (x,), backward, saved=(), computed=False)


def reduce_scatter_to_region(x: Tensor, group: Group, axis: int) -> Tensor:
    """Reduce-scatter (sum, then this rank's slice along `axis`) forward; all-gather backward."""
    if group.size == 1:
        return x
    axis = _normalize(axis, x.ndim)
    ledger = group.ledger
    with ledger.phase("forward"):
        out = group.reduce_scatter(x.data, axis=axis)

    def backward(g: np.ndarray) -> tuple[np.ndarray]:
        with ledger.phase("backward"):
            return (group.all_gather(g, axis=axis),)

    return make_node(out, (x,), backward, saved=(), computed=False)


def gather_from_sequence_region(x: Tensor, group: Group, axis: int) -> Tensor:
    """All-gather along `axis` forward; reduce-scatter of the gradient backward."""
    if group.size == 1:
        return x
    axis = _normalize(axis, x.ndim)
    ledger = group.ledger
    with ledger.phase("forward"):
        out = group.all_gather(x.data, axis=axis)

    def backward(g: np.ndarray) -> tuple[np.ndarray]:
        with ledger.phase("backward"):
            return (group.reduce_scatter(g, axis=axis),)

    return make_node(out, (x,), backward, saved=(), computed=False)


def all_to_all_rows(
    x: Tensor, group: Group, send_counts: np.ndarray, recv_counts: np.ndarray
) -> Tensor:
    """Uneven all-to-all of the rows of `x` (`Group.all_to_all_v`) forward; the same exchange
    reversed on the gradient backward (each row's gradient goes back to the rank it came from).
    Expert parallelism's dispatch and combine."""
    return exchange(
        x,
        group,
        lambda a: group.all_to_all_v(a, send_counts, recv_counts),
        lambda g: group.all_to_all_v(g, recv_counts, send_counts),
    )


def exchange(
    x: Tensor,
    group: Group,
    there: Callable[[np.ndarray], np.ndarray],
    back: Callable[[np.ndarray], np.ndarray],
) -> Tensor:
    """A permutation of data between ranks as an op: `there` forward, its inverse `back` on
    the gradient backward, each recorded in its phase (all-to-alls). A group of one: x."""
    if group.size == 1:
        return x
    ledger = group.ledger
    with ledger.phase("forward"):
        out = there(x.data)

    def backward(g: np.ndarray) -> tuple[np.ndarray]:
        with ledger.phase("backward"):
            return (back(g),)

    return make_node(out, (x,), backward, saved=(), computed=False)
