"""Compiled kernels for the passes numpy makes slowly, where numba is installed (the `fast`
extra); the numpy kernels in `civetta.fused` and `civetta.optim` stay the reference and the
fallback.

numpy runs a LayerNorm as six or more passes over its rows (the mean, the centring, the
variance, the scaling, the affine part), each a ufunc loop over one row's 256 numbers: on the
bench model's (2048, 256) activations its forward costs about three times PyTorch's one fused
loop. A compiled kernel does a row in one sweep while it is in cache. The kernels run on the
engine's row blocks (`civetta.threads.run_blocked`), release the GIL so the engine's threads
share the blocks, and write into the arrays they are given.

Two kinds, chosen by two rules:
- The normalisations (LayerNorm, RMSNorm and their gradients) sum along a row, and may
  reassociate those sums (vectorised): their values differ from numpy's in the last bits. They
  run compiled for rows at least `MIN_WIDTH` wide. Width decides, not the number of rows, so
  every layout of a model (data, tensor, sequence parallel: whole rows per rank) takes the same
  kernel and gets the same bits; the tests' small models stay on numpy.
- GELU, SwiGLU, RoPE, AdamW, attention's softmax and a linear layer's bias add do the numpy
  kernels' operations in
  the same order without fast-math (GELU and SwiGLU around numpy's vectorised tanh and exp), so
  they return numpy's bits, in one or two passes over each block instead of up to eleven. They
  run compiled on arrays of at least `MIN_ELEMENTS`: below it importing numba costs more than it
  saves.
Nothing else is relaxed: NaN and infinity propagate as in numpy, no reciprocal is approximated.
Both rules need real (not data-free) float32 or float64 arrays, numba importable and
`CIVETTA_COMPILED` not "0".
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import numpy as np

MIN_WIDTH = 128  # narrower rows gain too little to be worth importing numba for
MIN_ELEMENTS = 1 << 16  # nor do smaller elementwise kernels

# Reassociation (vectorised sums) and fused multiply-adds only: no fast-math on NaN, infinity,
# signed zeros or reciprocals.
_FLAGS = {"reassoc", "contract"}


def available() -> bool:
    """Whether the compiled kernels can run here (numba importable, not switched off)."""
    return os.environ.get("CIVETTA_COMPILED", "1") != "0" and _numba_installed()


@functools.cache
def _numba_installed() -> bool:
    """Whether numba imports here (once per process, at the first array big enough to use it; a
    numba built for another numpy fails to import, and numpy then runs every kernel)."""
    if importlib.util.find_spec("numba") is None:
        return False
    try:
        import numba  # noqa: F401
    except Exception:  # any failure to load means: no compiled kernels
        return False
    return True


def used_for(x: Any) -> bool:
    """Whether the normalisations of `x`'s rows run compiled."""
    return (
        type(x) is np.ndarray
        and x.ndim >= 1
        and x.shape[-1] >= MIN_WIDTH
        and x.dtype in (np.float32, np.float64)
        and available()
    )


def elementwise_for(x: Any) -> bool:
    """Whether an elementwise kernel (GELU, AdamW) runs compiled on `x`: those return numpy's
    bits, so only the import's cost decides, and arrays under `MIN_ELEMENTS` stay on numpy."""
    return (
        type(x) is np.ndarray
        and x.size >= MIN_ELEMENTS
        and x.dtype in (np.float32, np.float64)
        and available()
    )


def _layer_norm_rows(x, w, b, xhat, rstd, out, inv_width, eps):  # type: ignore[no-untyped-def]
    """Per row: x̂ = (x − mean)·rstd, rstd = 1/√(var + eps), out = x̂·w + b (out may be x̂)."""
    zero = inv_width - inv_width  # a 0 of the rows' dtype: the sums stay in it
    one = zero + 1
    for i in range(x.shape[0]):
        total = zero
        for j in range(x.shape[1]):
            total += x[i, j]
        mean = total * inv_width
        squares = zero
        for j in range(x.shape[1]):
            d = x[i, j] - mean
            xhat[i, j] = d
            squares += d * d
        r = one / np.sqrt(squares * inv_width + eps)
        rstd[i, 0] = r
        for j in range(x.shape[1]):
            h = xhat[i, j] * r
            xhat[i, j] = h
            out[i, j] = h * w[j] + b[j]


def _rms_norm_rows(x, w, xhat, rstd, out, inv_width, eps):  # type: ignore[no-untyped-def]
    """Per row: x̂ = x·rstd, rstd = 1/√(mean(x²) + eps), out = x̂·w (out may be x̂)."""
    zero = inv_width - inv_width
    one = zero + 1
    for i in range(x.shape[0]):
        squares = zero
        for j in range(x.shape[1]):
            squares += x[i, j] * x[i, j]
        r = one / np.sqrt(squares * inv_width + eps)
        rstd[i, 0] = r
        for j in range(x.shape[1]):
            h = x[i, j] * r
            xhat[i, j] = h
            out[i, j] = h * w[j]


def _layer_norm_grad_rows(xhat, rstd, g, w, dx, g_xhat, keep, inv_width):  # type: ignore[no-untyped-def]
    """Per row: dx = rstd·(g·w − mean(g·w) − x̂·mean(g·w·x̂)); with `keep`, g·x̂ into g_xhat
    too (the weight's gradient sums it over the rows)."""
    zero = inv_width - inv_width
    for i in range(xhat.shape[0]):
        g_sum = zero
        gx_sum = zero
        for j in range(xhat.shape[1]):
            gw = g[i, j] * w[j]
            g_sum += gw
            gx_sum += gw * xhat[i, j]
            if keep:
                g_xhat[i, j] = g[i, j] * xhat[i, j]
        g_mean = g_sum * inv_width
        gx_mean = gx_sum * inv_width
        r = rstd[i, 0]
        for j in range(xhat.shape[1]):
            dx[i, j] = (g[i, j] * w[j] - g_mean - xhat[i, j] * gx_mean) * r


def _rms_norm_grad_rows(xhat, rstd, g, w, dx, g_xhat, keep, inv_width):  # type: ignore[no-untyped-def]
    """Per row: dx = rstd·(g·w − x̂·mean(g·w·x̂)); with `keep`, g·x̂ into g_xhat too."""
    zero = inv_width - inv_width
    for i in range(xhat.shape[0]):
        gx_sum = zero
        for j in range(xhat.shape[1]):
            gx_sum += g[i, j] * w[j] * xhat[i, j]
            if keep:
                g_xhat[i, j] = g[i, j] * xhat[i, j]
        gx_mean = gx_sum * inv_width
        r = rstd[i, 0]
        for j in range(xhat.shape[1]):
            dx[i, j] = (g[i, j] * w[j] - xhat[i, j] * gx_mean) * r


# GELU's kernels: the numpy kernel's operations in its order, element by element (IEEE, no
# fast-math), so the values are its bits; numpy's vectorised tanh runs between the two halves.
def _gelu_inner_rows(x, t, cubic, linear):  # type: ignore[no-untyped-def]
    """t = (x·x·cubic + linear)·x: the argument of GELU's tanh."""
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            v = x[i, j]
            t[i, j] = (v * v * cubic + linear) * v


def _gelu_outer_rows(x, t, out, one, half):  # type: ignore[no-untyped-def]
    """out = (t + 1)·x·½ with t = tanh(inner)."""
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            out[i, j] = (t[i, j] + one) * x[i, j] * half


def _gelu_grad_rows(x, t, g, dx, cubic3, linear, one, half):  # type: ignore[no-untyped-def]
    """dx = ((x·x·3·cubic + linear)·x·(1 − t²) + t + 1)·½·g."""
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            v, u = x[i, j], t[i, j]
            sech2 = one - u * u
            dx[i, j] = ((v * v * cubic3 + linear) * v * sech2 + u + one) * half * g[i, j]


def _adamw_flat(
    p, g, m, v, b1, b2, one_minus_b1, one_minus_b2, step_size, sqrt_bc2, eps, shrink, decay
):  # type: ignore[no-untyped-def]
    """`optim._adamw_kernel` element by element: the same operations in the same order."""
    for i in range(p.shape[0]):
        w = p[i] * shrink if decay else p[i]
        gi = g[i]
        mi = m[i] * b1 + gi * one_minus_b1
        vi = v[i] * b2 + gi * gi * one_minus_b2
        m[i] = mi
        v[i] = vi
        p[i] = w - mi / (np.sqrt(vi) / sqrt_bc2 + eps) * step_size


# SwiGLU's kernels, around numpy's vectorised exp (see `fused._sigmoid`): the numpy kernels'
# operations in their order, element by element. numpy takes two exps, e^min(x,0) and e^−|x|;
# the first is exactly 1 where x ≥ 0 (or NaN) and the second where x < 0, so one exp gives both.
def _negative_abs_flat(x, out):  # type: ignore[no-untyped-def]
    """out = −|x|: the exponent of the stable sigmoid."""
    for i in range(x.shape[0]):
        out[i] = -abs(x[i])


def _swiglu_flat(negative_exp, a, b, out, one, zero):  # type: ignore[no-untyped-def]
    """out = e^min(a,0) / (e^−|a| + 1) · a · b: silu(a) · b."""
    for i in range(a.shape[0]):
        e = negative_exp[i]
        low = e if a[i] < zero else one
        out[i] = low / (e + one) * a[i] * b[i]


def _swiglu_grad_flat(negative_exp, a, b, g, d_gate, d_up, one, zero):  # type: ignore[no-untyped-def]
    """d_up = silu(a)·g and d_gate = ((1 − σ)·silu(a) + σ)·g·b, σ = sigmoid(a)."""
    for i in range(a.shape[0]):
        e = negative_exp[i]
        low = e if a[i] < zero else one
        sig = low / (e + one)
        silu = a[i] * sig
        d_up[i] = silu * g[i]
        d_gate[i] = ((one - sig) * silu + sig) * g[i] * b[i]


def _rope_rows(x, out, cos, sin, half):  # type: ignore[no-untyped-def]
    """out = x·cos + rotate_half(x)·sin on (B, H, T, D) with (T, D) tables."""
    for b in range(x.shape[0]):
        for h in range(x.shape[1]):
            for t in range(x.shape[2]):
                for j in range(half):
                    out[b, h, t, j] = x[b, h, t, j] * cos[t, j] - x[b, h, t, j + half] * sin[t, j]
                for j in range(half, x.shape[3]):
                    out[b, h, t, j] = x[b, h, t, j] * cos[t, j] + x[b, h, t, j - half] * sin[t, j]


def _rope_grad_rows(g, dx, cos, sin, half):  # type: ignore[no-untyped-def]
    """dx = g·cos + rotate_halfᵀ(g·sin), rotate_halfᵀ(u) = (u2, −u1)."""
    for b in range(g.shape[0]):
        for h in range(g.shape[1]):
            for t in range(g.shape[2]):
                for j in range(half):
                    s = sin[t, j + half]
                    dx[b, h, t, j] = g[b, h, t, j] * cos[t, j] + g[b, h, t, j + half] * s
                for j in range(half, g.shape[3]):
                    s = sin[t, j - half]
                    dx[b, h, t, j] = g[b, h, t, j] * cos[t, j] - g[b, h, t, j - half] * s


def _add_row_rows(out, row):  # type: ignore[no-untyped-def]
    """out += row on every row (a linear layer's bias), in place."""
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] += row[j]


def _shifted_scores_rows(scores, bias, minus_inf):  # type: ignore[no-untyped-def]
    """scores = scores + bias − max over the row of (scores + bias), in place, on
    (B, H, rows, keys) with a (rows, keys) bias; a row holding NaN gets NaN, as numpy's max."""
    for b in range(scores.shape[0]):
        for h in range(scores.shape[1]):
            for i in range(scores.shape[2]):
                top = minus_inf
                nan = False
                for j in range(scores.shape[3]):
                    v = scores[b, h, i, j] + bias[i, j]
                    scores[b, h, i, j] = v
                    if v > top:
                        top = v
                    elif v != v:
                        nan = True
                if nan:
                    top = minus_inf - minus_inf  # NaN
                for j in range(scores.shape[3]):
                    scores[b, h, i, j] -= top


def _divide_rows(x, divisor):  # type: ignore[no-untyped-def]
    """x /= divisor on (B, H, rows, keys) with a (B, H, rows, 1) divisor, in place."""
    for b in range(x.shape[0]):
        for h in range(x.shape[1]):
            for i in range(x.shape[2]):
                d = divisor[b, h, i, 0]
                for j in range(x.shape[3]):
                    x[b, h, i, j] /= d


def _softmax_grad_rows(ds, total, probs):  # type: ignore[no-untyped-def]
    """ds = (ds − total) · probs in place, total (B, H, rows, 1): the scores' gradient."""
    for b in range(ds.shape[0]):
        for h in range(ds.shape[1]):
            for i in range(ds.shape[2]):
                t = total[b, h, i, 0]
                for j in range(ds.shape[3]):
                    ds[b, h, i, j] = (ds[b, h, i, j] - t) * probs[b, h, i, j]


_REASSOCIATED = ("layer_norm", "rms_norm", "layer_norm_grad", "rms_norm_grad")
_PYTHON_KERNELS: dict[str, Callable[..., None]] = {
    "shifted_scores": _shifted_scores_rows,
    "divide_rows": _divide_rows,
    "softmax_grad": _softmax_grad_rows,
    "add_row": _add_row_rows,
    "negative_abs": _negative_abs_flat,
    "swiglu": _swiglu_flat,
    "swiglu_grad": _swiglu_grad_flat,
    "rope": _rope_rows,
    "rope_grad": _rope_grad_rows,
    "adamw": _adamw_flat,
    "gelu_inner": _gelu_inner_rows,
    "gelu_outer": _gelu_outer_rows,
    "gelu_grad": _gelu_grad_rows,
    "layer_norm": _layer_norm_rows,
    "rms_norm": _rms_norm_rows,
    "layer_norm_grad": _layer_norm_grad_rows,
    "rms_norm_grad": _rms_norm_grad_rows,
}


@functools.cache
def kernel(name: str) -> Callable[..., None]:
    """The compiled kernel `name` (compiled at its first call per dtype; numba caches the
    machine code on disk where it can write beside this module, else in memory only)."""
    import numba

    python = _PYTHON_KERNELS[name]
    # Only the normalisations' row sums are reassociated; every other kernel is numpy's bits.
    flags: set[str] | bool = _FLAGS if name in _REASSOCIATED else False
    # error_model="numpy": a division by zero gives inf or NaN as in numpy (numba's default
    # raises, and the check it inserts per division keeps the loop from vectorising).
    options = {"nogil": True, "fastmath": flags, "error_model": "numpy"}
    try:
        return numba.njit(cache=True, **options)(python)
    except RuntimeError:  # no writable cache location: compile in memory each process
        return numba.njit(**options)(python)


def typed(value: float, like: np.ndarray) -> Any:
    """`value` as a scalar of `like`'s dtype (the kernels' arithmetic stays in that dtype)."""
    return like.dtype.type(value)
