"""Keep freed activation buffers in the process heap instead of returning them to the OS.

A training step allocates and frees the same multi-megabyte arrays every step. By default glibc
serves blocks that large with fresh `mmap`s and unmaps them on free, so every step pays page
faults and zeroing for memory it just gave back; pinning the mmap and trim thresholds lets
`malloc` reuse the freed blocks. On other C libraries this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


@functools.cache
def keep_freed_memory(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Pin glibc's thresholds (once per process); False when the C library is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(M_TRIM_THRESHOLD, trim_threshold)
    )
