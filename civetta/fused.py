"""Fused fast paths for the ops that dominate a training step.

Each op here is one graph node with a hand-written backward, kept only because its composed
definition in `civetta.functional` is several times slower on the bench model (see
`benchmarks/bench_ops.py`). `FUSED` maps every op to that reference; `tests/test_fused.py` checks
that each agrees with it in value and gradient, and fails if an op is missing from `FUSED`.
Like the axioms' closures, the backward closures here capture arrays, shapes and flags only,
never Tensors, and declare the arrays they keep to `make_node` (`saved=`), which the activation
meter counts.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from civetta import axioms as ax
from civetta import compiled, functional, meta
from civetta.functional import GELU_C, _kept_targets, _kv_groups, causal_mask
from civetta.meters import flop_meter, gemm_log
from civetta.tensor import (
    DeferredGrad,
    Tensor,
    current_precision,
    make_node,
    weight_grads_deferred,
)
from civetta.threads import map_blocked, run_blocked


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x · Wᵀ + b for W of shape (out, in) as one GEMM over the flattened leading axes, the bias
    added in place. Reference: `add(matmul(x, transpose(W)), b)` through the axioms."""
    data, w = x.data, weight.data
    in_features, out_features = w.shape[1], w.shape[0]
    x2 = data.reshape(-1, in_features)
    out = x2 @ w.T
    if bias is not None:
        b = bias.data
        if compiled.elementwise_for(out) and b.dtype == out.dtype:
            run_blocked(compiled.kernel("add_row"), (out,), (b,))  # numpy's bits, in one pass
        else:
            out += b
    tokens = x2.shape[0]
    flops = 2 * tokens * in_features * out_features
    flop_meter.forward += flops
    precision = current_precision()  # the backward's GEMMs run in the forward's precision
    dtype, x_shape = data.dtype, data.shape
    gemm_log.record(tokens, in_features, out_features, 1, "forward", dtype, precision)
    need_x, need_w = x.requires_grad, weight.requires_grad
    has_bias = bias is not None  # a flag, not the Tensor: closures never hold Tensors
    need_b = has_bias and bias.requires_grad
    # Kept: x for the weight's gradient, W (a parameter: not an activation) for x's.
    x2_kept = x2 if need_w else None
    w_kept = w if need_x else None

    def weight_grad(g2: np.ndarray) -> np.ndarray:
        flop_meter.backward += flops
        gemm_log.record(out_features, tokens, in_features, 1, "backward-weight", dtype, precision)
        assert x2_kept is not None
        return g2.T @ x2_kept

    def backward(g: np.ndarray) -> tuple[Any, ...]:
        g2 = g.reshape(-1, out_features)
        dx = None
        if need_x:
            flop_meter.backward += flops
            gemm_log.record(
                tokens, out_features, in_features, 1, "backward-input", dtype, precision
            )
            assert w_kept is not None
            dx = (g2 @ w_kept).reshape(x_shape)
        # The bias gradient sums over tokens: as a GEMV it runs on BLAS threads, 3× a numpy sum.
        ones = meta.ones(g2.shape[0], g2.dtype, like=g2)
        if weight_grads_deferred():  # zero-bubble schedules: weight gradients come later
            dw = DeferredGrad(lambda: weight_grad(g2)) if need_w else None
            db = DeferredGrad(lambda: ones @ g2) if need_b else None
        else:
            dw = weight_grad(g2) if need_w else None
            db = ones @ g2 if need_b else None
        return (dx, dw, db) if has_bias else (dx, dw)

    parents = (x, weight) if bias is None else (x, weight, bias)
    out = out.reshape(*data.shape[:-1], out_features)
    return make_node(out, parents, backward, saved=(x2_kept, w_kept))


def _new(like: np.ndarray) -> np.ndarray:
    """An uninitialised array of `like`'s shape and dtype, C-contiguous (so `_rows` of it is a
    view that blocked kernels write into); data-free for a data-free `like`."""
    return np.empty(like.shape, like.dtype) if type(like) is np.ndarray else np.empty_like(like)


def _rows(a: np.ndarray) -> np.ndarray:
    """`a` as (rows, last axis): the layout `run_blocked` splits (a view for `_new` arrays)."""
    return a.reshape(-1, a.shape[-1]) if a.ndim > 1 else a.reshape(1, -1)


def _row_sum(a: np.ndarray) -> np.ndarray:
    """Σ over the last axis (kept, as size 1) as a GEMV, a · ones: on rows of 128-256 numbers
    3-4× faster than numpy's sum (and `mean`), which pays a reduction loop per row."""
    return (a @ meta.ones(a.shape[-1], a.dtype, like=a))[..., None]


def _gelu_forward(x: np.ndarray, t: np.ndarray, out: np.ndarray) -> None:
    dtype = x.dtype.type
    np.multiply(x, x, out=t)
    t *= dtype(0.044715 * GELU_C)
    t += dtype(GELU_C)
    t *= x
    np.tanh(t, out=t)  # t = tanh(√(2/π)·(x + 0.044715·x³)), kept for the backward
    np.add(t, dtype(1.0), out=out)
    out *= x
    out *= dtype(0.5)


def _gelu_backward(x: np.ndarray, t: np.ndarray, g: np.ndarray, dx: np.ndarray) -> None:
    # d/dx = 0.5·(1 + t) + 0.5·x·(1 − t²)·√(2/π)·(1 + 3·0.044715·x²)
    dtype = x.dtype.type
    sech2 = np.multiply(t, t)
    np.subtract(dtype(1.0), sech2, out=sech2)
    np.multiply(x, x, out=dx)
    dx *= dtype(3 * 0.044715 * GELU_C)
    dx += dtype(GELU_C)
    dx *= x
    dx *= sech2
    dx += t
    dx += dtype(1.0)
    dx *= dtype(0.5)
    dx *= g


def _gelu_forward_compiled(x: np.ndarray, t: np.ndarray, out: np.ndarray) -> None:
    """`_gelu_forward`'s bits in two compiled passes around numpy's tanh (`civetta.compiled`)."""
    dtype = x.dtype.type
    compiled.kernel("gelu_inner")(x, t, dtype(0.044715 * GELU_C), dtype(GELU_C))
    np.tanh(t, out=t)
    compiled.kernel("gelu_outer")(x, t, out, dtype(1.0), dtype(0.5))


def _gelu_backward_compiled(x: np.ndarray, t: np.ndarray, g: np.ndarray, dx: np.ndarray) -> None:
    """`_gelu_backward`'s bits in one compiled pass."""
    dtype = x.dtype.type
    grad = compiled.kernel("gelu_grad")
    grad(x, t, g, dx, dtype(3 * 0.044715 * GELU_C), dtype(GELU_C), dtype(1.0), dtype(0.5))


def gelu(x: Tensor) -> Tensor:
    """GELU (tanh approximation); reference: `functional.gelu`."""
    data = x.data
    t, out = _new(data), _new(data)
    fast = compiled.elementwise_for(data)
    run_blocked(
        _gelu_forward_compiled if fast else _gelu_forward, (_rows(data), _rows(t), _rows(out))
    )

    def backward(g: np.ndarray) -> tuple[np.ndarray]:
        dx = _new(data)
        kernel = _gelu_backward_compiled if fast else _gelu_backward
        run_blocked(kernel, (_rows(data), _rows(t), _rows(g), _rows(dx)))
        return (dx,)

    return make_node(out, (x,), backward, saved=(data, t))


def _normalize_forward(x: np.ndarray, xhat: np.ndarray, rstd: np.ndarray, eps: float) -> None:
    dtype = x.dtype.type
    mean = _row_sum(x)
    mean *= dtype(1.0 / x.shape[-1])
    np.subtract(x, mean, out=xhat)
    np.einsum("...i,...i->...", xhat, xhat, out=rstd[..., 0])
    rstd *= dtype(1.0 / x.shape[-1])
    rstd += dtype(eps)
    np.sqrt(rstd, out=rstd)
    np.divide(dtype(1.0), rstd, out=rstd)
    xhat *= rstd


def _normalize_backward(xhat: np.ndarray, rstd: np.ndarray, g: np.ndarray, dx: np.ndarray) -> None:
    # dx = rstd · (g − mean(g) − x̂ · mean(g · x̂))
    n = xhat.dtype.type(1.0 / xhat.shape[-1])
    g_mean = _row_sum(g)
    g_mean *= n
    gx_mean = np.einsum("...i,...i->...", g, xhat)[..., None]
    gx_mean *= n
    np.multiply(xhat, gx_mean, out=dx)
    np.subtract(g, dx, out=dx)
    dx -= g_mean
    dx *= rstd


def _column_sum(a: np.ndarray) -> np.ndarray:
    """The sum over every axis but the last: per block of rows a GEMV (ones · rows, ~5× numpy's
    sum over leading axes at the bench's (B·T, C)), the blocks' sums added in block order, as
    `_norm_affine_grads` sums dw and db (ZeRO-3's RMSNorm scale sums its dw here: the same bits)."""
    return _in_order(map_blocked(_ones_gemv, (_rows(a),)))


def _ones_gemv(rows: np.ndarray) -> np.ndarray:
    """ones · rows: the column sums of one block (on the one BLAS thread `map_blocked` sets)."""
    return meta.ones(rows.shape[0], rows.dtype, like=rows) @ rows


def _normalized(
    data: np.ndarray,
    eps: float,
    forward: Callable[..., None],
    w: np.ndarray | None = None,
    b: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x̂, 1/σ (shape (..., 1)) of `data` by the row kernel `forward`, and x̂ · w + b (x̂ itself
    when both are None), all in one blockwise pass: each block's affine part is computed while
    its x̂ is in cache. The one forward of the normalisations, for the fused nodes and for
    ZeRO-3's layer norm on gathered parameters alike (with one rank: the same bits)."""
    xhat = _new(data)
    rstd = meta.empty((*data.shape[:-1], 1), data.dtype, like=data)
    if compiled.used_for(data):
        out = xhat if w is None and b is None else _new(data)
        _compiled_forward(forward, data, xhat, rstd, out, eps, w, b)
        return xhat, rstd, out
    if w is None and b is None:
        run_blocked(forward, (_rows(data), _rows(xhat), _rows(rstd)), (eps,))
        return xhat, rstd, xhat
    out = _new(data)

    def kernel(x: np.ndarray, xhat: np.ndarray, rstd: np.ndarray, out: np.ndarray) -> None:
        forward(x, xhat, rstd, eps)
        if w is not None:
            np.multiply(xhat, w, out=out)
            if b is not None:
                out += b
        elif b is not None:
            np.add(xhat, b, out=out)

    run_blocked(kernel, (_rows(data), _rows(xhat), _rows(rstd), _rows(out)))
    return xhat, rstd, out


def _norm_affine_grads(
    xhat: np.ndarray,
    rstd: np.ndarray,
    g: np.ndarray,
    w: np.ndarray | None,
    need_x: bool,
    need_w: bool,
    need_b: bool,
    backward: Callable[..., None] | None = None,
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """dx, dw, db of a normalisation (row kernel `backward`; None: LayerNorm's) followed by
    x̂ · w + b; each None where not needed. One blockwise pass: per block, dx from g · w, and
    the block's column sums of g · x̂ and g (GEMVs, ones · rows), added up in block order. The
    one backward of the affine norms, for the fused nodes and for ZeRO-3's alike."""
    row_backward = backward or _normalize_backward
    dx = _new(xhat) if need_x else None
    if dx is not None and compiled.used_for(xhat):
        return _compiled_norm_affine_grads(row_backward, xhat, rstd, g, w, dx, need_w, need_b)

    def kernel(
        xhat: np.ndarray, rstd: np.ndarray, g: np.ndarray, *dx: np.ndarray
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        if dx:
            row_backward(xhat, rstd, g if w is None else g * w, dx[0])
        return (_ones_gemv(g * xhat) if need_w else None), (_ones_gemv(g) if need_b else None)

    arrays = (_rows(xhat), _rows(rstd), _rows(g), *(() if dx is None else (_rows(dx),)))
    parts = map_blocked(kernel, arrays)
    dw = _in_order([p[0] for p in parts]) if need_w else None
    db = _in_order([p[1] for p in parts]) if need_b else None
    return dx, dw, db


def _compiled_norm_affine_grads(
    numpy_kernel: Callable[..., None],
    xhat: np.ndarray,
    rstd: np.ndarray,
    g: np.ndarray,
    w: np.ndarray | None,
    dx: np.ndarray,
    need_w: bool,
    need_b: bool,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """`_norm_affine_grads` by the compiled kernel of `numpy_kernel`: per block, dx and g · x̂
    in one sweep (g · x̂ has numpy's bits), then the same GEMV column sums in block order."""
    grad = compiled.kernel(_COMPILED[numpy_kernel.__name__])
    width = xhat.shape[-1]
    weight = np.ones(width, xhat.dtype) if w is None else np.asarray(w, xhat.dtype)
    inv = compiled.typed(1.0 / width, xhat)
    unused = np.empty((1, 1), xhat.dtype)

    def kernel(
        xhat: np.ndarray, rstd: np.ndarray, g: np.ndarray, dx: np.ndarray
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        g_xhat = np.empty_like(g) if need_w else unused
        grad(xhat, rstd, g, weight, dx, g_xhat, need_w, inv)
        return (_ones_gemv(g_xhat) if need_w else None), (_ones_gemv(g) if need_b else None)

    parts = map_blocked(kernel, (_rows(xhat), _rows(rstd), _rows(g), _rows(dx)))
    dw = _in_order([p[0] for p in parts]) if need_w else None
    db = _in_order([p[1] for p in parts]) if need_b else None
    return dx, dw, db


def _in_order(partials: list[Any]) -> np.ndarray:
    """The sum of the blocks' partial sums, left to right (a fixed order)."""
    total = partials[0]
    for partial in partials[1:]:
        total = total + partial
    return total


# The compiled (numba) kernels of the numpy row kernels above (`civetta.compiled`).
_COMPILED = {
    "_normalize_forward": "layer_norm",
    "_rms_forward": "rms_norm",
    "_normalize_backward": "layer_norm_grad",
    "_rms_backward": "rms_norm_grad",
}


def _compiled_forward(
    forward: Callable[..., None],
    data: np.ndarray,
    xhat: np.ndarray,
    rstd: np.ndarray,
    out: np.ndarray,
    eps: float,
    w: np.ndarray | None,
    b: np.ndarray | None,
) -> None:
    """`_normalized` by the compiled kernel of the numpy row kernel `forward`: x̂, 1/σ and
    x̂ · w + b in one sweep per row (`out` is x̂ itself when w and b are both None)."""
    name, width = _COMPILED[forward.__name__], data.shape[-1]
    inv, eps_ = compiled.typed(1.0 / width, data), compiled.typed(eps, data)
    weight = np.ones(width, data.dtype) if w is None else np.asarray(w, data.dtype)
    kernel = compiled.kernel(name)
    if name == "layer_norm":
        bias = np.zeros(width, data.dtype) if b is None else np.asarray(b, data.dtype)

        def rows(x: np.ndarray, xhat: np.ndarray, rstd: np.ndarray, out: np.ndarray) -> None:
            kernel(x, weight, bias, xhat, rstd, out, inv, eps_)

    else:

        def rows(x: np.ndarray, xhat: np.ndarray, rstd: np.ndarray, out: np.ndarray) -> None:
            kernel(x, weight, xhat, rstd, out, inv, eps_)

    run_blocked(rows, (_rows(data), _rows(xhat), _rows(rstd), _rows(out)))


def _row_backward(numpy_kernel: Callable[..., None], xhat: np.ndarray) -> Callable[..., None]:
    """The row kernel that computes dx from (x̂, 1/σ, g): compiled where `civetta.compiled` is
    used for these rows, else `numpy_kernel`."""
    return _compiled_backward(numpy_kernel) if compiled.used_for(xhat) else numpy_kernel


def _compiled_backward(numpy_kernel: Callable[..., None]) -> Callable[..., None]:
    """A row kernel (x̂, 1/σ, g, dx) by the compiled kernel of `numpy_kernel` (no weight)."""
    grad = compiled.kernel(_COMPILED[numpy_kernel.__name__])

    def row_backward(xhat: np.ndarray, rstd: np.ndarray, g: np.ndarray, dx: np.ndarray) -> None:
        width = xhat.shape[-1]
        ones, unused = np.ones(width, xhat.dtype), np.empty((1, 1), xhat.dtype)
        grad(xhat, rstd, g, ones, dx, unused, False, compiled.typed(1.0 / width, xhat))

    return row_backward


def normalize(x: Tensor, eps: float = 1e-5) -> Tensor:
    """(x − mean) / sqrt(var + eps) over the last axis: LayerNorm without its affine part.

    Reference: `functional.layer_norm(x, None, None, eps)`.
    """
    data = x.data
    xhat, rstd, _ = _normalized(data, eps, _normalize_forward)

    def backward(g: np.ndarray) -> tuple[np.ndarray]:
        dx = _new(xhat)
        row_backward = _row_backward(_normalize_backward, xhat)
        run_blocked(row_backward, (_rows(xhat), _rows(rstd), _rows(g), _rows(dx)))
        return (dx,)

    return make_node(xhat, (x,), backward, saved=(xhat, rstd))


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """LayerNorm, one node: the fused normalisation, then x̂ · weight + bias.

    The backward keeps x̂ and 1/σ (and the weight, a parameter), as Megatron-LM's fused kernel
    keeps its input and statistics; the affine part's output is not kept. Reference:
    `functional.layer_norm`.
    """
    if weight is None and bias is None:
        return normalize(x, eps)
    w = None if weight is None else weight.data
    b = None if bias is None else bias.data
    xhat, rstd, out = _normalized(x.data, eps, _normalize_forward, w, b)
    need_x = x.requires_grad
    need_w = weight is not None and weight.requires_grad
    need_b = bias is not None and bias.requires_grad
    has_weight, has_bias = weight is not None, bias is not None

    def backward(g: np.ndarray) -> tuple[np.ndarray | None, ...]:
        dx, dw, db = _norm_affine_grads(xhat, rstd, g, w, need_x, need_w, need_b)
        return (dx, *([dw] if has_weight else []), *([db] if has_bias else []))

    parents = (x, *(p for p in (weight, bias) if p is not None))
    return make_node(out, parents, backward, saved=(xhat, rstd, w))


def _rms_forward(x: np.ndarray, xhat: np.ndarray, rstd: np.ndarray, eps: float) -> None:
    dtype = x.dtype.type
    np.einsum("...i,...i->...", x, x, out=rstd[..., 0])
    rstd *= dtype(1.0 / x.shape[-1])
    rstd += dtype(eps)
    np.sqrt(rstd, out=rstd)
    np.divide(dtype(1.0), rstd, out=rstd)
    np.multiply(x, rstd, out=xhat)


def _rms_backward(xhat: np.ndarray, rstd: np.ndarray, g: np.ndarray, dx: np.ndarray) -> None:
    # dx = rstd · (g − x̂ · mean(g · x̂)): LayerNorm's without the mean's term
    gx_mean = np.einsum("...i,...i->...", g, xhat)[..., None]
    gx_mean *= xhat.dtype.type(1.0 / xhat.shape[-1])
    np.multiply(xhat, gx_mean, out=dx)
    np.subtract(g, dx, out=dx)
    dx *= rstd


def rms_normalize(x: Tensor, eps: float = 1e-5) -> Tensor:
    """x / sqrt(mean(x²) + eps) over the last axis: RMSNorm without its weight (for a store that
    applies the weight itself, as `normalize` is for LayerNorm).

    Reference: `functional.rms_norm(x, None, eps)`.
    """
    data = x.data
    xhat, rstd, _ = _normalized(data, eps, _rms_forward)

    def backward(g: np.ndarray) -> tuple[np.ndarray]:
        dx = _new(xhat)
        row_backward = _row_backward(_rms_backward, xhat)
        run_blocked(row_backward, (_rows(xhat), _rows(rstd), _rows(g), _rows(dx)))
        return (dx,)

    return make_node(xhat, (x,), backward, saved=(xhat, rstd))


def rms_norm(x: Tensor, weight: Tensor | None, eps: float = 1e-5) -> Tensor:
    """RMSNorm, one node: the fused normalisation, then x̂ · weight.

    Keeps x̂ and 1/rms (and the weight, a parameter), as `layer_norm` does; not the output.
    Reference: `functional.rms_norm`.
    """
    if weight is None:
        return rms_normalize(x, eps)
    data, w = x.data, weight.data
    xhat, rstd, out = _normalized(data, eps, _rms_forward, w)
    need_x, need_w = x.requires_grad, weight.requires_grad

    def backward(g: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        dx, dw, _ = _norm_affine_grads(xhat, rstd, g, w, need_x, need_w, False, _rms_backward)
        return dx, dw

    return make_node(out, (x, weight), backward, saved=(xhat, rstd, w))


def _sigmoid(x: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> None:
    # exp(min(x, 0)) / (1 + exp(-|x|)): 1 / (1 + e^-x) above 0, e^x / (1 + e^x) below. No exp of
    # a positive number, so nothing overflows, and a tiny sigmoid keeps its relative precision
    # (as `functional.silu`'s does). (`np.multiply(..., where=x < 0)` would be 4x slower.)
    one = x.dtype.type(1.0)
    np.minimum(x, x.dtype.type(0.0), out=scratch)
    np.exp(scratch, out=scratch)
    np.abs(x, out=out)
    np.negative(out, out=out)
    np.exp(out, out=out)
    out += one
    np.divide(scratch, out, out=out)


def _compiled_swiglu_for(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether SwiGLU of `a` with `b` runs compiled: C-contiguous arrays of one dtype (their
    flat views are what the compiled kernels walk)."""
    return (
        compiled.elementwise_for(a)
        and type(b) is np.ndarray
        and b.dtype == a.dtype
        and a.flags.c_contiguous
        and b.flags.c_contiguous
    )


def _sigmoid_exponential(a: np.ndarray) -> np.ndarray:
    """e^−|a| of one block, as `_sigmoid` computes it (its e^min(a, 0) is 1 or the same value:
    the compiled kernels pick it)."""
    negative_abs = np.empty_like(a)
    compiled.kernel("negative_abs")(a, negative_abs)
    return np.exp(negative_abs, out=negative_abs)


def _swiglu_compiled(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """`swiglu`'s forward bits on one block of the flat arrays (`civetta.compiled`)."""
    one, zero = a.dtype.type(1.0), a.dtype.type(0.0)
    compiled.kernel("swiglu")(_sigmoid_exponential(a), a, b, out, one, zero)


def _swiglu_grad_compiled(
    a: np.ndarray, b: np.ndarray, g: np.ndarray, d_gate: np.ndarray, d_up: np.ndarray
) -> None:
    """`swiglu`'s backward bits on one block (both gradients)."""
    one, zero = a.dtype.type(1.0), a.dtype.type(0.0)
    negative = _sigmoid_exponential(a)
    compiled.kernel("swiglu_grad")(negative, a, b, g, d_gate, d_up, one, zero)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) · up, one node; keeps gate and up, and recomputes the sigmoid in backward
    (as Megatron-LM's fused SwiGLU does). Reference: `functional.swiglu`."""
    a, b = gate.data, up.data
    fast = _compiled_swiglu_for(a, b)
    out = np.empty_like(a)
    if fast:
        run_blocked(_swiglu_compiled, (a.reshape(-1), b.reshape(-1), out.reshape(-1)))
    else:
        _sigmoid(a, out, np.empty_like(a))
        out *= a
        out *= b
    need_gate, need_up = gate.requires_grad, up.requires_grad
    up_kept = b if need_gate else None  # the gate's gradient reads up; up's reads only the gate

    def backward(g: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        if fast and need_gate and need_up and _compiled_swiglu_for(a, g):
            d_gate, d_up = np.empty_like(a), np.empty_like(a)
            flat = (a.reshape(-1), b.reshape(-1), g.reshape(-1))
            run_blocked(_swiglu_grad_compiled, (*flat, d_gate.reshape(-1), d_up.reshape(-1)))
            return d_gate, d_up
        sig, d_gate = np.empty_like(a), np.empty_like(a)
        _sigmoid(a, sig, d_gate)
        silu = np.multiply(a, sig)
        d_up = np.multiply(silu, g) if need_up else None
        if not need_gate:
            return None, d_up
        # silu'(x) = sig + x · sig · (1 − sig) = sig + silu · (1 − sig)
        np.subtract(a.dtype.type(1.0), sig, out=d_gate)
        d_gate *= silu
        d_gate += sig
        d_gate *= g
        d_gate *= up_kept
        return d_gate, d_up

    return make_node(out, (gate, up), backward, saved=(a, up_kept))


def rope(x: Tensor, cos: np.ndarray, sin: np.ndarray) -> Tensor:
    """x · cos + rotate_half(x) · sin, one node, with rotate_half(x) = (−x2, x1) on the halves of
    the last axis. Keeps only the tables: constants, shared by every layer (not activations).
    The backward is g · cos + rotate_halfᵀ(g · sin), rotate_halfᵀ(u) = (u2, −u1).
    Reference: `functional.rope`.
    """
    data = x.data
    cos, sin = cos.astype(data.dtype, copy=False), sin.astype(data.dtype, copy=False)
    half = data.shape[-1] // 2
    lo, hi = slice(None, half), slice(half, None)
    fast = compiled.elementwise_for(data) and data.ndim == 4 and cos.shape == data.shape[-2:]
    if fast:  # the same operations per element in one compiled pass (`civetta.compiled`)
        out = np.empty_like(data)
        run_blocked(compiled.kernel("rope"), (data, out), (cos, sin, half))
    else:
        out = data * cos
        out[..., lo] -= data[..., hi] * sin[..., lo]
        out[..., hi] += data[..., lo] * sin[..., hi]

    def backward(g: np.ndarray) -> tuple[np.ndarray]:
        if fast and compiled.elementwise_for(g):
            dx = np.empty_like(g)
            run_blocked(compiled.kernel("rope_grad"), (g, dx), (cos, sin, half))
            return (dx,)
        dx = g * cos
        dx[..., lo] += g[..., hi] * sin[..., hi]
        dx[..., hi] -= g[..., lo] * sin[..., lo]
        return (dx,)

    return make_node(out, (x,), backward, saved=())


def _softmax_forward(x: np.ndarray, probs: np.ndarray, mask: np.ndarray | None) -> None:
    if mask is None:
        np.subtract(x, x.max(axis=-1, keepdims=True), out=probs)
    else:
        np.copyto(probs, x.dtype.type(-np.inf))
        np.copyto(probs, x, where=mask)
        probs -= probs.max(axis=-1, keepdims=True)
    np.exp(probs, out=probs)
    probs /= _row_sum(probs)


def _softmax_backward(probs: np.ndarray, g: np.ndarray, dx: np.ndarray) -> None:
    # dx = p · (g − Σ g·p), the row sums as dot products (no g·p pass)
    total = np.einsum("...i,...i->...", g, probs)[..., None]
    np.subtract(g, total, out=dx)
    dx *= probs


def _blocked_softmax(x: np.ndarray, probs: np.ndarray, mask: np.ndarray | None) -> None:
    """`_softmax_forward` blockwise: over rows without a mask; over whole (T, T) score matrices
    with one, each block against the same mask (a mask that broadcasts only over the leading
    axes of a matrix stack; any other runs in one call)."""
    if mask is None:
        run_blocked(_softmax_forward, (_rows(x), _rows(probs)), (None,))
        return
    if x.ndim < 2 or mask.shape[-2:] != x.shape[-2:] or mask.ndim > 2:
        _softmax_forward(x, probs, mask)
        return
    stack = (-1, *x.shape[-2:])
    run_blocked(_softmax_forward, (x.reshape(stack), probs.reshape(stack)), (mask,))


def softmax(x: Tensor, mask: np.ndarray | None = None) -> Tensor:
    """Softmax over the last axis; where `mask` is False the probability is exactly 0.

    `mask` broadcasts against the last axes of `x` (a causal (T, T) mask for (B, nh, T, T)
    scores). Reference: `functional.softmax` of `where(mask, x, -inf)`.
    """
    data = x.data
    probs = _new(data)
    _blocked_softmax(data, probs, mask)

    def backward(g: np.ndarray) -> tuple[np.ndarray]:
        dx = _new(probs)
        run_blocked(_softmax_backward, (_rows(probs), _rows(g), _rows(dx)))
        return (dx,)

    return make_node(probs, (x,), backward, saved=(probs,))


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True) -> Tensor:
    """softmax(q·kᵀ/√d) · v as one node that keeps q/√d, k, v and the probabilities (the arrays
        the composed version keeps); reference: the functional version.

        Grouped-query attention (k, v with nkv < nh heads) does not repeat k and v: the `rep` query
        heads of a group are consecutive, so q viewed as (B, nkv, rep·T, D) multiplies each group's
        kᵀ in one batched GEMM, and the probabilities viewed back the same way multiply v.

        Forward and backward run per block of the batch (`run_blocked`): a block's scores, softmax
        and products stay in cache, where the composed ops stream each (B, nh, T, T) array from
        memory several times. The output is written in (B, T, nh, D) order and returned as its
        (B, nh, T, D) view, so the model's merge of the heads back into (B, T, C) is a view, not a
        copy. Each block computes what the composed ops compute on it, the same operations in the
        same order (the mask added as 0 / −inf), so the values are the composed version's bits (k's
    gradient too: it is computed as dk where the composed ops compute dkᵀ, with the same sums).
        Under autocast (which rounds every intermediate) the composed ops run instead.
    """
    if _attention[-1] == "flash":
        return flash_attention(q, k, v, causal)
    if current_precision() is not None:
        return _composed_attention(q, k, v, causal)
    groups = _kv_groups(q, k, v)
    qd, kd, vd = q.data, k.data, v.data
    b, heads, t_query, hs = qd.shape
    kv_heads, t_key = kd.shape[1], kd.shape[-2]
    rows = groups * t_query  # a kv head's query rows, its query heads stacked
    scale = np.asarray(1.0 / math.sqrt(hs), dtype=qd.dtype)
    scaled = qd * scale  # (B, nh, T, D), C-contiguous: the grouped view below is a view
    grouped = scaled.reshape(b, kv_heads, rows, hs)
    keys_t = np.swapaxes(kd, -1, -2)  # (B, nkv, D, Tk)
    bias = _causal_bias(t_query, t_key, groups, qd) if causal else None
    probs = meta.empty((b, kv_heads, rows, t_key), qd.dtype, like=qd)
    if groups == 1:  # written in the heads' merge order, (B, T, nh, D), viewed as (B, nh, T, D)
        out = np.swapaxes(meta.empty((b, t_query, heads, hs), qd.dtype, like=qd), 1, 2)
        out_grouped = out
    else:  # a kv head's rows stacked: (B, nh, T, D) is a view of them, the merge a copy
        out_grouped = meta.empty((b, kv_heads, rows, hs), qd.dtype, like=qd)
        out = out_grouped.reshape(b, heads, t_query, hs)
    fast = compiled.elementwise_for(probs)
    softmax = _masked_softmax_compiled if fast else _masked_softmax
    run_blocked(_attention_forward, (probs, grouped, keys_t, vd, out_grouped), (bias, softmax))
    _log_attention_forward(qd, kd, vd, rows, b * kv_heads)
    need_q, need_k, need_v = q.requires_grad, k.requires_grad, v.requires_grad

    def backward(g: np.ndarray) -> tuple[np.ndarray | None, ...]:
        _log_attention_backward(qd, kd, vd, rows, b * kv_heads, need_q, need_k, need_v)
        g4 = g.reshape(b, kv_heads, rows, hs)
        dq = meta.empty((b, kv_heads, rows, hs), qd.dtype, like=qd)
        dk = meta.empty(kd.shape, qd.dtype, like=qd)
        dv = meta.empty(vd.shape, qd.dtype, like=qd)
        softmax_grad = compiled.kernel("softmax_grad") if fast else _softmax_grad
        arrays = (probs, g4, vd, grouped, kd, dq, dk, dv)
        run_blocked(_attention_backward, arrays, (scale, softmax_grad))
        return (
            dq.reshape(b, heads, t_query, hs) if need_q else None,
            dk if need_k else None,
            dv if need_v else None,
        )

    return make_node(out, (q, k, v), backward, saved=(scaled, kd, vd, probs))


def _attention_forward(
    probs: np.ndarray,
    grouped: np.ndarray,
    keys_t: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    bias: np.ndarray | None,
    softmax: Callable[[np.ndarray, np.ndarray | None], None],
) -> None:
    """One block: the scores into `probs`, the masked softmax in place, then probs · v."""
    np.matmul(grouped, keys_t, out=probs)
    softmax(probs, bias)
    np.matmul(probs, v, out=out)


def _masked_softmax(probs: np.ndarray, bias: np.ndarray | None) -> None:
    """The softmax of the scores + bias (0 / −inf) over the last axis, in place."""
    if bias is not None:
        probs += bias
    probs -= probs.max(axis=-1, keepdims=True)
    np.exp(probs, out=probs)
    probs /= _row_sum(probs)


def _masked_softmax_compiled(probs: np.ndarray, bias: np.ndarray | None) -> None:
    """`_masked_softmax`'s bits with its passes compiled (`civetta.compiled`): the mask, the
    max and its subtraction in one, the division in another; exp and the row sums stay numpy's."""
    if bias is None:  # adding zeros changes no value the softmax returns
        bias = np.zeros(probs.shape[-2:], probs.dtype)
    compiled.kernel("shifted_scores")(probs, bias, probs.dtype.type(-np.inf))
    np.exp(probs, out=probs)
    compiled.kernel("divide_rows")(probs, _row_sum(probs))


def _attention_backward(
    probs: np.ndarray,
    g: np.ndarray,
    v: np.ndarray,
    grouped: np.ndarray,
    k: np.ndarray,
    dq: np.ndarray,
    dk: np.ndarray,
    dv: np.ndarray,
    scale: np.ndarray,
    softmax_grad: Callable[[np.ndarray, np.ndarray, np.ndarray], None],
) -> None:
    """One block of the backward: dv = pᵀ·g and dp = g·vᵀ (p·v), ds = p·(dp − Σ dp·p) (softmax),
    dq = ds·k·scale and dk = dsᵀ·(q/√d) (q/√d · kᵀ), as the composed ops compute them but dk
    itself where they compute dkᵀ: the same products, and a contiguous dk (its transpose, a
    strided view, cost a slow copy into the packed projection's gradient)."""
    np.matmul(np.swapaxes(probs, -1, -2), g, out=dv)
    ds = g @ np.swapaxes(v, -1, -2)
    total = np.einsum("...i,...i->...", ds, probs)[..., None]
    softmax_grad(ds, total, probs)
    np.matmul(ds, k, out=dq)
    dq *= scale
    np.matmul(np.swapaxes(ds, -1, -2), grouped, out=dk)


def _softmax_grad(ds: np.ndarray, total: np.ndarray, probs: np.ndarray) -> None:
    """ds = (ds − total) · probs in place (compiled: the `softmax_grad` kernel, its bits)."""
    np.subtract(ds, total, out=ds)
    ds *= probs


def _causal_bias(t_query: int, t_key: int, groups: int, like: np.ndarray) -> np.ndarray | None:
    """0 where a query row may attend to a key and −inf elsewhere, for the (rep·T, Tk) rows of
    a kv head (its query heads' rows stacked); None for data-free arrays (no values to mask)."""
    if meta.is_meta(like):
        return None
    mask = causal_mask(t_query, t_key)
    bias = np.where(mask, like.dtype.type(0), like.dtype.type(-np.inf)).astype(like.dtype)
    return np.tile(bias, (groups, 1)) if groups > 1 else bias


def _log_attention_forward(
    qd: np.ndarray, kd: np.ndarray, vd: np.ndarray, rows: int, batch: int
) -> None:
    """The forward's two products in the GEMM log and FLOP meter, as the composed ops log them."""
    hs, t_key, precision = qd.shape[-1], kd.shape[-2], current_precision()
    for m, kk, n in ((rows, hs, t_key), (rows, t_key, vd.shape[-1])):
        flop_meter.forward += 2 * batch * m * kk * n
        gemm_log.record(m, kk, n, batch, "forward", qd.dtype, precision)


def _log_attention_backward(
    qd: np.ndarray,
    kd: np.ndarray,
    vd: np.ndarray,
    rows: int,
    batch: int,
    need_q: bool,
    need_k: bool,
    need_v: bool,
) -> None:
    """The backward's products: p·v's (dp always, for the scores' gradient; dv when v needs
    one), then q/√d·kᵀ's (dq, dk when needed; the composed ops log dkᵀ, the same FLOPs and
    bytes)."""
    hs, t_key, precision, dtype = qd.shape[-1], kd.shape[-2], current_precision(), qd.dtype
    products = [(rows, hs, t_key, True), (t_key, rows, hs, need_v)]
    products += [(rows, t_key, hs, need_q), (t_key, rows, hs, need_k)]
    for m, kk, n, needed in products:
        if needed:
            flop_meter.backward += 2 * batch * m * kk * n
            gemm_log.record(m, kk, n, batch, "backward-input", dtype, precision)


def _composed_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """The attention as four nodes (scale, q·kᵀ, the fused softmax, p·v): under autocast each
    rounds its output to the low precision, as eager kernels of that precision do."""
    groups = _kv_groups(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1])
    mask = causal_mask(q.shape[-2], k.shape[-2], like=q.data) if causal else None
    if groups == 1:
        scores = ax.matmul(ax.mul(q, scale), ax.transpose(k, (0, 1, 3, 2)))  # (B, nh, T, T)
        return ax.matmul(softmax(scores, mask), v)  # (B, nh, T, hs)
    b, heads, t_query, hs = q.shape
    kv_heads, t_key = k.shape[1], k.shape[-2]
    grouped = ax.reshape(ax.mul(q, scale), (b, kv_heads, groups * t_query, hs))
    scores = ax.matmul(grouped, ax.transpose(k, (0, 1, 3, 2)))  # (B, nkv, rep·T, T)
    probs = softmax(ax.reshape(scores, (b, heads, t_query, t_key)), mask)
    out = ax.matmul(ax.reshape(probs, (b, kv_heads, groups * t_query, t_key)), v)
    return ax.reshape(out, (b, heads, t_query, hs))


# Which kernel `scaled_dot_product_attention` runs: "eager" keeps the probabilities for backward,
# "flash" keeps one log-sum-exp per query row and recomputes them (`attention_kernel`).
ATTENTION_KERNELS = ("eager", "flash")
_attention = ["eager"]
FLASH_BLOCK = 128  # the key/query tile of a flash kernel: what causal skipping skips whole


@contextlib.contextmanager
def attention_kernel(name: str) -> Iterator[None]:
    """Run `scaled_dot_product_attention` as `name` ("eager" or "flash") inside the block."""
    if name not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel expected one of {ATTENTION_KERNELS}, got {name!r}")
    _attention.append(name)
    try:
        yield
    finally:
        _attention.pop()


def _causal_share(t_query: int, t_key: int) -> float:
    """The share of (query tile, key tile) pairs a causal flash kernel computes: the tiles on
    or below the diagonal (queries aligned at the end of the keys)."""
    rows, cols = -(-t_query // FLASH_BLOCK), -(-t_key // FLASH_BLOCK)
    offset = cols - rows
    computed = sum(min(cols, offset + i + 1) for i in range(rows))
    return computed / (rows * cols)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True) -> Tensor:
    """softmax(q·kᵀ/√d)·v as a flash kernel computes it: one node that keeps q, k, v, the
    output and one log-sum-exp per query row, and recomputes the probabilities in backward.

    numpy computes whole score matrices here (as temporaries, never kept); the GEMM log records
    what a tiled kernel runs: with `causal`, only the tiles on or below the diagonal
    (`_causal_share`), and in backward the scores again (logged as recomputation, phase
    "forward") and the four gradient products. Reference: the functional version.
    """
    groups = _kv_groups(q, k, v)
    qd, kd, vd = q.data, k.data, v.data
    b, heads, t_query, hs = qd.shape
    kv_heads, t_key = kd.shape[1], kd.shape[-2]
    scale = 1.0 / math.sqrt(hs)
    mask = causal_mask(t_query, t_key, like=qd) if causal else None
    shapes = _flash_shapes(
        groups * t_query, t_key, hs, _causal_share(t_query, t_key) if causal else 1.0
    )
    precision = current_precision()
    rows, batch = groups * t_query, b * kv_heads  # a kv head's query rows, its heads stacked

    def log(products: list[tuple[int, int, int]], phases: tuple[str, ...]) -> int:
        for (m, kk, n), phase in zip(products, phases, strict=True):
            gemm_log.record(m, kk, n, batch, phase, qd.dtype, precision, fused=True)
        return sum(2 * batch * m * kk * n for m, kk, n in products)

    def masked_scores() -> np.ndarray:
        grouped = (qd * scale).reshape(b, kv_heads, rows, hs)
        scores = (grouped @ np.swapaxes(kd, -1, -2)).reshape(b, heads, t_query, t_key)
        if mask is None:
            return scores
        x = np.empty_like(scores)
        np.copyto(x, scores.dtype.type(-np.inf))
        np.copyto(x, scores, where=mask)
        return x

    x = masked_scores()
    top = x.max(axis=-1, keepdims=True)
    e = np.exp(x - top)
    total = e.sum(axis=-1, keepdims=True)
    lse = top + np.log(total)  # what the kernel keeps instead of the probabilities
    probs = (e / total).reshape(b, kv_heads, rows, t_key)
    out = (probs @ vd).reshape(b, heads, t_query, hs)
    del x, e, probs
    flop_meter.forward += log(shapes[:2], ("forward", "forward"))

    def backward(g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        phases = ("forward", *("backward-input",) * 4)  # the scores again, then 4 gradients
        flop_meter.backward += log(shapes[2:], phases)
        p = np.exp(masked_scores() - lse).reshape(b, kv_heads, rows, t_key)
        g4 = g.reshape(b, kv_heads, rows, hs)
        dv = np.swapaxes(p, -1, -2) @ g4  # (B, nkv, Tk, D)
        dp = g4 @ np.swapaxes(vd, -1, -2)  # (B, nkv, rows, Tk)
        d = (g * out).sum(axis=-1, keepdims=True).reshape(b, kv_heads, rows, 1)
        ds = p * (dp - d) * scale
        dq = (ds @ kd).reshape(b, heads, t_query, hs)
        dk = np.swapaxes(ds, -1, -2) @ qd.reshape(b, kv_heads, rows, hs)
        return dq, dk, dv

    return make_node(out, (q, k, v), backward, saved=(qd, kd, vd, out, lse))


def _flash_shapes(rows: int, t_key: int, hs: int, share: float) -> list[tuple[int, int, int]]:
    """(m, k, n) of each product a flash kernel runs for one kv head's `rows` query rows, the
    causal `share` of the key axis taken: q·kᵀ and p·v forward; in backward q·kᵀ again, then
    pᵀ·dO (dv), dO·vᵀ (dp), ds·k (dq) and dsᵀ·q (dk)."""
    keys = max(1, round(t_key * share))
    qk, pv, kv = (rows, hs, keys), (rows, keys, hs), (keys, rows, hs)
    return [qk, pv, qk, kv, qk, pv, kv]


def _exp_into(x: np.ndarray, out: np.ndarray) -> None:
    np.exp(x, out=out)


def _log_softmax_rows(x: np.ndarray, out: np.ndarray) -> None:
    np.subtract(x, x.max(axis=-1, keepdims=True), out=out)
    total = _row_sum(np.exp(out))  # exp: a block-sized temporary
    out -= np.log(total, out=total)


def cross_entropy(logits: Tensor, targets: Any, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy from logits (..., V) via log-probabilities; one node.

    Reference: `functional.cross_entropy`.
    """
    targets = meta.asarray(targets.data if isinstance(targets, Tensor) else targets).reshape(-1)
    vocab = logits.shape[-1]
    flat = logits.data.reshape(-1, vocab)
    keep, rows, cols, count = _kept_targets(targets, ignore_index)
    log_probs = _new(flat)
    run_blocked(_log_softmax_rows, (flat, log_probs))
    loss = -log_probs[rows, cols].sum(dtype=np.float64) / count
    shape, dtype = logits.shape, flat.dtype
    # Rows whose target is ignored get no gradient; None: none is (always so data-free).
    dropped = None if keep is None or keep.all() else ~keep

    def backward(g: np.ndarray) -> tuple[np.ndarray]:
        # d loss / d logits = (softmax − onehot(target)) / count on kept rows, 0 elsewhere.
        grad = _new(log_probs)
        run_blocked(_exp_into, (log_probs, grad))
        grad[rows, cols] -= 1.0
        if dropped is not None:
            grad[dropped] = 0.0
        grad *= (g / count).astype(dtype)
        return (grad.reshape(shape),)

    loss = meta.asarray(loss, dtype=logits.dtype)
    return make_node(loss, (logits,), backward, saved=(log_probs, rows, cols, dropped))


# ---- the composed references of the ops above that `functional` does not spell out -------------
def _linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    out = ax.matmul(x, ax.transpose(weight, (1, 0)))
    return out if bias is None else ax.add(out, bias)


def _normalize_reference(x: Tensor, eps: float = 1e-5) -> Tensor:
    return functional.layer_norm(x, None, None, eps)


def _rms_normalize_reference(x: Tensor, eps: float = 1e-5) -> Tensor:
    return functional.rms_norm(x, None, eps)


def _softmax_reference(x: Tensor, mask: np.ndarray | None = None) -> Tensor:
    if mask is not None:
        x = ax.where(mask, x, Tensor(np.array(-np.inf, dtype=x.dtype)))
    return functional.softmax(x, axis=-1)


# Every fused op and the composed reference it must agree with in value and gradient (same
# signature); `tests/test_fused.py` fails if a public function here is missing.
FUSED: dict[Callable[..., Tensor], Callable[..., Tensor]] = {
    linear: _linear_reference,
    gelu: functional.gelu,
    normalize: _normalize_reference,
    layer_norm: functional.layer_norm,
    rms_normalize: _rms_normalize_reference,
    rms_norm: functional.rms_norm,
    swiglu: functional.swiglu,
    rope: functional.rope,
    softmax: _softmax_reference,
    scaled_dot_product_attention: functional.scaled_dot_product_attention,
    flash_attention: functional.scaled_dot_product_attention,
    cross_entropy: functional.cross_entropy,
}
