"""The axiomatic ops: the only ops with a hand-written backward.

Every other op in civetta is a composition of these and gets its gradient for free. Each op
computes its numpy result and defines its backward as a closure beside it; the closure captures
arrays, shapes and flags, never Tensors, so a graph holds no reference cycles.

Each op also tells `make_node` which arrays its closure keeps (`saved=`): the activation meter
counts those, and a closure captures only what its backward reads (a product keeps the other
operand only for an operand that needs a gradient; routing ops keep nothing but shapes).

Binary ops take operands of one shape: `broadcast_to` is the single place where a gradient is
summed back over broadcast axes. Memory-wrangling ops (reshape, transpose, getitem, concat,
split, broadcast_to) have backwards that only route gradients.

`matmul` is a fused fast path: it equals `sum(broadcast(a) * broadcast(b))` (see
`functional.matmul_reference` and its test) without the B×M×K×N temporary.
"""

from __future__ import annotations

import math
from typing import Any, cast

import numpy as np

from civetta import meta
from civetta.meters import flop_meter, gemm_log
from civetta.tensor import (
    RegionGrad,
    Tensor,
    as_tensor,
    current_precision,
    make_node,
    memory_order,
)
from civetta.threads import batched_matmul


def _pair(a: Any, b: Any) -> tuple[Tensor, Tensor]:
    """Lift scalars to the other operand's dtype and broadcast both to one shape."""
    if type(a) is Tensor and type(b) is Tensor and a.data.shape == b.data.shape:
        return a, b  # the common case, without the checks below
    a = as_tensor(a, b if isinstance(b, Tensor) else None)
    b = as_tensor(b, a)
    if a.shape != b.shape:
        shape = np.broadcast_shapes(a.shape, b.shape)
        if a.shape != shape:
            a = broadcast_to(a, shape)
        if b.shape != shape:
            b = broadcast_to(b, shape)
    return a, b


# ---- elementwise ------------------------------------------------------------------------------
def _add_backward(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return g, g


def add(a: Any, b: Any) -> Tensor:
    a, b = _pair(a, b)
    # The backward captures nothing: one function for every add, not a closure per node.
    return make_node(a.data + b.data, (a, b), _add_backward, saved=())


def mul(a: Any, b: Any) -> Tensor:
    a, b = _pair(a, b)
    need_a, need_b = a.requires_grad, b.requires_grad
    y = b.data if need_a else None  # da = g·y
    x = a.data if need_b else None  # db = g·x

    def backward(g: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        return (g * y if need_a else None), (g * x if need_b else None)

    return make_node(a.data * b.data, (a, b), backward, saved=(x, y))


def neg(a: Tensor) -> Tensor:
    def backward(g: np.ndarray) -> tuple[np.ndarray]:
        return (-g,)

    return make_node(-a.data, (a,), backward, saved=())


def reciprocal(a: Tensor) -> Tensor:
    out = 1.0 / a.data

    def backward(g: np.ndarray) -> tuple[np.ndarray]:
        return (-g * out * out,)

    return make_node(out, (a,), backward, saved=(out,))


def exp(a: Tensor) -> Tensor:
    out = np.exp(a.data)

    def backward(g: np.ndarray) -> tuple[np.ndarray]:
        return (g * out,)

    return make_node(out, (a,), backward, saved=(out,))


def log(a: Tensor) -> Tensor:
    x = a.data

    def backward(g: np.ndarray) -> tuple[np.ndarray]:
        return (g / x,)

    return make_node(np.log(x), (a,), backward, saved=(x,))


def maximum(a: Any, b: Any) -> Tensor:
    """Elementwise max; ties send the gradient to `a`. ReLU is maximum(x, 0): a 0-1 filter."""
    a, b = _pair(a, b)
    a_wins = a.data >= b.data
    need_b = b.requires_grad

    def backward(g: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return g * a_wins, (g * ~a_wins if need_b else None)

    return make_node(np.where(a_wins, a.data, b.data), (a, b), backward, saved=(a_wins,))


def where(condition: Any, a: Any, b: Any) -> Tensor:
    """Pick `a` where `condition` holds, else `b`; the condition carries no gradient."""
    cond = meta.asarray(condition.data if isinstance(condition, Tensor) else condition, dtype=bool)
    a, b = _pair(a, b)
    if cond.shape != a.shape:
        shape = np.broadcast_shapes(cond.shape, a.shape)
        cond = np.broadcast_to(cond, shape)
        if a.shape != shape:
            a, b = broadcast_to(a, shape), broadcast_to(b, shape)
    need_a, need_b = a.requires_grad, b.requires_grad

    def backward(g: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        zero = np.zeros((), dtype=g.dtype)
        return (
            np.where(cond, g, zero) if need_a else None,
            np.where(cond, zero, g) if need_b else None,
        )

    return make_node(np.where(cond, a.data, b.data), (a, b), backward, saved=(cond,))


# ---- reductions -------------------------------------------------------------------------------
def _normalise_axes(axis: Any, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(ax % ndim for ax in axes)) if ndim else ()


def _keepdims_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(1 if i in axes else n for i, n in enumerate(shape))


def sum(a: Tensor, axis: Any = None, keepdims: bool = False) -> Tensor:  # noqa: A001
    axes = _normalise_axes(axis, a.ndim)
    shape = a.shape
    kept = _keepdims_shape(shape, axes)

    def backward(g: np.ndarray) -> tuple[np.ndarray]:
        return (np.broadcast_to(g.reshape(kept), shape),)

    return make_node(np.sum(a.data, axis=axes, keepdims=keepdims), (a,), backward, saved=())


def max(a: Tensor, axis: Any = None, keepdims: bool = False) -> Tensor:  # noqa: A001
    """Max reduction; tied maxima share the gradient equally."""
    axes = _normalise_axes(axis, a.ndim)
    kept_max = np.max(a.data, axis=axes, keepdims=True)
    x = a.data
    kept = kept_max.shape

    def backward(g: np.ndarray) -> tuple[np.ndarray]:
        winners = x == kept_max
        share = winners / np.sum(winners, axis=axes, keepdims=True, dtype=x.dtype)
        return (g.reshape(kept) * share,)

    out = (
        kept_max if keepdims else kept_max.reshape([n for i, n in enumerate(kept) if i not in axes])
    )
    return make_node(out, (a,), backward, saved=(x, kept_max))


# ---- memory wrangling: backwards only route gradients -----------------------------------------
def reshape(a: Tensor, shape: Any) -> Tensor:
    original = a.shape

    def backward(g: np.ndarray) -> tuple[np.ndarray]:
        return (g.reshape(original),)

    return make_node(a.data.reshape(shape), (a,), backward, saved=())


def transpose(a: Tensor, axes: Any = None) -> Tensor:
    axes = tuple(reversed(range(a.ndim))) if axes is None else tuple(ax % a.ndim for ax in axes)
    inverse = tuple(np.argsort(axes))

    def backward(g: np.ndarray) -> tuple[np.ndarray]:
        return (g.transpose(inverse),)

    return make_node(a.data.transpose(axes), (a,), backward, saved=())


def broadcast_to(a: Tensor, shape: Any) -> Tensor:
    """Broadcast; the backward sums over the broadcast axes (the one un-broadcast in civetta)."""
    shape = tuple(shape)
    original = a.shape
    lead = len(shape) - len(original)
    stretched = tuple(i + lead for i, n in enumerate(original) if n == 1 and shape[i + lead] != 1)
    summed = tuple(range(lead)) + stretched

    def backward(g: np.ndarray) -> tuple[np.ndarray]:
        return (np.sum(g, axis=summed).reshape(original) if summed else g.reshape(original),)

    return make_node(np.broadcast_to(a.data, shape), (a,), backward, saved=())


def getitem(a: Tensor, index: Any) -> Tensor:
    """Basic and integer-array indexing; the backward scatter-adds (repeated indices add up)."""
    if isinstance(index, Tensor):
        index = index.data
    if isinstance(index, tuple):
        index = tuple(i.data if isinstance(i, Tensor) else i for i in index)
    shape, dtype = a.shape, a.dtype

    basic = all(
        isinstance(i, slice | int | type(None) | type(Ellipsis))
        for i in (index if isinstance(index, tuple) else (index,))
    )

    # Integer rows, real or data-free (a MetaArray stands in for the ndarray).
    rows_only = isinstance(index, np.ndarray | meta.MetaArray) and index.dtype.kind in "iu"
    rows = cast(np.ndarray, index)

    def backward(g: np.ndarray) -> tuple[np.ndarray]:
        if rows_only:  # a table lookup (embeddings): sum the gradients row by row
            return (_scatter_add_rows(rows, g, shape),)
        full = meta.zeros(shape, dtype, like=g)
        if basic:  # a view: every element is picked at most once
            full[index] = g
        else:
            np.add.at(full, index, g)
        return (full,)

    # Kept: the index arrays (the scatter needs them); slices and integers are not arrays.
    kept = [i for i in (index if isinstance(index, tuple) else (index,)) if _is_array(i)]
    return make_node(a.data[index], (a,), backward, saved=kept)


def _is_array(x: Any) -> bool:
    return isinstance(x, np.ndarray | meta.MetaArray)


def _scatter_add_rows(rows: np.ndarray, g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`np.add.at(zeros(shape), rows, g)` by sorting the rows: ~4× faster for embeddings."""
    if meta.is_meta(g) or meta.is_meta(rows):  # data-free: the sort needs the rows' values
        return meta.shaped(shape, g.dtype)
    flat_rows = rows.reshape(-1) % shape[0]  # negative indices count from the end
    values = g.reshape(flat_rows.size, *shape[1:])
    order = np.argsort(flat_rows, kind="stable")
    sorted_rows = flat_rows[order]
    starts = np.flatnonzero(np.r_[True, sorted_rows[1:] != sorted_rows[:-1]])
    full = np.zeros(shape, dtype=g.dtype)
    if flat_rows.size:
        full[sorted_rows[starts]] = np.add.reduceat(values[order], starts, axis=0)
    return full


def concat(tensors: list[Tensor], axis: int = 0) -> Tensor:
    tensors = [as_tensor(t) for t in tensors]
    axis = axis % tensors[0].ndim
    bounds = np.cumsum([t.shape[axis] for t in tensors])[:-1]

    def backward(g: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(np.split(g, bounds, axis=axis))

    data = np.concatenate([t.data for t in tensors], axis=axis)
    return make_node(data, tuple(tensors), backward, saved=())


def split(a: Tensor, sections: int | list[int], axis: int = 0) -> list[Tensor]:
    """Split into equal `sections` or at the given indices; each piece routes its gradient back."""
    axis = axis % a.ndim
    pieces = np.split(a.data, sections, axis=axis)
    starts = np.cumsum([0] + [p.shape[axis] for p in pieces])
    shape, dtype = a.shape, a.dtype
    order = memory_order(a.data)  # the gradient's pieces are summed in the input's layout
    out = []
    for i, piece in enumerate(pieces):
        where_ = [slice(None)] * a.ndim
        where_[axis] = slice(int(starts[i]), int(starts[i + 1]))
        region = tuple(where_)

        def backward(g: np.ndarray, region: tuple = region) -> tuple[Any]:
            if type(g) is np.ndarray:  # the engine writes the slice into the input's gradient
                return (RegionGrad(shape, region, g.astype(dtype, copy=False), order),)
            full = meta.zeros(shape, dtype, like=g)  # data-free: a shape-only array
            full[region] = g
            return (full,)

        out.append(make_node(piece, (a,), backward, saved=()))
    return out


# ---- the fused fast path ----------------------------------------------------------------------
def matmul(a: Tensor, b: Tensor) -> Tensor:
    """Matrix product over the last two axes.

    `b` is either 2-D (shared by every leading index of `a`: then the product is one GEMM over
    the flattened leading axes) or has exactly `a`'s leading axes. Other broadcasts go through
    `broadcast_to` first (see `functional.matmul`). The backward keeps `b` for `a`'s gradient
    and `a` for `b`'s, each only when that gradient is needed.
    """
    x, w = a.data, b.data
    need_a, need_b = a.requires_grad, b.requires_grad
    # 2 FLOPs per multiply-add: (rows of x) · K · N, where N is w's last axis.
    flops = 2 * (x.size // x.shape[-1]) * x.shape[-1] * w.shape[-1]
    flop_meter.forward += flops
    precision = current_precision()  # the backward's GEMMs run in the forward's precision
    dtype, x_shape = x.dtype, x.shape
    w_kept = w if need_a else None
    if w.ndim == 2:
        k, n = w.shape
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k)
        m = x2.shape[0]
        gemm_log.record(m, k, n, 1, "forward", dtype, precision)
        x2_kept = x2 if need_b else None

        def backward(g: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
            g2 = g.reshape(-1, n)
            flop_meter.backward += flops * (need_a + need_b)
            if need_a:
                gemm_log.record(m, n, k, 1, "backward-input", dtype, precision)
            if need_b:  # a 2-D operand shared by every row is a weight
                gemm_log.record(k, m, n, 1, "backward-weight", dtype, precision)
            return (
                (g2 @ w_kept.T).reshape(x_shape) if w_kept is not None else None,
                x2_kept.T @ g2 if x2_kept is not None else None,
            )

        return make_node((x2 @ w).reshape(*lead, n), (a, b), backward, saved=(x2_kept, w_kept))

    assert x.shape[:-2] == w.shape[:-2], "matmul operands need equal leading axes"
    batch, (m, k), n = math.prod(x.shape[:-2]), x.shape[-2:], w.shape[-1]
    gemm_log.record(m, k, n, batch, "forward", dtype, precision)
    x_kept = x if need_b else None

    def backward_batched(g: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        flop_meter.backward += flops * (need_a + need_b)
        if need_a:
            gemm_log.record(m, n, k, batch, "backward-input", dtype, precision)
        if need_b:  # per-batch operands are activations (attention): input gradients too
            gemm_log.record(k, m, n, batch, "backward-input", dtype, precision)
        return (
            batched_matmul(g, w_kept.swapaxes(-1, -2)) if w_kept is not None else None,
            batched_matmul(x_kept.swapaxes(-1, -2), g) if x_kept is not None else None,
        )

    return make_node(batched_matmul(x, w), (a, b), backward_batched, saved=(x_kept, w_kept))


# Every primitive with a hand-written backward. The test suite fails if one lacks a gradient check.
AXIOMS = (
    add,
    mul,
    neg,
    reciprocal,
    exp,
    log,
    maximum,
    where,
    sum,
    max,
    reshape,
    transpose,
    broadcast_to,
    getitem,
    concat,
    split,
    matmul,
)
