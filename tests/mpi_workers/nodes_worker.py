"""Count the autograd nodes one training step builds on each rank, and print them as JSON.

    nodes_worker.py [key=value ...]

The trainer is the one `civetta train` uses; the first step warms up, the second is counted
(`civetta.meters.activation_meter.nodes`). Rank 0 prints {"nodes": [per rank]}.
"""

from __future__ import annotations

import json
import sys

from mpi4py import MPI

from civetta.meters import activation_meter
from launch.config import load
from launch.trainer import Trainer
from parallel.runtime import Runtime


def main() -> None:
    config = load(None, sys.argv[1:])
    runtime = Runtime(config.layout)
    mesh = runtime.mesh
    trainer = Trainer(config, runtime)
    trainer.step(0)
    before = activation_meter.nodes
    trainer.step(1)
    counts = MPI.COMM_WORLD.gather(activation_meter.nodes - before, root=0)
    if mesh.rank == 0:
        print(json.dumps({"nodes": counts}), flush=True)


if __name__ == "__main__":
    main()
