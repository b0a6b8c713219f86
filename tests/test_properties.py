"""Property tests (hypothesis) for broadcasting and reductions against numpy.

The expected un-broadcast gradient is computed independently of civetta's `broadcast_to`: every
element of the broadcast result comes from one source element, so the gradient of a source
element is the sum (a bincount) of the upstream gradient over the positions it was copied to.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, mutually_broadcastable_shapes, valid_tuple_axes

from civetta import Tensor, functional
from civetta import axioms as ax

SETTINGS = settings(max_examples=50, deadline=None)
seeds = st.integers(0, 2**32 - 1)


def unbroadcast(g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Adjoint of broadcasting `shape` to `g.shape`: sum g over the copies of each element."""
    size = int(np.prod(shape))
    source = np.broadcast_to(np.arange(size).reshape(shape), g.shape)
    return np.bincount(source.ravel(), weights=g.ravel(), minlength=size).reshape(shape)


@st.composite
def reduction_args(draw: st.DrawFn) -> tuple[tuple[int, ...], Any, bool]:
    shape = draw(array_shapes(min_dims=0, max_dims=4, min_side=1, max_side=4))
    ndim = len(shape)
    choices = [st.none(), valid_tuple_axes(ndim)]
    if ndim:
        choices.append(st.integers(-ndim, ndim - 1))
    return shape, draw(st.one_of(*choices)), draw(st.booleans())


@SETTINGS
@given(
    shapes=mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=4, max_side=4),
    op=st.sampled_from(["add", "mul"]),
    seed=seeds,
)
def test_binary_broadcasting(shapes: Any, op: str, seed: int) -> None:
    (sa, sb), out_shape = shapes.input_shapes, shapes.result_shape
    rng = np.random.default_rng(seed)
    a_data, b_data = rng.standard_normal(sa), rng.standard_normal(sb)
    a, b = Tensor(a_data, requires_grad=True), Tensor(b_data, requires_grad=True)
    out = getattr(ax, op)(a, b)
    expected = a_data + b_data if op == "add" else a_data * b_data
    assert out.shape == np.shape(expected) == out_shape
    np.testing.assert_allclose(out.data, expected, rtol=1e-12)

    g = rng.standard_normal(out_shape)
    out.backward(g)
    assert a.grad.shape == sa and b.grad.shape == sb
    a_full, b_full = np.broadcast_to(a_data, out_shape), np.broadcast_to(b_data, out_shape)
    ga = g if op == "add" else g * b_full
    gb = g if op == "add" else g * a_full
    np.testing.assert_allclose(a.grad, unbroadcast(ga, sa), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b.grad, unbroadcast(gb, sb), rtol=1e-10, atol=1e-12)


@SETTINGS
@given(args=reduction_args(), op=st.sampled_from(["sum", "max", "mean"]), seed=seeds)
def test_reductions_with_keepdims(
    args: tuple[tuple[int, ...], Any, bool], op: str, seed: int
) -> None:
    shape, axis, keepdims = args
    rng = np.random.default_rng(seed)
    data = rng.standard_normal(shape)  # continuous values: no ties for max
    x = Tensor(data, requires_grad=True)
    out = {"sum": ax.sum, "max": ax.max, "mean": functional.mean}[op](x, axis, keepdims)
    expected = getattr(np, op)(data, axis=axis, keepdims=keepdims)
    assert out.shape == np.shape(expected)
    np.testing.assert_allclose(out.data, expected, rtol=1e-12)

    g = rng.standard_normal(out.shape)
    out.backward(g)
    assert x.grad.shape == shape
    # Every input element feeds exactly one output element: the kept-dims reduction image.
    g_kept = np.broadcast_to(
        np.reshape(g, np.shape(getattr(np, op)(data, axis, keepdims=True))), shape
    )
    if op == "sum":
        expected_grad = g_kept
    elif op == "mean":
        expected_grad = g_kept * (np.size(expected) / data.size)
    else:
        is_max = data == np.max(data, axis=axis, keepdims=True)
        expected_grad = np.where(is_max, g_kept, 0.0)
    np.testing.assert_allclose(x.grad, expected_grad, rtol=1e-12, atol=1e-15)
