"""The process mesh: which data-, tensor- and pipeline-parallel coordinates each rank holds.

World ranks are laid out on a dp × tp × pp grid. The order string names the axes fastest-varying
first, as Megatron-LM does: with "tp-dp-pp", world ranks 0 and 1 differ in their tp index, so a
tensor-parallel group is a run of consecutive ranks and stays inside one node when it can.

`MeshLayout` is the arithmetic alone (any world size, no communicator), for the cost model and
for tests. `Mesh` adds one communicator per axis, split from the world, each wrapped in a traced
`Group` that shares the mesh's ledger.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from parallel.comm import Group, Ledger, SelfComm, world_comm

AXES = ("dp", "tp", "pp")


class MeshError(ValueError):
    """A mesh that cannot be built: bad sizes, bad order string, or a world of the wrong size."""


def parse_order(order: str) -> tuple[str, str, str]:
    """The axis names of `order` ("tp-dp-pp"), fastest-varying first."""
    names = tuple(order.split("-")) if isinstance(order, str) else ()
    if sorted(names) != sorted(AXES):
        raise MeshError(
            f"parallel.order must name dp, tp and pp once each joined by '-' "
            f"(e.g. 'tp-dp-pp'), got {order!r}"
        )
    return names  # type: ignore[return-value]


@dataclass(frozen=True)
class MeshLayout:
    """Rank <-> coordinates arithmetic of a dp × tp × pp grid; needs no MPI."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    order: str = "tp-dp-pp"

    def __post_init__(self) -> None:
        for axis in AXES:
            value = getattr(self, axis)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MeshError(f"parallel.{axis} must be a positive integer, got {value!r}")
        parse_order(self.order)

    @property
    def axes(self) -> tuple[str, str, str]:
        """Axis names, fastest-varying first."""
        return parse_order(self.order)

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def size(self, axis: str) -> int:
        if axis not in AXES:
            raise MeshError(f"unknown mesh axis {axis!r}; expected one of dp, tp, pp")
        return getattr(self, axis)

    def stride(self, axis: str) -> int:
        """World-rank distance between neighbours along `axis`."""
        stride = 1
        for name in self.axes:
            if name == axis:
                return stride
            stride *= self.size(name)
        raise MeshError(f"unknown mesh axis {axis!r}; expected one of dp, tp, pp")

    def coords_of(self, rank: int) -> dict[str, int]:
        """{"dp": i, "tp": j, "pp": k} of world rank `rank`."""
        if not 0 <= rank < self.world_size:
            raise MeshError(f"rank {rank} is outside a world of {self.world_size}")
        coords: dict[str, int] = {}
        rest = rank
        for name in self.axes:
            rest, coords[name] = divmod(rest, self.size(name))
        return {axis: coords[axis] for axis in AXES}

    def rank_of(self, dp: int = 0, tp: int = 0, pp: int = 0) -> int:
        """World rank at the given coordinates."""
        coords = {"dp": dp, "tp": tp, "pp": pp}
        rank = 0
        for axis, index in coords.items():
            if not 0 <= index < self.size(axis):
                raise MeshError(f"{axis} index {index} is outside 0..{self.size(axis) - 1}")
            rank += index * self.stride(axis)
        return rank

    def group_ranks(self, axis: str, rank: int) -> tuple[int, ...]:
        """World ranks of `rank`'s group along `axis`, in group-rank (axis index) order."""
        coords = self.coords_of(rank)
        coords[axis] = 0
        first = self.rank_of(**coords)
        step = self.stride(axis)
        return tuple(first + i * step for i in range(self.size(axis)))

    def crosses_node(self, axis: str, gpus_per_node: int, rank: int | None = None) -> bool:
        """Whether `rank`'s group along `axis` (any group, when `rank` is None) spans more than
        one node, when world ranks fill nodes of `gpus_per_node` consecutively."""
        if (
            isinstance(gpus_per_node, bool)
            or not isinstance(gpus_per_node, int)
            or gpus_per_node < 1
        ):
            raise MeshError(f"gpus_per_node must be a positive integer, got {gpus_per_node!r}")
        ranks = range(self.world_size) if rank is None else (rank,)
        return any(
            len({r // gpus_per_node for r in self.group_ranks(axis, member)}) > 1
            for member in ranks
        )


class Mesh:
    """This rank's place in the dp × tp × pp grid, with one traced `Group` per axis.

    `comm` defaults to MPI.COMM_WORLD under an MPI launcher and to a one-process stand-in
    otherwise. Building a mesh is collective: every rank of `comm` must build the same one.
    """

    def __init__(
        self,
        dp: int = 1,
        tp: int = 1,
        pp: int = 1,
        order: str = "tp-dp-pp",
        comm: Any = None,
        ledger: Ledger | None = None,
    ) -> None:
        self.layout = MeshLayout(dp, tp, pp, order)
        self.comm = world_comm() if comm is None else comm
        self.ledger = Ledger() if ledger is None else ledger
        self.world_size: int = self.comm.Get_size()
        if self.world_size != self.layout.world_size:
            raise MeshError(
                f"dp × tp × pp = {dp} × {tp} × {pp} = {self.layout.world_size} ranks, "
                f"but the world has {self.world_size}"
            )
        self.rank: int = self.comm.Get_rank()
        self.coords: dict[str, int] = self.layout.coords_of(self.rank)
        self.world = Group(self.comm, "world", self.ledger, tuple(range(self.world_size)))
        self._groups: dict[str, Group] = {}
        self._owned: list[Any] = []  # communicators this mesh split off, freed by close()
        for axis in AXES:  # the same order on every rank: Split is collective
            ranks = self.layout.group_ranks(axis, self.rank)
            if len(ranks) == 1:
                axis_comm: Any = SelfComm()  # a lone rank needs no communicator
            elif len(ranks) == self.world_size:
                axis_comm = self.comm
            else:
                # Ranks sharing the other two coordinates share the first member's rank as colour;
                # the axis index as key makes group rank == axis coordinate.
                axis_comm = self.comm.Split(ranks[0], self.coords[axis])
                self._owned.append(axis_comm)
            self._groups[axis] = Group(axis_comm, axis, self.ledger, ranks)
            assert self._groups[axis].rank == self.coords[axis]

    def close(self) -> None:
        """Free the communicators this mesh split off (collective, like building it)."""
        for comm in self._owned:
            comm.Free()
        self._owned.clear()

    def __repr__(self) -> str:
        return (
            f"Mesh(dp={self.layout.dp}, tp={self.layout.tp}, pp={self.layout.pp}, "
            f"order={self.layout.order!r}, rank={self.rank}, coords={self.coords})"
        )

    @property
    def order(self) -> str:
        return self.layout.order

    @property
    def dp_rank(self) -> int:
        return self.coords["dp"]

    @property
    def tp_rank(self) -> int:
        return self.coords["tp"]

    @property
    def pp_rank(self) -> int:
        return self.coords["pp"]

    def size(self, axis: str) -> int:
        """Number of ranks along `axis` ("dp", "tp", "pp"; "world" for all of them)."""
        if axis == "world":
            return self.world_size
        return self.layout.size(axis)

    def group(self, axis: str) -> Group:
        """This rank's group along `axis` ("dp", "tp", "pp", or "world")."""
        if axis == "world":
            return self.world
        if axis not in self._groups:
            raise MeshError(f"unknown mesh axis {axis!r}; expected one of dp, tp, pp, world")
        return self._groups[axis]

    def rank_of(self, dp: int = 0, tp: int = 0, pp: int = 0) -> int:
        """World rank at the given coordinates."""
        return self.layout.rank_of(dp=dp, tp=tp, pp=pp)

    def crosses_node(self, axis: str, gpus_per_node: int) -> bool:
        """Whether this rank's group along `axis` spans more than one node, when world ranks fill
        nodes of `gpus_per_node` consecutively."""
        return self.layout.crosses_node(axis, gpus_per_node, rank=self.rank)
