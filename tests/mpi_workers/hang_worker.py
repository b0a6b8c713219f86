"""A deliberate deadlock (rank 0 waits for a message nobody sends), or a crash on rank 1."""

from __future__ import annotations

import sys

import numpy as np
from mpi4py import MPI

COMM = MPI.COMM_WORLD
print(f"rank {COMM.rank} started", flush=True)
if sys.argv[1:] == ["crash"]:
    if COMM.rank == 1:
        raise SystemExit("rank 1 gives up")
elif COMM.rank == 0:
    COMM.Recv(np.zeros(1), source=1)
COMM.Barrier()
