"""Traced collectives and point-to-point messages on numpy buffers.

A `Group` wraps one communicator (one axis of the mesh) and moves contiguous numpy buffers with
mpi4py's uppercase buffer methods only; the pickling lowercase methods never appear here. Every
call that moves data is recorded in a `Ledger` under (op, axis, phase) with its bytes, calls and
seconds, which is what metrics.json reports in its "comm" section.

Two measures are recorded per call. ``bytes`` is the size of the buffer this rank passed in, in
the dtype it stands for: its ``nbytes``, except that under emulated mixed precision a float32
buffer holds bf16/fp16 values and counts 2 bytes an element, what a GPU would send
(`Ledger.float32_itemsize`, set by the trainer):

- all_reduce: the input array;
- all_gather: this rank's input shard (not the gathered result);
- reduce_scatter: the full input array (not the returned chunk);
- broadcast: the broadcast buffer, on every rank;
- send / recv: the message, on each side (count "send" alone for the bytes on the links);
- all_to_all: this rank's whole input buffer (its n chunks, its own included);
- sendrecv: the buffer sent (not the one received: its sender counts that).

``wire_bytes`` is what this rank sends on the links when a group of n ranks runs the collective
as a ring (the bandwidth-optimal algorithm, NCCL's default for large buffers). With it a
reduce-scatter plus an all-gather costs exactly one all-reduce, which is the accounting of the
ZeRO paper (Rajbhandari et al. 2020, §7); ``bytes`` cannot compare them. For a buffer of S bytes
(N elements of e bytes):

- all_reduce: 2(n−1)·⌈N/n⌉·e, a reduce-scatter then an all-gather of n chunks of ⌈N/n⌉ elements
  (2(n−1)/n·S when n divides N);
- all_gather: (n−1)·shard bytes: the ring forwards every other rank's shard once;
- reduce_scatter: (n−1)·S/n, one chunk per ring step;
- broadcast: S on every rank (a pipelined chain forwards the whole buffer at each hop; the last
  rank's 0 is not told apart);
- all_to_all: (n−1)·S/n: every chunk but this rank's own leaves it once;
- send, sendrecv: S; recv: 0 (the sender counts the message).

A group of one rank sends nothing and records nothing. `SelfComm` stands in for an MPI
communicator when the process was not started by an MPI launcher, so a world of size 1 never
imports mpi4py; `parallel.virtual.VirtualComm` stands in for one rank of a larger world whose
calls are recorded and not sent, and brings its own reduction ops and in-place marker.

Buffers may be data-free (`civetta.meta`: a shape and a dtype, no values): results are then
data-free too, and every ledger row is the same, since it counts shapes and dtypes only.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from civetta import meta

PHASES = ("forward", "backward", "optimizer", "other")

# Variables that MPI launchers (MPICH/Intel hydra, Open MPI, PMIx, Slurm) put in each rank's
# environment: their presence means COMM_WORLD may hold more than this process.
_LAUNCHER_ENV = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


class CommError(ValueError):
    """A collective was asked for something its shapes or arguments cannot give."""


# ---- the ledger -------------------------------------------------------------------------------
class CallEvent(NamedTuple):
    """One recorded call, for a timeline: `start` is its `time.perf_counter()` reading."""

    op: str
    axis: str
    phase: str
    nbytes: int
    start: float
    seconds: float


class Ledger:
    """Totals of every recorded call, keyed by (op, axis, phase).

    The current phase is "other" until a `phase` block says otherwise; the gradient
    redirections open "forward" and "backward" blocks themselves. Between `start_events` and
    `stop_events` each call is also kept in order, with its start time (for trace.json); the
    log is off by default, and off it costs one comparison a call.
    """

    def __init__(self) -> None:
        # Values are [bytes, calls, seconds, wire_bytes] lists: mutated in place, cheaper than a
        # dataclass.
        self._totals: dict[tuple[str, str, str], list[Any]] = {}
        self.current_phase = "other"
        self._paused = False
        # Bytes a float32 element counts for: 2 when its values are emulated bf16/fp16.
        self.float32_itemsize = 4
        self.events: list[CallEvent] | None = None  # None: not logging

    def itemsize(self, dtype: np.dtype) -> int:
        return self.float32_itemsize if dtype == np.float32 else dtype.itemsize

    def nbytes(self, x: np.ndarray) -> int:
        """`x`'s bytes in the dtype it stands for."""
        return x.size * self.itemsize(x.dtype)

    def start_events(self) -> None:
        """Keep every call recorded from now on in `events` (a fresh, empty log)."""
        self.events = []

    def stop_events(self) -> list[CallEvent]:
        """Stop logging; return the calls logged since `start_events` (none if never started)."""
        events, self.events = self.events or [], None
        return events

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Record nothing inside the block: traffic outside training (a checkpoint's gathers)."""
        previous, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = previous

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Record the calls made inside the block under phase `name`."""
        if name not in PHASES:
            raise CommError(f"unknown phase {name!r}; expected one of {', '.join(PHASES)}")
        previous, self.current_phase = self.current_phase, name
        try:
            yield
        finally:
            self.current_phase = previous

    def record(
        self, op: str, axis: str, nbytes: int, seconds: float, wire_bytes: int | None = None
    ) -> None:
        """Add one call; `wire_bytes` defaults to `nbytes` (a point-to-point message)."""
        if self._paused:
            return
        key = (op, axis, self.current_phase)
        wire = nbytes if wire_bytes is None else wire_bytes
        entry = self._totals.get(key)
        if entry is None:
            self._totals[key] = [nbytes, 1, seconds, wire]
        else:
            entry[0] += nbytes
            entry[1] += 1
            entry[2] += seconds
            entry[3] += wire
        if self.events is not None:
            # The call ended just now (callers time it up to this call): it began `seconds` ago.
            end = time.perf_counter()
            self.events.append(CallEvent(op, axis, key[2], nbytes, end - seconds, seconds))

    def _select(self, op: str | None, axis: str | None, phase: str | None) -> Iterator[list[Any]]:
        for (k_op, k_axis, k_phase), entry in self._totals.items():
            if (
                (op is None or k_op == op)
                and (axis is None or k_axis == axis)
                and (phase is None or k_phase == phase)
            ):
                yield entry

    def bytes(
        self, op: str | None = None, axis: str | None = None, phase: str | None = None
    ) -> int:
        """Total bytes of the calls matching every given filter."""
        return sum(entry[0] for entry in self._select(op, axis, phase))

    def calls(
        self, op: str | None = None, axis: str | None = None, phase: str | None = None
    ) -> int:
        """Number of calls matching every given filter."""
        return sum(entry[1] for entry in self._select(op, axis, phase))

    def seconds(
        self, op: str | None = None, axis: str | None = None, phase: str | None = None
    ) -> float:
        """Wall-clock seconds spent in the calls matching every given filter."""
        return sum(entry[2] for entry in self._select(op, axis, phase))

    def wire_bytes(
        self, op: str | None = None, axis: str | None = None, phase: str | None = None
    ) -> int:
        """Bytes this rank sent on the links (ring algorithms) in the matching calls."""
        return sum(entry[3] for entry in self._select(op, axis, phase))

    def as_list(self) -> list[dict[str, Any]]:
        """Rows for metrics.json: op, axis, phase, bytes, calls, time_s, wire_bytes; sorted for
        stable diffs."""
        return [
            {
                "op": op,
                "axis": axis,
                "phase": phase,
                "bytes": b,
                "calls": c,
                "time_s": s,
                "wire_bytes": w,
            }
            for (op, axis, phase), (b, c, s, w) in sorted(self._totals.items())
        ]

    def reset(self) -> None:
        """Forget every total (the current phase is kept)."""
        self._totals.clear()


# ---- communicators ----------------------------------------------------------------------------
class SelfComm:
    """The part of an mpi4py communicator that a one-process world needs, without MPI."""

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py's name
        return 0

    def Get_size(self) -> int:  # noqa: N802 - mpi4py's name
        return 1

    def Split(self, color: int = 0, key: int = 0) -> SelfComm:  # noqa: N802 - mpi4py's name
        return SelfComm()

    def Barrier(self) -> None:  # noqa: N802 - mpi4py's name
        pass

    def Free(self) -> None:  # noqa: N802 - mpi4py's name
        pass


def launched_by_mpi() -> bool:
    """Whether this process was started by an MPI launcher (or has already initialised MPI)."""
    return "mpi4py.MPI" in sys.modules or any(name in os.environ for name in _LAUNCHER_ENV)


def world_comm() -> Any:
    """MPI.COMM_WORLD under an MPI launcher, else a `SelfComm` (mpi4py is then not imported)."""
    if not launched_by_mpi():
        return SelfComm()
    from mpi4py import MPI

    return MPI.COMM_WORLD


REDUCTIONS = ("sum", "max", "min", "prod")


def _normalize_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise CommError(f"axis {axis} is out of range for an array with {ndim} dims")
    return axis % ndim


def _checked(out: np.ndarray, shape: tuple[int, ...], like: np.ndarray) -> np.ndarray:
    """`out` if MPI may write a result of `shape` and `like`'s dtype into it."""
    if out.shape != shape or out.dtype != like.dtype or not out.flags.c_contiguous:
        raise CommError(
            f"out must be a C-contiguous {like.dtype} array of shape {shape}, "
            f"got {out.dtype} {out.shape}"
        )
    return out


def _result(out: np.ndarray | None, shape: tuple[int, ...], like: np.ndarray) -> np.ndarray:
    """`out` checked, or a fresh buffer of `shape` in `like`'s dtype, data-free if `like` is."""
    return meta.empty(shape, like.dtype, like=like) if out is None else _checked(out, shape, like)


def _alone(x: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """What a collective over one rank returns: its input, or a copy in `out`."""
    if out is None or out is x:
        return x
    np.copyto(out, x)
    return out


def _reduction_constants(comm: Any) -> tuple[dict[str, Any], Any]:
    """`comm`'s reduction ops by name and its in-place marker: the communicator's own when it
    brings them (a virtual one, which must not import mpi4py), else mpi4py's."""
    ops = getattr(comm, "reduction_ops", None)
    if ops is not None:
        return dict(ops), comm.in_place
    from mpi4py import MPI

    return {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "prod": MPI.PROD}, MPI.IN_PLACE


# ---- the group --------------------------------------------------------------------------------
class Group:
    """The ranks along one mesh axis, with traced collectives over them.

    Arguments that name ranks (`root`, `dest`, `source`) are ranks within this group. Results
    are fresh arrays unless `out` is given; in a group of one rank the input itself is returned
    (no copy), since nothing was communicated.
    """

    def __init__(
        self,
        comm: Any,
        axis: str,
        ledger: Ledger,
        ranks: tuple[int, ...] | None = None,
    ) -> None:
        self.comm = comm
        self.axis = axis
        self.ledger = ledger
        self.size: int = comm.Get_size()
        self.rank: int = comm.Get_rank()
        # World ranks of the members in group-rank order, when the creator knows them.
        self.ranks: tuple[int, ...] | None = ranks
        self._ops: dict[str, Any] = {}
        self._in_place: Any = None
        if self.size > 1:
            self._ops, self._in_place = _reduction_constants(comm)

    def __repr__(self) -> str:
        return f"Group(axis={self.axis!r}, rank={self.rank}, size={self.size})"

    # -- collectives --
    def all_reduce(
        self, x: np.ndarray, op: str = "sum", out: np.ndarray | None = None
    ) -> np.ndarray:
        """Elementwise reduction of `x` over the group; every rank gets the result.

        Pass `out=x` (a contiguous array) to reduce in place.
        """
        if op not in REDUCTIONS:
            raise CommError(f"unknown reduction {op!r}; expected one of {', '.join(REDUCTIONS)}")
        if self.size == 1:
            return _alone(x, out)
        start = time.perf_counter()
        mpi_op = self._ops[op]
        if out is not None and out is x:
            if not x.flags.c_contiguous:
                raise CommError("all_reduce in place needs a C-contiguous array")
            self.comm.Allreduce(self._in_place, x, mpi_op)
            result = x
        else:
            send = x if x.flags.c_contiguous else meta.ascontiguousarray(x)
            result = np.empty_like(send) if out is None else _checked(out, send.shape, send)
            self.comm.Allreduce(send, result, mpi_op)
        chunk = -(-x.size // self.size) * self.ledger.itemsize(x.dtype)  # ⌈N/n⌉ elements
        wire = 2 * (self.size - 1) * chunk
        nbytes = self.ledger.nbytes(x)
        self.ledger.record("all_reduce", self.axis, nbytes, time.perf_counter() - start, wire)
        return result

    def all_gather(self, x: np.ndarray, axis: int = 0, out: np.ndarray | None = None) -> np.ndarray:
        """Concatenation of every rank's `x` along `axis`, in group-rank order."""
        if self.size == 1:
            return _alone(x, out)
        start = time.perf_counter()
        send = x if x.flags.c_contiguous else meta.ascontiguousarray(x)
        n = self.size
        if axis != 0:
            axis = _normalize_axis(axis, send.ndim)
        if axis == 0:
            # Rank blocks land back to back, which is already the concatenation along axis 0.
            shape = (send.shape[0] * n, *send.shape[1:]) if send.ndim else (n,)
            result = _result(out, shape, send)
            self.comm.Allgather(send, result)
        else:
            blocks = meta.empty((n, *send.shape), send.dtype, like=send)  # (n, *x.shape)
            self.comm.Allgather(send, blocks)
            result = np.concatenate(blocks, axis=axis, out=out)
        nbytes = self.ledger.nbytes(x)
        wire = (self.size - 1) * nbytes
        self.ledger.record("all_gather", self.axis, nbytes, time.perf_counter() - start, wire)
        return result

    def reduce_scatter(
        self, x: np.ndarray, axis: int = 0, out: np.ndarray | None = None
    ) -> np.ndarray:
        """The sum of every rank's `x`, split into group-size equal chunks along `axis`; this
        rank gets chunk `rank`."""
        if self.size == 1:
            return _alone(x, out)
        start = time.perf_counter()
        if axis != 0:
            axis = _normalize_axis(axis, x.ndim)
        n = self.size
        length = x.shape[axis]
        if length % n:
            raise CommError(
                f"reduce_scatter over {n} ranks needs axis {axis} divisible by {n}, got {length}"
            )
        chunk = length // n
        chunk_shape = (*x.shape[:axis], chunk, *x.shape[axis + 1 :])
        if axis == 0:
            send = x if x.flags.c_contiguous else meta.ascontiguousarray(x)
        else:
            # Make chunk r the r-th contiguous block: split the axis into (n, chunk) and move n to
            # the front; this is the one copy a non-leading axis costs.
            split = x.reshape(*x.shape[:axis], n, chunk, *x.shape[axis + 1 :])
            to_front = (axis, *(a for a in range(split.ndim) if a != axis))  # np.moveaxis
            send = meta.ascontiguousarray(split.transpose(to_front))
        result = _result(out, chunk_shape, x)
        self.comm.Reduce_scatter_block(send, result, self._ops["sum"])
        wire = (n - 1) * self.ledger.nbytes(result)
        seconds = time.perf_counter() - start
        self.ledger.record("reduce_scatter", self.axis, self.ledger.nbytes(x), seconds, wire)
        return result

    def broadcast(self, x: np.ndarray, root: int = 0) -> np.ndarray:
        """Root's `x` on every rank.

        Non-root ranks pass an array of the same shape and dtype; a C-contiguous one is
        overwritten in place and returned (so a parameter buffer can be filled directly).
        """
        if self.size == 1:
            return meta.asarray(x)
        start = time.perf_counter()
        buf = meta.ascontiguousarray(x)
        self.comm.Bcast(buf, root)
        self.ledger.record(
            "broadcast", self.axis, self.ledger.nbytes(buf), time.perf_counter() - start
        )
        return buf

    def all_to_all(self, x: np.ndarray, split_axis: int, concat_axis: int) -> np.ndarray:
        """Every rank's `x` cut into group-size equal chunks along `split_axis`; chunk j goes to
        rank j, and the chunks this rank receives are concatenated along `concat_axis` in
        group-rank order. `all_to_all(y, concat_axis, split_axis)` undoes it.
        """
        if self.size == 1:
            return x
        start = time.perf_counter()
        n = self.size
        split_axis = _normalize_axis(split_axis, x.ndim)
        concat_axis = _normalize_axis(concat_axis, x.ndim)
        length = x.shape[split_axis]
        if length % n:
            raise CommError(
                f"all_to_all over {n} ranks needs axis {split_axis} divisible by {n}, got {length}"
            )
        chunk = length // n
        chunk_shape = (*x.shape[:split_axis], chunk, *x.shape[split_axis + 1 :])
        if split_axis == 0:
            send = x if x.flags.c_contiguous else meta.ascontiguousarray(x)
        else:
            # Chunk j must be the j-th contiguous block of the send buffer (as in reduce_scatter).
            split = x.reshape(*x.shape[:split_axis], n, chunk, *x.shape[split_axis + 1 :])
            to_front = (split_axis, *(a for a in range(split.ndim) if a != split_axis))
            send = meta.ascontiguousarray(split.transpose(to_front))
        blocks = meta.empty((n, *chunk_shape), x.dtype, like=send)  # block i: from rank i
        self.comm.Alltoall(send, blocks)
        if concat_axis == 0:
            result = blocks.reshape(n * chunk_shape[0], *chunk_shape[1:])  # a view, no copy
        else:
            result = np.concatenate(blocks, axis=concat_axis)
        nbytes = self.ledger.nbytes(x)
        wire = (n - 1) * (nbytes // n)  # this rank keeps its own chunk
        self.ledger.record("all_to_all", self.axis, nbytes, time.perf_counter() - start, wire)
        return result

    def exchange_counts(self, counts: np.ndarray) -> np.ndarray:
        """Every rank's int64 `counts` (group size, ...): row j goes to rank j; returns the rows
        received, row i from rank i. The counts an uneven all-to-all needs first; recorded as
        its own op ("count_exchange"), so the payload's bytes stay the payload's."""
        counts = np.ascontiguousarray(counts, dtype=np.int64)
        if self.size == 1:
            return counts
        start = time.perf_counter()
        received = np.empty_like(counts)
        self.comm.Alltoall(counts, received)
        nbytes = counts.nbytes
        wire = (self.size - 1) * (nbytes // self.size)
        self.ledger.record("count_exchange", self.axis, nbytes, time.perf_counter() - start, wire)
        return received

    def all_to_all_v(
        self, x: np.ndarray, send_counts: np.ndarray, recv_counts: np.ndarray
    ) -> np.ndarray:
        """Uneven all-to-all along axis 0: the first send_counts[0] rows of `x` go to rank 0,
        the next send_counts[1] to rank 1, ...; returns the rows received, recv_counts[i] from
        rank i, in group-rank order. Data-free when `x` is. Recorded bytes: every row sent,
        this rank's own included (`wire`: the rows that leave the rank)."""
        send_counts = np.asarray(send_counts, dtype=np.int64)
        recv_counts = np.asarray(recv_counts, dtype=np.int64)
        if send_counts.sum() != x.shape[0]:
            raise CommError(
                f"all_to_all_v sends {int(send_counts.sum())} rows, the buffer has {x.shape[0]}"
            )
        if self.size == 1:
            return x
        start = time.perf_counter()
        row = int(np.prod(x.shape[1:], dtype=np.int64))
        send = meta.ascontiguousarray(x)
        received = meta.empty((int(recv_counts.sum()), *x.shape[1:]), x.dtype, like=send)
        self.comm.Alltoallv([send, send_counts * row], [received, recv_counts * row])
        itemsize = self.ledger.itemsize(x.dtype)
        nbytes = int(send_counts.sum()) * row * itemsize
        wire = nbytes - int(send_counts[self.rank]) * row * itemsize
        self.ledger.record("all_to_all", self.axis, nbytes, time.perf_counter() - start, wire)
        return received

    # -- point to point --
    def send(self, x: np.ndarray, dest: int, tag: int = 0) -> None:
        """Blocking send of `x` to group rank `dest`."""
        self._check_peer(dest, "dest")
        start = time.perf_counter()
        buf = meta.ascontiguousarray(x)
        self.comm.Send(buf, dest, tag)
        self.ledger.record("send", self.axis, self.ledger.nbytes(buf), time.perf_counter() - start)

    def isend(self, x: np.ndarray, dest: int, tag: int = 0) -> Any:
        """Non-blocking send of `x` to group rank `dest`; returns a request for `wait_all`.

        The buffer must stay unchanged until then; the request keeps a reference to it.
        """
        self._check_peer(dest, "dest")
        start = time.perf_counter()
        buf = meta.ascontiguousarray(x)
        request = self.comm.Isend(buf, dest, tag)
        self.ledger.record("send", self.axis, self.ledger.nbytes(buf), time.perf_counter() - start)
        return (request, buf)

    @staticmethod
    def wait_all(requests: list[Any]) -> None:
        """Complete the requests `isend` returned (their buffers may then be reused)."""
        if requests:
            # The requests' own class completes them: MPI.Request, or a virtual stand-in that
            # must not import mpi4py (parallel.virtual).
            type(requests[0][0]).Waitall([request for request, _ in requests])
            requests.clear()

    def recv(
        self,
        shape: tuple[int, ...],
        dtype: Any,
        source: int,
        tag: int = 0,
        out: np.ndarray | None = None,
        like: Any = None,
    ) -> np.ndarray:
        """Blocking receive of an array of `shape` and `dtype` from group rank `source`. The
        buffer is data-free when `like` is (`civetta.meta.empty`): a data-free run receives
        nothing but still counts the message."""
        self._check_peer(source, "source")
        start = time.perf_counter()
        buf = meta.empty(shape, dtype, like=like) if out is None else out
        self.comm.Recv(buf, source, tag)
        self.ledger.record(
            "recv", self.axis, self.ledger.nbytes(buf), time.perf_counter() - start, 0
        )
        return buf

    def sendrecv(self, x: np.ndarray, dest: int, source: int, tag: int = 0) -> np.ndarray:
        """Send `x` to group rank `dest` and receive an array of its shape and dtype from group
        rank `source`, in one call (a ring shift cannot deadlock). Data-free when `x` is. The
        message sent is recorded; a group of one returns `x`, having sent nothing."""
        if self.size == 1:
            return x
        for peer, what in ((dest, "dest"), (source, "source")):
            if not 0 <= peer < self.size:
                raise CommError(
                    f"{what} {peer} is not a rank of the {self.axis} group (size {self.size})"
                )
        start = time.perf_counter()
        send = meta.ascontiguousarray(x)
        received = meta.empty(send.shape, send.dtype, like=send)
        self.comm.Sendrecv(send, dest, tag, received, source, tag)
        self.ledger.record(
            "sendrecv", self.axis, self.ledger.nbytes(send), time.perf_counter() - start
        )
        return received

    def barrier(self) -> None:
        """Wait for every rank of the group (not recorded: it moves no data)."""
        if self.size > 1:
            self.comm.Barrier()

    def _check_peer(self, peer: int, what: str) -> None:
        if not 0 <= peer < self.size:
            raise CommError(
                f"{what} {peer} is not a rank of the {self.axis} group (size {self.size})"
            )
        if peer == self.rank:
            raise CommError(f"{what} {peer} is this rank itself: a blocking message would deadlock")
