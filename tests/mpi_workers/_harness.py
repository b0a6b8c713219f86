"""A tiny check runner for MPI workers: every rank runs every check, rank 0 prints one JSON line.

A check is a function that raises on failure. Each rank's outcome is gathered to rank 0
(pickled: this is test plumbing, not a hot path), which prints {"check name": [errors...]},
an empty list meaning the check passed on every rank, plus any extra "data" the checks report.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from typing import Any

from mpi4py import MPI

Check = Callable[[], None]

_checks: list[Check] = []
data: dict[str, Any] = {}  # values rank 0 reports besides pass/fail


def check(fn: Check) -> Check:
    """Register `fn` as a check; checks run in definition order on every rank."""
    _checks.append(fn)
    return fn


def run() -> None:
    """Run every registered check and print rank 0's JSON summary."""
    comm = MPI.COMM_WORLD
    results: dict[str, list[str]] = {}
    for fn in _checks:
        try:
            fn()
            error = None
        except Exception as exc:  # report, do not stop: the other checks still tell something
            last = traceback.extract_tb(exc.__traceback__)[-1]
            error = f"rank {comm.rank}: {type(exc).__name__}: {exc} (line {last.lineno})"
        errors = comm.gather(error, root=0)
        if comm.rank == 0:
            results[fn.__name__] = [e for e in errors if e is not None]
    if comm.rank == 0:
        print(json.dumps({"results": results, "data": data}), flush=True)
