"""Slices hand their input a gradient of one region (`RegionGrad`); the engine writes it into
the input's pending gradient. Whatever else reaches that input, the sum must be the one the
zero-padded gradients gave."""

from __future__ import annotations

import numpy as np

from civetta import axioms as ax
from civetta.tensor import Tensor

_rng = np.random.default_rng(11)


def _leaf() -> Tensor:
    return Tensor(_rng.standard_normal((3, 4, 5)), requires_grad=True)


def test_every_piece_lands_in_its_region() -> None:
    x = _leaf()
    a, b, c = ax.split(x, 3, axis=0)
    weights = [_rng.standard_normal((1, 4, 5)) for _ in range(3)]
    loss = ax.sum(
        ax.add(ax.add(ax.mul(a, weights[0]), ax.mul(b, weights[1])), ax.mul(c, weights[2]))
    )
    loss.backward()
    assert x.grad is not None
    np.testing.assert_array_equal(x.grad, np.concatenate(weights, axis=0))


def test_unused_pieces_leave_zeros_and_other_uses_add_up() -> None:
    x = _leaf()
    _, b, _ = ax.split(x, 3, axis=0)
    # x also reaches the loss directly: its gradient is 2 everywhere, +1 on b's rows.
    loss = ax.add(ax.sum(b), ax.sum(ax.mul(x, 2.0)))
    loss.backward()
    expected = np.full((3, 4, 5), 2.0)
    expected[1] += 1.0
    np.testing.assert_array_equal(x.grad, expected)


def test_a_retained_graph_gives_the_same_gradient_twice() -> None:
    x = _leaf()
    a, b = ax.split(x, [1], axis=0)
    loss = ax.add(ax.sum(ax.mul(a, 3.0)), ax.sum(b))
    loss.backward(retain_graph=True)
    first = np.array(x.grad)
    x.grad = None
    loss.backward()
    np.testing.assert_array_equal(x.grad, first)


def test_float32_pieces_keep_float32() -> None:
    x = Tensor(_rng.standard_normal((4, 6)).astype(np.float32), requires_grad=True)
    pieces = ax.split(x, 2, axis=1)
    ax.sum(ax.add(pieces[0], pieces[1])).backward()
    assert x.grad is not None and x.grad.dtype == np.float32
    np.testing.assert_array_equal(x.grad, np.ones((4, 6), np.float32))
