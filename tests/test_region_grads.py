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


def test_a_piece_used_twice_adds_up_with_the_others() -> None:
    """Pieces that overlap (the same slice reached twice) are added, not copied over: the
    engine writes pieces into an uninitialised array only when they tile the input once."""
    x = _leaf()
    a, b, c = ax.split(x, [1, 3], axis=2)
    w = [_rng.standard_normal(p.shape) for p in (a, a, b, c)]
    terms = [ax.sum(ax.mul(p, wi)) for p, wi in zip((a, a, b, c), w, strict=True)]
    loss = ax.add(ax.add(terms[0], terms[1]), ax.add(terms[2], terms[3]))
    loss.backward()
    assert x.grad is not None
    np.testing.assert_allclose(x.grad, np.concatenate([w[0] + w[1], w[2], w[3]], axis=2))


def test_pieces_that_tile_their_input_are_written_whole() -> None:
    """Every element of the input's gradient comes from exactly one piece (no stale memory)."""
    for _ in range(3):  # reused heap memory would show through an element left unwritten
        x = Tensor(_rng.standard_normal((2, 3, 7)), requires_grad=True)
        pieces = ax.split(x, [2, 5], axis=2)
        weights = [_rng.standard_normal(p.shape) for p in pieces]
        total = ax.sum(ax.mul(pieces[2], weights[2]))
        for p, wi in zip(pieces[:2], weights[:2], strict=True):
            total = ax.add(total, ax.sum(ax.mul(p, wi)))
        total.backward()
        np.testing.assert_array_equal(x.grad, np.concatenate(weights, axis=2))
