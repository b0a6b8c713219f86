"""The number of threads numpy's BLAS runs, set at run time.

OpenBLAS reads `OPENBLAS_NUM_THREADS` / `OMP_NUM_THREADS` once, when numpy loads it; a benchmark
that compares thread counts, or a process that learns its share of the cores late, sets the
count here instead. numpy ships OpenBLAS with prefixed symbols (`scipy_openblas_*64_`); the
library is found among the ones this process has mapped, so nothing else is loaded. Where no
OpenBLAS is found (another BLAS, or not Linux), `blas_threads` returns None and nothing changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np  # also loads the BLAS this module looks for

_SETTERS = ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_",
            "openblas_set_num_threads")  # fmt: skip
_GETTERS = ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_",
            "openblas_get_num_threads")  # fmt: skip


@functools.cache
def _openblas() -> ctypes.CDLL | None:
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return None
    paths = {line.split()[-1] for line in maps.read_text().splitlines() if "openblas" in line}
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        if any(hasattr(lib, name) for name in _SETTERS):
            return lib
    return None


def blas_threads() -> int | None:
    """The threads numpy's OpenBLAS runs now, or None where there is none."""
    lib = _openblas()
    if lib is None:
        return None
    getter = next(getattr(lib, n) for n in _GETTERS if hasattr(lib, n))
    return int(getter())


def set_blas_threads(n: int) -> int | None:
    """Run numpy's OpenBLAS with `n` threads; returns the previous count (None: no OpenBLAS)."""
    lib = _openblas()
    if lib is None:
        return None
    previous = blas_threads()
    setter = next(getattr(lib, name) for name in _SETTERS if hasattr(lib, name))
    setter(ctypes.c_int(max(1, int(n))))
    return previous


# ---- the engine's own threads: elementwise kernels and batched GEMMs over blocks ----------------
# numpy runs a ufunc on one thread; civetta's kernels instead run on blocks of the leading axis,
# which keeps each pass's operands in cache (a kernel of eight passes over an 8 MB activation
# otherwise streams it from memory eight times) and lets `engine_threads()` threads share the
# blocks (ufuncs release the GIL). The pool hands out blocks as threads free up, so a thread on a
# core another process holds takes fewer of them instead of stalling the op.
BLOCK = 131072  # elements of the first operand per block: 512 KB of float32, cache-resident

# Below this many elements blocks run on the calling thread: every numpy call between blocks
# takes the GIL back, and with a core taken by another process a descheduled worker holding it
# stalls the other (measured: LayerNorm at (2048, 256) 2.8× slower on two threads than on one).
THREADED_MIN = 4 * BLOCK

_threads = 0  # 0: not chosen yet (the BLAS count at first use)
_pool: ThreadPoolExecutor | None = None


def engine_threads() -> int:
    """Threads civetta's kernels use: `set_engine_threads`'s, else OpenBLAS's at first use
    (which follows `OMP_NUM_THREADS` / `OPENBLAS_NUM_THREADS`, as the launcher sets them)."""
    global _threads
    if not _threads:
        _threads = blas_threads() or int(os.environ.get("OMP_NUM_THREADS", "1") or 1)
    return _threads


def set_engine_threads(n: int) -> int:
    """Use `n` threads for civetta's kernels (and `n` BLAS threads); returns the previous."""
    global _threads, _pool
    previous = engine_threads()
    _threads = max(1, int(n))
    set_blas_threads(_threads)
    if _pool is not None and previous != _threads:
        _pool.shutdown(wait=True)
        _pool = None
    return previous


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """BLAS on one thread inside the block (the kernels' GEMVs, the stacked GEMMs).

    OpenBLAS threads a GEMV from 9216 elements on and synchronises its threads per call; for
    the row and column sums of a kernel that costs more than it saves, and with a core held by
    another process it stalls (LayerNorm's backward at (2048, 256): 10× slower). The engine's
    own threads share the blocks instead. Set from the calling thread only (the count is
    process-wide), so kernels on the engine's workers never change it.
    """
    previous = set_blas_threads(1) if engine_threads() > 1 else None
    try:
        yield
    finally:
        if previous is not None and previous != 1:
            set_blas_threads(previous)


def _workers() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(engine_threads(), thread_name_prefix="civetta")
    return _pool


def _blocks(length: int, items_per_row: int, block: int) -> list[slice]:
    rows = max(1, block // max(1, items_per_row))
    return [slice(i, min(i + rows, length)) for i in range(0, length, rows)]


def run_blocked(
    kernel: Callable[..., None],
    arrays: Sequence[Any],
    constants: Sequence[Any] = (),
    block: int | None = None,
) -> None:
    """`kernel(*slices, *constants)` over blocks of the arrays' common leading axis.

    The kernel writes its results into some of `arrays` (views of its outputs, which must be
    C-contiguous so the blocks are views too). Data-free arrays, and arrays too small to split,
    run in one call, so every result is what one call on the whole would compute blockwise:
    each block's rows depend only on those rows.
    """
    with one_blas_thread():
        _run_blocks(kernel, arrays, constants, BLOCK if block is None else block)


def map_blocked(
    kernel: Callable[..., Any],
    arrays: Sequence[Any],
    constants: Sequence[Any] = (),
    block: int | None = None,
) -> list[Any]:
    """`run_blocked` that also returns what `kernel` returns for each block, in block order
    (one result when the arrays run in one call): partial sums a caller adds up in that fixed
    order, so the total does not depend on which thread ran which block."""
    with one_blas_thread():
        return _run_blocks(kernel, arrays, constants, BLOCK if block is None else block)


def _run_blocks(
    kernel: Callable[..., Any], arrays: Sequence[Any], constants: Sequence[Any], block: int
) -> list[Any]:
    first = arrays[0]
    length = first.shape[0] if first.ndim else 0
    if length < 2 or first.size <= block or any(type(a) is not np.ndarray for a in arrays):
        return [kernel(*arrays, *constants)]
    parts = _blocks(length, first.size // length, block)
    if engine_threads() == 1 or len(parts) < 2 or first.size <= THREADED_MIN:
        return [kernel(*(a[part] for a in arrays), *constants) for part in parts]
    futures = [_workers().submit(kernel, *(a[p] for a in arrays), *constants) for p in parts]
    return [future.result() for future in futures]  # re-raises a kernel's exception here


def batched_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`a @ b` for stacks of matrices with equal leading axes.

    OpenBLAS threads each small GEMM of a stack separately and synchronises its threads per
    GEMM: on two cores with one busy, the attention's 128×64×128 products ran 100× slower than
    on one thread. Here each GEMM runs on one BLAS thread and the engine's threads share the
    stack instead.
    """
    threads = engine_threads()
    if threads == 1 or type(a) is not np.ndarray or type(b) is not np.ndarray or a.ndim < 3:
        return a @ b
    lead = a.shape[:-2]
    a3 = a.reshape(-1, *a.shape[-2:])
    b3 = b.reshape(-1, *b.shape[-2:])
    out = np.empty((a3.shape[0], a.shape[-2], b.shape[-1]), np.result_type(a, b))
    with one_blas_thread():
        parts = _blocks(a3.shape[0], 1, max(1, -(-a3.shape[0] // (4 * threads))))
        futures = [_workers().submit(np.matmul, a3[p], b3[p], out=out[p]) for p in parts]
        for future in futures:
            future.result()
    return out.reshape(*lead, *out.shape[-2:])
