"""Collective checks on 4 ranks (mesh dp=2 × tp=2): values against numpy, and exact ledgers.

Every rank builds the arrays of every other rank from a shared seed, so the expected result of a
collective is plain numpy on the full set.
"""

from __future__ import annotations

import numpy as np
from _harness import check, run
from mpi4py import MPI

from parallel.comm import CommError, Group, Ledger
from parallel.mesh import Mesh

COMM = MPI.COMM_WORLD
MESH = Mesh(dp=2, tp=2, order="tp-dp-pp")
LEDGER = MESH.ledger


def arrays_of(group: Group, shape: tuple[int, ...], dtype: type = np.float64, seed: int = 0):
    """One array per member of `group`, in group-rank order, the same on every rank."""
    rng = np.random.default_rng(seed)
    full = rng.standard_normal((group.size, *shape)) * 10
    return full.astype(dtype)


def groups() -> list[Group]:
    return [MESH.world, MESH.group("tp"), MESH.group("dp")]


@check
def all_reduce_values() -> None:
    for group in groups():
        for dtype in (np.float64, np.float32, np.int64):
            xs = arrays_of(group, (3, 5), dtype)
            mine = xs[group.rank]
            out = group.all_reduce(mine)
            np.testing.assert_allclose(out, xs.sum(axis=0), rtol=1e-6)
            assert out.dtype == dtype and out is not mine
            np.testing.assert_array_equal(group.all_reduce(mine, op="max"), xs.max(axis=0))
            np.testing.assert_array_equal(group.all_reduce(mine, op="min"), xs.min(axis=0))
        # A non-contiguous input and an in-place reduction.
        xs = arrays_of(group, (4, 6))
        strided = xs[group.rank][:, ::2]
        np.testing.assert_allclose(group.all_reduce(strided), xs.sum(axis=0)[:, ::2], rtol=1e-12)
        buf = xs[group.rank].copy()
        assert group.all_reduce(buf, out=buf) is buf
        np.testing.assert_allclose(buf, xs.sum(axis=0), rtol=1e-12)


@check
def all_gather_values() -> None:
    for group in groups():
        xs = arrays_of(group, (2, 3, 4))
        for axis in (0, 1, 2, -1):
            out = group.all_gather(xs[group.rank], axis=axis)
            np.testing.assert_array_equal(out, np.concatenate(list(xs), axis=axis))
        # Into caller buffers, along the first and a later axis.
        out0 = np.empty((2 * group.size, 3, 4))
        assert group.all_gather(xs[group.rank], out=out0) is out0
        np.testing.assert_array_equal(out0, np.concatenate(list(xs)))
        out2 = np.empty((2, 3, 4 * group.size))
        assert group.all_gather(xs[group.rank], axis=2, out=out2) is out2
        np.testing.assert_array_equal(out2, np.concatenate(list(xs), axis=2))
        try:
            group.all_gather(xs[group.rank], out=np.empty((2, 3, 4)))
        except CommError:
            pass
        else:
            raise AssertionError("all_gather into a too-small buffer did not raise")
        # A strided shard along a middle axis.
        shard = xs[group.rank][:, ::2]
        out = group.all_gather(shard, axis=1)
        np.testing.assert_array_equal(out, np.concatenate([x[:, ::2] for x in xs], axis=1))


@check
def reduce_scatter_values() -> None:
    for group in groups():
        n = group.size
        xs = arrays_of(group, (2 * n, 3 * n, n))
        total = xs.sum(axis=0)
        for axis in (0, 1, 2, -2):
            out = group.reduce_scatter(xs[group.rank], axis=axis)
            want = np.split(total, n, axis=axis)[group.rank]
            assert out.shape == want.shape
            np.testing.assert_allclose(out, want, rtol=1e-12)
        out = np.empty((2 * n, 3 * n, 1))
        assert group.reduce_scatter(xs[group.rank], axis=2, out=out) is out
        np.testing.assert_allclose(out, np.split(total, n, axis=2)[group.rank], rtol=1e-12)
        try:
            group.reduce_scatter(np.zeros((n + 1, 2)), axis=0)
        except CommError:
            pass
        else:
            raise AssertionError("reduce_scatter of an indivisible axis did not raise")


@check
def broadcast_values() -> None:
    for group in groups():
        xs = arrays_of(group, (3, 2))
        root = group.size - 1
        buf = xs[group.rank].copy()
        out = group.broadcast(buf, root=root)
        np.testing.assert_array_equal(out, xs[root])
        assert out is buf  # a contiguous buffer is filled in place


@check
def send_recv_ring() -> None:
    # Even ranks send first and odd ranks receive first, so blocking calls pair up; 1 MiB
    # messages go through the rendezvous protocol, where a wrong pairing would deadlock.
    world = MESH.world
    n, r = world.size, world.rank
    xs = arrays_of(world, (128, 1024))
    if r % 2 == 0:
        world.send(xs[r], dest=(r + 1) % n, tag=7)
        got = world.recv((128, 1024), np.float64, source=(r - 1) % n, tag=7)
    else:
        got = world.recv((128, 1024), np.float64, source=(r - 1) % n, tag=7)
        world.send(xs[r], dest=(r + 1) % n, tag=7)
    np.testing.assert_array_equal(got, xs[(r - 1) % n])
    for bad in (r, n):
        try:
            world.send(xs[r], dest=bad)
        except CommError:
            pass
        else:
            raise AssertionError(f"send to {bad} did not raise")


@check
def ledger_is_exact() -> None:
    LEDGER.reset()
    dp, tp, world = MESH.group("dp"), MESH.group("tp"), MESH.world
    with LEDGER.phase("optimizer"):
        dp.all_reduce(np.zeros(10, np.float32))  # 40 bytes
        dp.all_reduce(np.zeros(6, np.float32))  # 24 bytes
    with LEDGER.phase("forward"):
        tp.all_gather(np.zeros((3, 4)), axis=1)  # shard: 96 bytes
    with LEDGER.phase("backward"):
        world.reduce_scatter(np.zeros((4, 4)))  # full input: 128 bytes
        with LEDGER.phase("forward"):  # phases nest and restore
            tp.all_reduce(np.zeros(3))
        tp.all_reduce(np.zeros(2))
    tp.broadcast(np.zeros(5, np.int64))  # 40 bytes, phase "other"
    r = world.rank
    if r < 2:  # p2p between world ranks 0 and 1
        if r == 0:
            world.send(np.zeros(7, np.float32), dest=1)
        else:
            world.recv((7,), np.float32, source=0)
    rows = LEDGER.as_list()
    assert all(row["time_s"] > 0 for row in rows), rows
    got = [{k: v for k, v in row.items() if k != "time_s"} for row in rows]
    # wire_bytes, ring algorithms: all-reduce 2(n−1)·⌈N/n⌉ elements (zeros(3) on 2 ranks: 2·2·8),
    # all-gather (n−1)·shard, reduce-scatter (n−1)·chunk (3·32), broadcast and send the buffer.
    row = ("op", "axis", "phase", "bytes", "calls", "wire_bytes")
    want = [
        dict(zip(row, values, strict=True))
        for values in [
            ("all_gather", "tp", "forward", 96, 1, 96),
            ("all_reduce", "dp", "optimizer", 64, 2, 40 + 24),
            ("all_reduce", "tp", "backward", 16, 1, 16),
            ("all_reduce", "tp", "forward", 24, 1, 32),
            ("broadcast", "tp", "other", 40, 1, 40),
            ("reduce_scatter", "world", "backward", 128, 1, 96),
        ]
    ]
    if r == 0:
        want.append(dict(zip(row, ("send", "world", "other", 28, 1, 28), strict=True)))
    if r == 1:
        want.insert(5, dict(zip(row, ("recv", "world", "other", 28, 1, 0), strict=True)))
    assert got == want, got
    assert LEDGER.wire_bytes(op="all_reduce", axis="tp") == 48
    assert LEDGER.bytes() == sum(row["bytes"] for row in want)
    assert LEDGER.bytes(op="all_reduce") == 104
    assert LEDGER.bytes(axis="tp") == 96 + 16 + 24 + 40
    assert LEDGER.bytes(op="all_reduce", axis="tp", phase="forward") == 24
    assert LEDGER.calls(op="all_reduce") == 4
    assert LEDGER.current_phase == "other"
    LEDGER.reset()
    assert LEDGER.as_list() == [] and LEDGER.bytes() == 0


@check
def size_one_group_sends_nothing() -> None:
    LEDGER.reset()
    pp = MESH.group("pp")
    assert pp.size == 1
    x = np.arange(12.0).reshape(3, 4)
    assert pp.all_reduce(x) is x
    assert pp.all_gather(x, axis=1) is x
    assert pp.reduce_scatter(x, axis=1) is x
    assert pp.broadcast(x) is x
    pp.barrier()
    try:
        pp.send(x, dest=0)
    except CommError:
        pass
    else:
        raise AssertionError("send to itself did not raise")
    assert LEDGER.as_list() == []


@check
def a_fresh_ledger_per_group() -> None:
    ledger = Ledger()
    group = Group(COMM, "world", ledger)
    group.all_reduce(np.ones(4))
    assert ledger.bytes() == 32 and MESH.ledger.bytes() == 0


if __name__ == "__main__":
    run()
