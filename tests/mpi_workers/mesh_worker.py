"""Mesh checks on 4 ranks: coordinates and the members of every axis group, for each layout.

Rank 0 reports, per layout and order, every rank's coordinates and the world ranks its axis
groups actually contain (found by all-gathering world ranks through each group).
"""

from __future__ import annotations

import itertools

import numpy as np
from _harness import check, data, run
from mpi4py import MPI

from parallel.mesh import Mesh, MeshError

AXES = ("dp", "tp", "pp")  # the orders checked here leave cp (of one rank) out

COMM = MPI.COMM_WORLD
LAYOUTS = [(2, 2, 1), (1, 2, 2), (2, 1, 2), (4, 1, 1), (1, 4, 1), (1, 1, 4)]
ORDERS = ["-".join(p) for p in itertools.permutations(AXES)]


def expected_coords(rank: int, sizes: dict[str, int], order: str) -> dict[str, int]:
    """Coordinates by numpy's unravel_index: C order varies the last axis fastest."""
    axes = order.split("-")[::-1]
    index = np.unravel_index(rank, [sizes[a] for a in axes])
    return {a: int(i) for a, i in zip(axes, index, strict=True)}


@check
def coordinates_and_groups() -> None:
    for (dp, tp, pp), order in itertools.product(LAYOUTS, ORDERS):
        mesh = Mesh(dp=dp, tp=tp, pp=pp, order=order)
        sizes = {"dp": dp, "tp": tp, "pp": pp}
        want = {**expected_coords(COMM.rank, sizes, order), "cp": 0}
        assert mesh.coords == want, (order, mesh.coords, want)
        assert (mesh.dp_rank, mesh.tp_rank, mesh.pp_rank) == (want["dp"], want["tp"], want["pp"])
        assert mesh.rank_of(**mesh.coords) == COMM.rank
        members = {}
        for axis in AXES:
            group = mesh.group(axis)
            assert group.size == sizes[axis] == mesh.size(axis)
            assert group.rank == want[axis]
            gathered = group.all_gather(np.array([COMM.rank], dtype=np.int64))
            members[axis] = gathered.tolist()
            assert tuple(members[axis]) == group.ranks, (axis, members[axis], group.ranks)
            for member in members[axis]:  # the others share this rank's other coordinates
                other = expected_coords(member, sizes, order)
                assert all(other[a] == want[a] for a in AXES if a != axis)
        mesh.close()
        everyone = COMM.gather(members, root=0)
        if COMM.rank == 0:
            data[f"{dp},{tp},{pp} {order}"] = everyone


@check
def wrong_world_size_raises() -> None:
    try:
        Mesh(dp=2, tp=1, pp=1)
    except MeshError as exc:
        assert "world has 4" in str(exc)
    else:
        raise AssertionError("Mesh(dp=2) on 4 ranks did not raise")


@check
def crosses_node() -> None:
    mesh = Mesh(dp=2, tp=2, order="tp-dp-pp")  # tp groups {0,1},{2,3}; dp groups {0,2},{1,3}
    assert not mesh.crosses_node("tp", 2)
    assert mesh.crosses_node("dp", 2)
    assert not mesh.crosses_node("dp", 4)
    assert not mesh.crosses_node("pp", 1)


if __name__ == "__main__":
    run()
