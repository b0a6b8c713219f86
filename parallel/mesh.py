"""The process mesh: which data-, tensor-, pipeline- and context-parallel coordinates each rank
holds.

World ranks are laid out on a dp × tp × pp × cp grid. The order string names the axes
fastest-varying first, as Megatron-LM does: with "tp-cp-dp-pp", world ranks 0 and 1 differ in
their tp index, so a tensor-parallel group is a run of consecutive ranks and stays inside one
node when it can. An order that leaves cp out ("tp-dp-pp") puts it right after tp, as
Megatron-core's default tp-cp-ep-dp-pp does. Besides one group per axis, the mesh has the
group of ranks that hold the same parameters and different tokens: dp × cp ("dp_cp"), over
which gradients are averaged and ZeRO shards (Megatron-core's data-parallel group with context
parallelism).

Expert parallelism folds onto that group, as Megatron-core's "parallel folding" does: the ep
ranks of an expert-parallel group ("ep") are consecutive members of the dp × cp group, each
holding a different slice of the experts, and the ranks holding the same experts form the
expert-data-parallel group ("edp", dp·cp/ep ranks), over which expert gradients are reduced.
ep adds no ranks to the world: attention sees dp × tp × cp, the experts ep × edp (× tp).

`MeshLayout` is the arithmetic alone (any world size, no communicator), for the cost model and
for tests. `Mesh` adds one communicator per axis, split from the world, each wrapped in a traced
`Group` that shares the mesh's ledger.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from parallel.comm import Group, Ledger, SelfComm, world_comm

AXES = ("dp", "tp", "pp", "cp")
# The groups a mesh builds, in the order it splits them: one per axis, then dp × cp.
GROUPS: tuple[tuple[str, ...], ...] = (
    ("dp",),
    ("tp",),
    ("pp",),
    ("cp",),
    ("dp", "cp"),
    ("ep",),
    ("edp",),
)
# Groups cut out of dp × cp rather than along an axis of the grid (expert parallelism).
FOLDED = ("ep", "edp")
# Groups that may equal an earlier one (dp × cp with cp = 1, ep = dp·cp, ...): they reuse its
# communicator instead of splitting again.
DERIVED = ("dp_cp", *FOLDED)


class MeshError(ValueError):
    """A mesh that cannot be built: bad sizes, bad order string, or a world of the wrong size."""


@functools.lru_cache(maxsize=64)  # every rank lookup of a mesh parses its order
def parse_order(order: str) -> tuple[str, ...]:
    """The axis names of `order` ("tp-dp-pp", "tp-cp-dp-pp"), fastest-varying first; a cp left
    out goes right after tp."""
    names = tuple(order.split("-")) if isinstance(order, str) else ()
    if "cp" not in names and "tp" in names:
        at = names.index("tp") + 1
        names = (*names[:at], "cp", *names[at:])
    if sorted(names) != sorted(AXES):
        raise MeshError(
            f"parallel.order must name dp, tp and pp (and optionally cp) once each joined by "
            f"'-' (e.g. 'tp-dp-pp'), got {order!r}"
        )
    return names


@dataclass(frozen=True)
class MeshLayout:
    """Rank <-> coordinates arithmetic of a dp × tp × pp × cp grid; needs no MPI."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    order: str = "tp-dp-pp"
    cp: int = 1
    ep: int = 1  # expert parallelism, folded onto dp × cp (adds no ranks)

    def __post_init__(self) -> None:
        for axis in (*AXES, "ep"):
            value = getattr(self, axis)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MeshError(f"parallel.{axis} must be a positive integer, got {value!r}")
        if (self.dp * self.cp) % self.ep:
            raise MeshError(
                f"parallel.ep={self.ep} does not divide parallel.dp × parallel.cp = "
                f"{self.dp * self.cp} (the experts fold onto the data-parallel ranks)"
            )
        parse_order(self.order)

    @property
    def axes(self) -> tuple[str, ...]:
        """Axis names, fastest-varying first."""
        return parse_order(self.order)

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    def size(self, axis: str) -> int:
        if axis == "ep":
            return self.ep
        if axis == "edp":
            return self.dp * self.cp // self.ep
        if axis not in AXES:
            raise MeshError(f"unknown mesh axis {axis!r}; expected one of dp, tp, pp, cp")
        return getattr(self, axis)

    def stride(self, axis: str) -> int:
        """World-rank distance between neighbours along `axis`."""
        stride = 1
        for name in self.axes:
            if name == axis:
                return stride
            stride *= self.size(name)
        raise MeshError(f"unknown mesh axis {axis!r}; expected one of dp, tp, pp, cp")

    def coords_of(self, rank: int) -> dict[str, int]:
        """{"dp": i, "tp": j, "pp": k, "cp": l} of world rank `rank`."""
        if not 0 <= rank < self.world_size:
            raise MeshError(f"rank {rank} is outside a world of {self.world_size}")
        coords: dict[str, int] = {}
        rest = rank
        for name in self.axes:
            rest, coords[name] = divmod(rest, self.size(name))
        return {axis: coords[axis] for axis in AXES}

    def rank_of(self, dp: int = 0, tp: int = 0, pp: int = 0, cp: int = 0) -> int:
        """World rank at the given coordinates."""
        coords = {"dp": dp, "tp": tp, "pp": pp, "cp": cp}
        rank = 0
        for axis, index in coords.items():
            if not 0 <= index < self.size(axis):
                raise MeshError(f"{axis} index {index} is outside 0..{self.size(axis) - 1}")
            rank += index * self.stride(axis)
        return rank

    def group_ranks(self, axis: str | tuple[str, ...], rank: int) -> tuple[int, ...]:
        """World ranks of `rank`'s group along `axis` (in axis-index order), or along several
        axes together (in world-rank order, as a split of the world orders them)."""
        axes = (axis,) if isinstance(axis, str) else axis
        if axes[0] in FOLDED:
            return self._folded_group(axes[0], rank)
        coords = self.coords_of(rank)
        for name in axes:
            coords[name] = 0
        first = self.rank_of(**coords)
        ranks = [first]
        for name in axes:
            step = self.stride(name)
            ranks = [r + i * step for i in range(self.size(name)) for r in ranks]
        return tuple(ranks) if len(axes) == 1 else tuple(sorted(ranks))

    def _folded_group(self, name: str, rank: int) -> tuple[int, ...]:
        """The ep group: runs of ep consecutive members of the dp × cp group; the edp group:
        the members ep apart (the same experts)."""
        members = self.group_ranks(("dp", "cp"), rank)
        index = members.index(rank)
        if name == "ep":
            start = index // self.ep * self.ep
            return members[start : start + self.ep]
        return members[index % self.ep :: self.ep]

    def group_index(self, axes: str | tuple[str, ...], rank: int) -> int:
        """`rank`'s index in its group along `axes` (its group rank)."""
        name = axes if isinstance(axes, str) else axes[0]
        if name in FOLDED:
            return self._folded_group(name, rank).index(rank)
        if isinstance(axes, str) or len(axes) == 1:
            return self.coords_of(rank)[axes if isinstance(axes, str) else axes[0]]
        return self.group_ranks(axes, rank).index(rank)

    def crosses_node(
        self, axis: str | tuple[str, ...], gpus_per_node: int, rank: int | None = None
    ) -> bool:
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
    """This rank's place in the dp × tp × pp × cp grid, with one traced `Group` per axis and
    one over dp × cp ("dp_cp", recorded in the ledger under "dp": gradients and ZeRO).

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
        cp: int = 1,
        ep: int = 1,
    ) -> None:
        self.layout = MeshLayout(dp, tp, pp, order, cp, ep)
        self.comm = world_comm() if comm is None else comm
        self.ledger = Ledger() if ledger is None else ledger
        self.world_size: int = self.comm.Get_size()
        if self.world_size != self.layout.world_size:
            raise MeshError(
                f"dp × tp × pp × cp = {dp} × {tp} × {pp} × {cp} = {self.layout.world_size} "
                f"ranks, but the world has {self.world_size}"
            )
        self.rank: int = self.comm.Get_rank()
        self.coords: dict[str, int] = self.layout.coords_of(self.rank)
        self.world = Group(self.comm, "world", self.ledger, tuple(range(self.world_size)))
        self._groups: dict[str, Group] = {}
        self._owned: list[Any] = []  # communicators this mesh split off, freed by close()
        for axes in GROUPS:  # the same order on every rank: Split is collective
            name = "_".join(axes)
            ranks = self.layout.group_ranks(axes, self.rank)
            index = self.layout.group_index(axes, self.rank)
            # dp × cp recorded as "dp" (gradients), so are the expert-data-parallel reductions;
            # the experts' all-to-alls as "ep".
            label = "dp" if name in ("dp_cp", "edp") else name
            same = [g for g in self._groups.values() if g.ranks == ranks and name in DERIVED]
            if same:  # equal to an earlier group (dp × cp with cp = 1, ...): its communicator
                self._groups[name] = Group(same[0].comm, label, self.ledger, ranks)
                continue
            if len(ranks) == 1:
                axis_comm: Any = SelfComm()  # a lone rank needs no communicator
            elif len(ranks) == self.world_size:
                axis_comm = self.comm
            else:
                # Ranks sharing the other coordinates share the first member's rank as colour;
                # the index along the axes as key makes group rank == that index.
                axis_comm = self.comm.Split(ranks[0], index)
                self._owned.append(axis_comm)
            self._groups[name] = Group(axis_comm, label, self.ledger, ranks)
            assert self._groups[name].rank == index

    def close(self) -> None:
        """Free the communicators this mesh split off (collective, like building it)."""
        for comm in self._owned:
            comm.Free()
        self._owned.clear()

    def __repr__(self) -> str:
        return (
            f"Mesh(dp={self.layout.dp}, tp={self.layout.tp}, pp={self.layout.pp}, "
            f"cp={self.layout.cp}, ep={self.layout.ep}, order={self.layout.order!r}, "
            f"rank={self.rank}, "
            f"coords={self.coords})"
        )

    @property
    def order(self) -> str:
        return self.layout.order

    @property
    def dp_rank(self) -> int:
        return self.coords["dp"]

    @property
    def cp_rank(self) -> int:
        return self.coords["cp"]

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
        """This rank's group along `axis` ("dp", "tp", "pp", "cp", "dp_cp", "ep", "edp", or
        "world")."""
        if axis == "world":
            return self.world
        if axis not in self._groups:
            raise MeshError(
                f"unknown mesh axis {axis!r}; expected one of dp, tp, pp, cp, dp_cp, ep, edp, world"
            )
        return self._groups[axis]

    def rank_of(self, dp: int = 0, tp: int = 0, pp: int = 0, cp: int = 0) -> int:
        """World rank at the given coordinates."""
        return self.layout.rank_of(dp=dp, tp=tp, pp=pp, cp=cp)

    def crosses_node(self, axis: str, gpus_per_node: int) -> bool:
        """Whether this rank's group along `axis` spans more than one node, when world ranks fill
        nodes of `gpus_per_node` consecutively."""
        return self.layout.crosses_node(axis, gpus_per_node, rank=self.rank)
