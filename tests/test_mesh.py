"""The process mesh: layout arithmetic, one-process meshes, and real groups on 4 MPI ranks."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
from mpi_helpers import run_worker

from parallel.comm import SelfComm
from parallel.mesh import AXES, Mesh, MeshError, MeshLayout, parse_order


# ---- one process --------------------------------------------------------------------------------
def test_single_process_mesh_needs_no_mpi() -> None:
    code = (
        "import sys; from parallel.mesh import Mesh; m = Mesh(); "
        "assert m.world_size == 1 and m.coords == {'dp': 0, 'tp': 0, 'pp': 0, 'cp': 0}; "
        "assert 'mpi4py' not in sys.modules, 'mpi4py was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_single_process_mesh() -> None:
    mesh = Mesh()
    assert (mesh.rank, mesh.world_size) == (0, 1)
    assert (mesh.dp_rank, mesh.tp_rank, mesh.pp_rank) == (0, 0, 0)
    for axis in (*AXES, "world"):
        group = mesh.group(axis)
        assert (group.size, group.rank, group.axis) == (1, 0, axis)
        assert mesh.size(axis) == 1
    assert mesh.rank_of() == 0
    assert not mesh.crosses_node("tp", 1)


@pytest.mark.parametrize("order", ["tp-dp", "tp-dp-dp", "tp_dp_pp", "TP-DP-PP", "", None, "x-y-z"])
def test_bad_order_raises(order: object) -> None:
    with pytest.raises(MeshError, match=r"parallel\.order"):
        Mesh(order=order)  # type: ignore[arg-type]


@pytest.mark.parametrize("sizes", [{"dp": 2}, {"tp": 3}, {"dp": 2, "pp": 2}])
def test_size_mismatch_raises(sizes: dict[str, int]) -> None:
    with pytest.raises(MeshError, match="the world has 1"):
        Mesh(**sizes)


@pytest.mark.parametrize("sizes", [{"dp": 0}, {"tp": -1}, {"pp": 1.5}, {"dp": True}])
def test_bad_sizes_raise(sizes: dict[str, object]) -> None:
    with pytest.raises(MeshError, match="positive integer"):
        Mesh(**sizes)  # type: ignore[arg-type]


def test_error_is_one_line() -> None:
    with pytest.raises(MeshError) as info:
        Mesh(dp=2, tp=2, comm=SelfComm())
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("order", ["-".join(p) for p in itertools.permutations(AXES)])
def test_layout_roundtrip_every_order(order: str) -> None:
    layout = MeshLayout(dp=2, tp=3, pp=4, order=order)
    fastest = parse_order(order)[0]
    assert layout.stride(fastest) == 1
    seen = set()
    for rank in range(layout.world_size):
        coords = layout.coords_of(rank)
        assert layout.rank_of(**coords) == rank
        seen.add(tuple(coords.values()))
        for axis in AXES:
            members = layout.group_ranks(axis, rank)
            assert len(members) == layout.size(axis) and rank in members
            assert [layout.coords_of(m)[axis] for m in members] == list(range(layout.size(axis)))
    assert len(seen) == 24


def test_megatron_order() -> None:
    # "tp-dp-pp" with tp=2, dp=2, pp=2: tp neighbours are consecutive, then dp, then pp.
    layout = MeshLayout(dp=2, tp=2, pp=2, order="tp-dp-pp")
    assert layout.group_ranks("tp", 0) == (0, 1)
    assert layout.group_ranks("dp", 0) == (0, 2)
    assert layout.group_ranks("pp", 0) == (0, 4)
    assert layout.rank_of(dp=1, tp=1, pp=1) == 7
    assert layout.coords_of(5) == {"dp": 0, "tp": 1, "pp": 1, "cp": 0}


def test_crosses_node() -> None:
    layout = MeshLayout(dp=2, tp=4, pp=2, order="tp-dp-pp")  # 16 ranks
    assert not layout.crosses_node("tp", 8)
    assert layout.crosses_node("tp", 2)
    assert not layout.crosses_node("dp", 8)  # dp neighbours are 4 apart: {0, 4} on one node
    assert layout.crosses_node("pp", 8)  # pp neighbours are 8 apart
    assert not layout.crosses_node("pp", 16)
    # tp=3 on nodes of 4: group {0,1,2} fits, group {3,4,5} does not.
    uneven = MeshLayout(dp=2, tp=3, order="tp-dp-pp")
    assert not uneven.crosses_node("tp", 4, rank=0)
    assert uneven.crosses_node("tp", 4, rank=3)
    assert uneven.crosses_node("tp", 4)
    with pytest.raises(MeshError, match="gpus_per_node"):
        layout.crosses_node("tp", 0)


def test_bad_axis_and_coordinates() -> None:
    mesh = Mesh()
    with pytest.raises(MeshError, match="unknown mesh axis"):
        mesh.group("sp")
    with pytest.raises(MeshError, match="outside"):
        mesh.rank_of(dp=1)


# ---- 4 ranks ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mpi_mesh() -> dict:
    return run_worker(4, "mesh_worker", timeout=60)


def test_mpi_checks_pass(mpi_mesh: dict) -> None:
    failures = {name: errors for name, errors in mpi_mesh["results"].items() if errors}
    assert not failures, failures


# Groups per rank, as {axis: world ranks}, written out by hand for the two Megatron orders.
EXPECTED = {
    "2,2,1 tp-dp-pp": {
        "tp": [[0, 1], [0, 1], [2, 3], [2, 3]],
        "dp": [[0, 2], [1, 3], [0, 2], [1, 3]],
    },
    "2,2,1 dp-tp-pp": {
        "dp": [[0, 1], [0, 1], [2, 3], [2, 3]],
        "tp": [[0, 2], [1, 3], [0, 2], [1, 3]],
    },
    "1,2,2 tp-dp-pp": {
        "tp": [[0, 1], [0, 1], [2, 3], [2, 3]],
        "pp": [[0, 2], [1, 3], [0, 2], [1, 3]],
    },
    "1,2,2 dp-tp-pp": {
        "tp": [[0, 1], [0, 1], [2, 3], [2, 3]],
        "pp": [[0, 2], [1, 3], [0, 2], [1, 3]],
    },
}


@pytest.mark.parametrize("layout", sorted(EXPECTED))
def test_mpi_group_members(mpi_mesh: dict, layout: str) -> None:
    per_rank = mpi_mesh["data"][layout]
    for axis, want in EXPECTED[layout].items():
        assert [groups[axis] for groups in per_rank] == want, axis
    size_one = [axis for axis in ("dp", "tp", "pp") if axis not in EXPECTED[layout]]
    for axis in size_one:
        assert [groups[axis] for groups in per_rank] == [[0], [1], [2], [3]]


def test_mpi_every_order_reported(mpi_mesh: dict) -> None:
    assert len(mpi_mesh["data"]) == 6 * 6
