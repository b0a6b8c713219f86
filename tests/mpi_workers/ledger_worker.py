"""Every rank's ledger (and FLOPs and model state) for the named cases, on rank 0 as one JSON line.

    ledger_worker.py NAME [NAME ...]

Each name is a case of tests/test_virtual_mesh.py: a training layout (one step of the tiny GPT
through `launch.trainer.Trainer`) or "collectives" (a fixed sequence of calls on a dp=2 × tp=2
mesh). The case runs on a `Mesh` over COMM_WORLD with the same code the test runs on a virtual
mesh, and rank 0 prints {name: [payload of world rank 0, 1, ...]}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mpi4py import MPI

# The cases and their payloads live in the test, so the executed and the virtual runs share them.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_virtual_mesh import case_mesh_shape, case_payload

from parallel.mesh import Mesh


def main() -> None:
    comm = MPI.COMM_WORLD
    report = {}
    for name in sys.argv[1:]:
        dp, tp, pp, order, cp = case_mesh_shape(name)
        mesh = Mesh(dp, tp, pp, order, cp=cp)
        payload = case_payload(name, mesh)
        mesh.close()
        gathered = comm.gather(payload, root=0)  # test plumbing: pickling is fine here
        if comm.rank == 0:
            report[name] = gathered
    if comm.rank == 0:
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
