"""A virtual mesh: one rank's view of a dp × tp × pp world whose collectives are recorded, not sent.

The cost model projects a step by running the model's own code for one representative rank. It
needs that rank's `Mesh` and `Group`s to behave as in an executed run (sizes, ranks, the ledger
rows of every call) without MPI, peers or messages. `VirtualComm` stands in for the mpi4py
communicator: it answers `Get_rank`/`Get_size`, splits into the sub-communicators a real
`MPI_Comm_split` would give this rank, and completes every collective at once, writing a
deterministic fill into the outputs. The real `Mesh` and `Group` run on top of it, so every
ledger rule of `parallel.comm` is reused as is.

The fill is "as if every rank held this rank's data": a reduction returns its input, an
all-gather repeats the input n times, a reduce-scatter returns this rank's chunk of its input,
a broadcast leaves the buffer as it is, an all-to-all receives from every rank the block of the
input meant for this rank, and a receive (a sendrecv's too) gets zeros. The values are meaningless;
the shapes, dtypes and bytes are exact. Data-free buffers (`civetta.meta`) are left unfilled,
so a data-free step runs on a virtual mesh as a real one does; `fill` may be swapped.

mpi4py is never imported here: importing it initialises MPI and makes
`parallel.comm.launched_by_mpi()` true.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from civetta import meta
from parallel.comm import REDUCTIONS, CommError, Ledger
from parallel.mesh import DERIVED, GROUPS, Mesh, MeshLayout

# fill(out, source): write `source` (broadcast to out's shape) into `out`, or zeros if None.
Fill = Callable[[Any, Any], None]


def numpy_fill(out: Any, source: Any = None) -> None:
    """The default fill: numpy's assignment rules, so any array-like that supports
    `np.copyto` (or slice assignment, for the zeros) works. A data-free buffer (`civetta.meta`)
    has no values to write: it is left as it is."""
    if meta.is_meta(out):
        return
    if source is None:
        out[...] = 0
    else:
        np.copyto(out, source)


class _InPlace:
    """`VirtualComm.in_place`: the marker `Group` passes as the send buffer of an in-place
    all-reduce (mpi4py's MPI.IN_PLACE on a real communicator)."""

    def __repr__(self) -> str:
        return "IN_PLACE"


IN_PLACE = _InPlace()


class VirtualRequest:
    """What `VirtualComm.Isend` returns: already complete, since nothing is sent."""

    def __init__(self) -> None:
        self.completed = False

    def Wait(self) -> None:  # noqa: N802 - mpi4py's name
        self.completed = True

    def Test(self) -> bool:  # noqa: N802 - mpi4py's name
        self.completed = True
        return True

    @classmethod
    def Waitall(cls, requests: Sequence[VirtualRequest]) -> None:  # noqa: N802 - mpi4py's name
        for request in requests:
            request.Wait()


class VirtualComm:
    """This rank's communicator in a world of `size` ranks that sends nothing.

    `layout` is the mesh the world is cut into; `Split` needs it to know which ranks share this
    rank's colour (a real split learns it from the other ranks' calls). Sub-communicators carry
    no layout and cannot be split further.
    """

    # What `Group` uses in place of mpi4py's MPI.SUM, ... and MPI.IN_PLACE.
    reduction_ops: ClassVar[dict[str, str]] = {name: name for name in REDUCTIONS}
    in_place = IN_PLACE

    def __init__(
        self,
        size: int,
        rank: int,
        layout: MeshLayout | None = None,
        fill: Fill = numpy_fill,
    ) -> None:
        if not 0 <= rank < size:
            raise CommError(f"rank {rank} is outside a virtual world of {size}")
        if layout is not None and layout.world_size != size:
            raise CommError(f"a layout of {layout.world_size} ranks cannot cut a world of {size}")
        self.size = size
        self.rank = rank
        self.layout = layout
        self.fill = fill
        self._split_axes: set[str] = set()

    def __repr__(self) -> str:
        return f"VirtualComm(size={self.size}, rank={self.rank})"

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py's name
        return self.rank

    def Get_size(self) -> int:  # noqa: N802 - mpi4py's name
        return self.size

    def Split(self, color: int = 0, key: int = 0) -> VirtualComm:  # noqa: N802 - mpi4py's name
        """The sub-communicator of the mesh axis that this (color, key) names.

        `Mesh` splits each axis of 2..size-1 ranks once, in `AXES` order, with the group's first
        world rank as colour and the axis coordinate as key; every member of the group passes the
        same colour, so MPI would give the group's size and this rank's axis coordinate. When two
        axes fit (this rank is the first of both groups), the first axis not yet split is the one
        `Mesh` is splitting.
        """
        if self.layout is None:
            raise CommError("a virtual communicator without a mesh layout cannot be split")
        seen: list[tuple[int, ...]] = []
        for axes in GROUPS:
            name = "_".join(axes)
            members = self.layout.group_ranks(axes, self.rank)
            repeated = name in DERIVED and members in seen  # the mesh reuses that group
            seen.append(members)
            if name in self._split_axes or len(members) in (1, self.size) or repeated:
                continue
            if members[0] == color and self.layout.group_index(axes, self.rank) == key:
                self._split_axes.add(name)
                return VirtualComm(len(members), members.index(self.rank), fill=self.fill)
        raise CommError(
            f"Split(color={color}, key={key}) on world rank {self.rank} names no mesh axis of "
            f"{self.layout} still to split"
        )

    def Barrier(self) -> None:  # noqa: N802 - mpi4py's name
        pass

    def Free(self) -> None:  # noqa: N802 - mpi4py's name
        pass

    # -- collectives: complete at once, outputs filled --
    def Allreduce(self, sendbuf: Any, recvbuf: Any, op: Any = "sum") -> None:  # noqa: N802
        if sendbuf is not IN_PLACE:  # in place, the input already is the fill
            self.fill(recvbuf, sendbuf)

    def Allgather(self, sendbuf: Any, recvbuf: Any) -> None:  # noqa: N802 - mpi4py's name
        # The result is n blocks of the send buffer's shape, back to back.
        self.fill(recvbuf.reshape(self.size, *np.shape(sendbuf)), sendbuf)

    def Reduce_scatter_block(self, sendbuf: Any, recvbuf: Any, op: Any = "sum") -> None:  # noqa: N802
        # Block r of the send buffer is the one rank r receives.
        blocks = sendbuf.reshape(self.size, *np.shape(recvbuf))
        self.fill(recvbuf, blocks[self.rank])

    def Bcast(self, buf: Any, root: int = 0) -> None:  # noqa: N802 - mpi4py's name
        self._check_peer(root)

    def Alltoall(self, sendbuf: Any, recvbuf: Any) -> None:  # noqa: N802 - mpi4py's name
        # Every rank sends this rank its block `rank`: as if all held this rank's send buffer.
        blocks = sendbuf.reshape(self.size, -1)
        self.fill(recvbuf.reshape(self.size, -1), blocks[self.rank])

    def Alltoallv(self, sendbuf: Any, recvbuf: Any) -> None:  # noqa: N802 - mpi4py's name
        # [array, counts] specs, as mpi4py takes them; what arrives is not known: zeros.
        self.fill(recvbuf[0], None)

    # -- point to point --
    def Send(self, buf: Any, dest: int, tag: int = 0) -> None:  # noqa: N802 - mpi4py's name
        self._check_peer(dest)

    def Isend(self, buf: Any, dest: int, tag: int = 0) -> VirtualRequest:  # noqa: N802
        self._check_peer(dest)
        return VirtualRequest()

    def Recv(self, buf: Any, source: int, tag: int = 0) -> None:  # noqa: N802 - mpi4py's name
        self._check_peer(source)
        self.fill(buf, None)

    def Sendrecv(  # noqa: N802 - mpi4py's name
        self,
        sendbuf: Any,
        dest: int,
        sendtag: int = 0,
        recvbuf: Any = None,
        source: int = 0,
        recvtag: int = 0,
    ) -> None:
        # A send that completes at once and a receive of zeros, as `Send` and `Recv`.
        self._check_peer(dest)
        self._check_peer(source)
        self.fill(recvbuf, None)

    def _check_peer(self, peer: int) -> None:
        if not 0 <= peer < self.size:
            raise CommError(f"rank {peer} is outside a virtual communicator of {self.size}")


def virtual_mesh(
    dp: int = 1,
    tp: int = 1,
    pp: int = 1,
    order: str = "tp-dp-pp",
    rank: int = 0,
    ledger: Ledger | None = None,
    fill: Fill = numpy_fill,
    cp: int = 1,
    ep: int = 1,
) -> Mesh:
    """World rank `rank`'s `Mesh` of a dp × tp × pp × cp world (experts folded over ep), over a
    `VirtualComm`."""
    layout = MeshLayout(dp, tp, pp, order, cp, ep)
    comm = VirtualComm(layout.world_size, rank, layout, fill)
    return Mesh(dp, tp, pp, order, comm=comm, ledger=ledger, cp=cp, ep=ep)
