"""Overhead of parallel.comm over bare mpi4py buffer calls; bandwidth as nccl-tests reports it.

Run:  mpiexec -n 2 python benchmarks/bench_comm.py [--quick]

For all_reduce, all_gather and reduce_scatter on float32 arrays from 4 KiB to 64 MiB, each size
is timed through a `parallel.comm.Group` ("comm") and through the mpi4py uppercase call it wraps
("bare"), interleaved (which side goes first alternates every repeat), each sample the slowest
rank's time per call. The table shows median times and, as the ratio, the median of the
per-repeat comm/bare ratios (paired samples cancel drifts in the machine's load), with their
interquartile range as a measure of the noise. Two modes,
both sides doing the same work:

- alloc: each call returns a fresh result array (the Group's default; the bare side allocates its
  output with np.empty before the call);
- out:   both sides write into one preallocated output buffer.

S, the size column, follows nccl-tests (doc/PERFORMANCE.md): for all_reduce the array each rank
passes in; for all_gather the gathered result (n × the shard each rank passes in); for
reduce_scatter the full array each rank passes in (n × the chunk it gets back). Then
algbw = S / t, and busbw = algbw × 2(n-1)/n for all_reduce and algbw × (n-1)/n for all_gather
and reduce_scatter, which makes bus bandwidth comparable to a link's peak whatever n is.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
from mpi4py import MPI

from parallel.comm import Group, Ledger

COMM = MPI.COMM_WORLD
N = COMM.Get_size()
RANK = COMM.Get_rank()
DTYPE = np.float32
SIZES = [4 << (2 * i) << 10 for i in range(8)]  # 4 KiB, 16 KiB, ..., 64 MiB
TARGET_SAMPLE_S = 0.005  # enough calls per sample to see past timer and scheduling noise

Call = Callable[[], object]


def bus_factor(op: str) -> float:
    return 2 * (N - 1) / N if op == "all_reduce" else (N - 1) / N


def cases(op: str, size: int, group: Group) -> dict[str, tuple[Call, Call]]:
    """{mode: (comm call, bare call)} for one op moving S = `size` bytes."""
    count = size // np.dtype(DTYPE).itemsize
    if op == "all_reduce":
        x = np.ones(count, DTYPE)
        out = np.empty_like(x)

        def bare_alloc() -> np.ndarray:
            result = np.empty_like(x)
            COMM.Allreduce(x, result, MPI.SUM)
            return result

        return {
            "alloc": (lambda: group.all_reduce(x), bare_alloc),
            "out": (lambda: group.all_reduce(x, out=out), lambda: COMM.Allreduce(x, out, MPI.SUM)),
        }
    if op == "all_gather":
        shard = np.ones(count // N, DTYPE)
        out = np.empty(count, DTYPE)

        def bare_alloc() -> np.ndarray:
            result = np.empty(count, DTYPE)
            COMM.Allgather(shard, result)
            return result

        return {
            "alloc": (lambda: group.all_gather(shard), bare_alloc),
            "out": (lambda: group.all_gather(shard, out=out), lambda: COMM.Allgather(shard, out)),
        }
    assert op == "reduce_scatter"
    x = np.ones(count, DTYPE)
    out = np.empty(count // N, DTYPE)

    def bare_alloc() -> np.ndarray:
        result = np.empty(count // N, DTYPE)
        COMM.Reduce_scatter_block(x, result, MPI.SUM)
        return result

    return {
        "alloc": (lambda: group.reduce_scatter(x), bare_alloc),
        "out": (
            lambda: group.reduce_scatter(x, out=out),
            lambda: COMM.Reduce_scatter_block(x, out, MPI.SUM),
        ),
    }


def agree(value: int | float, op: MPI.Op = MPI.MAX) -> float:
    """One number every rank agrees on (rank counts must match, or the collectives deadlock)."""
    buf = np.array([value], dtype=np.float64)
    COMM.Allreduce(MPI.IN_PLACE, buf, op)
    return float(buf[0])


def sample(call: Call, iters: int) -> float:
    """Seconds per call over `iters` back-to-back calls, started together on every rank."""
    COMM.Barrier()
    start = time.perf_counter()
    for _ in range(iters):
        call()
    return (time.perf_counter() - start) / iters


def measure(comm_call: Call, bare_call: Call, repeats: int) -> tuple[float, float, float, float]:
    """Median seconds per call of each side, the median of the per-repeat ratios comm/bare
    (paired samples cancel slow drifts in machine load) and their interquartile range; each
    sample is the slowest rank's."""
    for _ in range(2):  # warm up: first touches, MPI's internal buffers
        comm_call()
        bare_call()
    iters = int(agree(max(1, round(TARGET_SAMPLE_S / max(sample(bare_call, 1), 1e-7)))))
    comm_times, bare_times = [], []
    for repeat in range(repeats):
        pair = [(comm_call, comm_times), (bare_call, bare_times)]
        for call, times in pair if repeat % 2 == 0 else pair[::-1]:
            times.append(sample(call, iters))
    slowest = np.array([comm_times, bare_times])
    COMM.Allreduce(MPI.IN_PLACE, slowest, MPI.MAX)
    ratios = slowest[0] / slowest[1]
    q1, q3 = np.percentile(ratios, [25, 75])
    return (
        statistics.median(slowest[0]),
        statistics.median(slowest[1]),
        float(np.median(ratios)),
        q3 - q1,
    )


def human(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"


def main() -> None:
    quick = "--quick" in sys.argv
    repeats = 5 if quick else 21
    group = Group(COMM, "world", Ledger())
    if RANK == 0:
        print(
            f"parallel.comm vs bare mpi4py, {N} ranks, {np.dtype(DTYPE).name}, MPI: "
            f"{MPI.Get_library_version().splitlines()[0].strip()}"
        )
        print(
            f"medians of {repeats} interleaved samples (~{TARGET_SAMPLE_S * 1e3:.0f} ms each); "
            "ratio = median of paired comm/bare samples (IQR: their interquartile range, "
            "i.e. the noise); bandwidths from the comm-layer time"
        )
        header = (
            f"{'op':<15}{'mode':<6}{'S':>8}{'comm us':>11}{'bare us':>11}{'ratio':>7}{'IQR':>7}"
            f"{'algbw GB/s':>12}{'busbw GB/s':>12}"
        )
        print(header)
        print("-" * len(header))
    started = time.perf_counter()
    for op in ("all_reduce", "all_gather", "reduce_scatter"):
        for size in SIZES:
            for mode, (comm_call, bare_call) in cases(op, size, group).items():
                t_comm, t_bare, ratio, spread = measure(comm_call, bare_call, repeats)
                algbw = size / t_comm / 1e9
                if RANK == 0:
                    print(
                        f"{op:<15}{mode:<6}{human(size):>8}{t_comm * 1e6:>11.1f}"
                        f"{t_bare * 1e6:>11.1f}{ratio:>7.3f}{spread:>7.3f}"
                        f"{algbw:>12.2f}{algbw * bus_factor(op):>12.2f}",
                        flush=True,
                    )
    if RANK == 0:
        print(f"total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
