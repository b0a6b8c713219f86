"""Gradient redirections on 4 ranks, float64: forward values and gradients against numpy.

Each op runs over the tp group (2 ranks, mesh dp=2 × tp=2) and over the world (4 ranks). The
per-rank inputs and upstream gradients come from a shared seed, so every rank can compute what
the whole group's result must be.
"""

from __future__ import annotations

import numpy as np
from _harness import check, run

from civetta.functional import gelu
from civetta.tensor import Tensor
from parallel.comm import Group
from parallel.mesh import Mesh
from parallel.redirect import (
    copy_to_region,
    gather_from_region,
    gather_from_sequence_region,
    reduce_from_region,
    reduce_scatter_to_region,
    scatter_to_region,
)

MESH = Mesh(dp=2, tp=2, order="tp-dp-pp")
LEDGER = MESH.ledger
GROUPS = [MESH.group("tp"), MESH.world]
TOL = 1e-12


def per_rank(group: Group, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """(group size, *shape) float64, the same on every rank; row r belongs to group rank r."""
    return np.random.default_rng(seed).standard_normal((group.size, *shape))


def piece(array: np.ndarray, group: Group, axis: int) -> np.ndarray:
    return np.split(array, group.size, axis=axis)[group.rank]


def leaf(array: np.ndarray) -> Tensor:
    return Tensor(np.array(array, dtype=np.float64), requires_grad=True)


def close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def ledger_rows() -> list[tuple[str, str, str, int, int]]:
    return [(r["op"], r["axis"], r["phase"], r["bytes"], r["calls"]) for r in LEDGER.as_list()]


@check
def copy_to_region_op() -> None:
    for group in GROUPS:
        LEDGER.reset()
        x_full = per_rank(group, (3, 4), seed=1)[0]  # replicated input
        grads = per_rank(group, (3, 4), seed=2)  # each rank's own upstream gradient
        x = leaf(x_full)
        y = copy_to_region(x, group)
        close(y.data, x_full)
        assert ledger_rows() == []  # nothing moves forward
        y.backward(grads[group.rank])
        close(x.grad, grads.sum(axis=0))
        assert ledger_rows() == [("all_reduce", group.axis, "backward", 96, 1)]


@check
def reduce_from_region_op() -> None:
    for group in GROUPS:
        LEDGER.reset()
        parts = per_rank(group, (3, 4), seed=3)
        upstream = per_rank(group, (3, 4), seed=4)[0]  # replicated, as after a replicated loss
        x = leaf(parts[group.rank])
        y = reduce_from_region(x, group)
        close(y.data, parts.sum(axis=0))
        y.backward(upstream)
        close(x.grad, upstream)
        assert ledger_rows() == [("all_reduce", group.axis, "forward", 96, 1)]


@check
def gather_from_region_op() -> None:
    for group in GROUPS:
        for axis in (-1, 0):
            LEDGER.reset()
            full = per_rank(group, (4, 8), seed=5)[0]
            upstream = per_rank(group, (4, 8), seed=6)[0]
            x = leaf(piece(full, group, axis))
            y = gather_from_region(x, group, axis=axis)
            close(y.data, full)
            y.backward(upstream)
            close(x.grad, piece(upstream, group, axis))
            shard_bytes = full.nbytes // group.size
            assert ledger_rows() == [("all_gather", group.axis, "forward", shard_bytes, 1)]


@check
def scatter_to_region_op() -> None:
    for group in GROUPS:
        for axis in (-1, 0):
            LEDGER.reset()
            full = per_rank(group, (4, 8), seed=7)[0]
            upstream = per_rank(group, (4, 8), seed=8)[0]
            x = leaf(full)
            y = scatter_to_region(x, group, axis=axis)
            close(y.data, piece(full, group, axis))
            y.backward(piece(upstream, group, axis))
            close(x.grad, upstream)
            shard_bytes = full.nbytes // group.size
            assert ledger_rows() == [("all_gather", group.axis, "backward", shard_bytes, 1)]


@check
def reduce_scatter_to_region_op() -> None:
    for group in GROUPS:
        LEDGER.reset()
        parts = per_rank(group, (2, 8, 3), seed=9)  # (B, T, C) partial sums
        upstream = per_rank(group, (2, 8, 3), seed=10)[0]
        x = leaf(parts[group.rank])
        y = reduce_scatter_to_region(x, group, axis=1)
        close(y.data, piece(parts.sum(axis=0), group, 1))
        y.backward(piece(upstream, group, 1))
        close(x.grad, upstream)
        full_bytes = parts[0].nbytes
        assert ledger_rows() == [
            ("all_gather", group.axis, "backward", full_bytes // group.size, 1),
            ("reduce_scatter", group.axis, "forward", full_bytes, 1),
        ]


@check
def gather_from_sequence_region_op() -> None:
    for group in GROUPS:
        LEDGER.reset()
        full = per_rank(group, (2, 8, 3), seed=11)[0]
        grads = per_rank(group, (2, 8, 3), seed=12)  # each rank's own (partial) gradient
        x = leaf(piece(full, group, 1))
        y = gather_from_sequence_region(x, group, axis=1)
        close(y.data, full)
        y.backward(grads[group.rank])
        close(x.grad, piece(grads.sum(axis=0), group, 1))
        assert ledger_rows() == [
            ("all_gather", group.axis, "forward", full.nbytes // group.size, 1),
            ("reduce_scatter", group.axis, "backward", full.nbytes, 1),
        ]


def mlp_reference(x: np.ndarray, w1: np.ndarray, w2: np.ndarray, r: np.ndarray):
    """One process: loss = sum(gelu(x @ w1) @ w2 * r); value and gradients."""
    xt, w1t, w2t = leaf(x), leaf(w1), leaf(w2)
    y = gelu(xt @ w1t) @ w2t
    (y * Tensor(r)).sum().backward()
    return y.data, xt.grad, w1t.grad, w2t.grad


@check
def tensor_parallel_mlp() -> None:
    # Column-parallel w1 (split by output columns), row-parallel w2 (split by input rows):
    # copy_to_region in front, reduce_from_region behind, and no communication in between.
    for group in GROUPS:
        LEDGER.reset()
        rng = np.random.default_rng(13)
        x_full = rng.standard_normal((2, 5, 6))  # (B, T, C)
        w1 = rng.standard_normal((6, 8))
        w2 = rng.standard_normal((8, 6))
        r = rng.standard_normal((2, 5, 6))
        y_ref, gx_ref, gw1_ref, gw2_ref = mlp_reference(x_full, w1, w2, r)

        x, w1_shard, w2_shard = leaf(x_full), leaf(piece(w1, group, 1)), leaf(piece(w2, group, 0))
        hidden = gelu(copy_to_region(x, group) @ w1_shard)  # (B, T, 8 / n)
        y = reduce_from_region(hidden @ w2_shard, group)  # (B, T, C)
        (y * Tensor(r)).sum().backward()
        close(y.data, y_ref)
        close(x.grad, gx_ref)
        close(w1_shard.grad, piece(gw1_ref, group, 1))
        close(w2_shard.grad, piece(gw2_ref, group, 0))
        assert ledger_rows() == [
            ("all_reduce", group.axis, "backward", x_full.nbytes, 1),
            ("all_reduce", group.axis, "forward", y_ref.nbytes, 1),
        ]


@check
def sequence_parallel_mlp() -> None:
    # The same pair with the activations split along the sequence outside the block:
    # all-gather the sequence in, reduce-scatter it out.
    for group in GROUPS:
        LEDGER.reset()
        rng = np.random.default_rng(14)
        x_full = rng.standard_normal((2, 8, 6))  # (B, T, C), T divisible by 4
        w1 = rng.standard_normal((6, 8))
        w2 = rng.standard_normal((8, 6))
        r = rng.standard_normal((2, 8, 6))
        y_ref, gx_ref, gw1_ref, gw2_ref = mlp_reference(x_full, w1, w2, r)

        x = leaf(piece(x_full, group, 1))  # (B, T / n, C)
        w1_shard, w2_shard = leaf(piece(w1, group, 1)), leaf(piece(w2, group, 0))
        hidden = gelu(gather_from_sequence_region(x, group, axis=1) @ w1_shard)
        y = reduce_scatter_to_region(hidden @ w2_shard, group, axis=1)  # (B, T / n, C)
        (y * Tensor(piece(r, group, 1))).sum().backward()
        close(y.data, piece(y_ref, group, 1))
        close(x.grad, piece(gx_ref, group, 1))
        close(w1_shard.grad, piece(gw1_ref, group, 1))
        close(w2_shard.grad, piece(gw2_ref, group, 0))
        ops = {(op, phase) for op, _, phase, _, _ in ledger_rows()}
        assert ops == {
            ("all_gather", "forward"),
            ("reduce_scatter", "forward"),
            ("all_gather", "backward"),
            ("reduce_scatter", "backward"),
        }


if __name__ == "__main__":
    run()
