"""The number of threads numpy's BLAS runs, set at run time.

OpenBLAS reads `OPENBLAS_NUM_THREADS` / `OMP_NUM_THREADS` once, when numpy loads it; a benchmark
that compares thread counts, or a process that learns its share of the cores late, sets the
count here instead. numpy ships OpenBLAS with prefixed symbols (`scipy_openblas_*64_`); the
library is found among the ones this process has mapped, so nothing else is loaded. Where no
OpenBLAS is found (another BLAS, or not Linux), `blas_threads` returns None and nothing changes.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np  # noqa: F401 - loads the BLAS this module looks for

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
