"""Train a tiny GPT for a few steps under the layout given by `--set` overrides.

    train_worker.py OUT.npz [key=value ...]

Rank 0 writes OUT.npz: each step's loss (`loss`) and global gradient norm (`grad_norm`), the
synchronised full gradients of every step gathered from the shards (`grad.<step>.<name>`), the
final full parameters (`param.<name>`), this rank's ledger totals by (op, axis, phase) as
a JSON string (`ledger`), and every rank's measured model-state bytes beside their closed forms
(`memory`, JSON, by world rank), and every rank's MoE routing records (`routing`, JSON, by
world rank). Run without MPI it is the single-process reference.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from launch.config import load
from launch.trainer import Trainer
from parallel.runtime import Runtime
from parallel.update import ZeroUpdate


def main() -> None:
    out_path, overrides = sys.argv[1], sys.argv[2:]
    config = load(None, overrides)
    runtime = Runtime(config.layout)
    mesh = runtime.mesh
    trainer = Trainer(config, runtime)
    losses, norms, local_grads = [], [], []
    for step in range(config.train.steps):
        record = trainer.step(step)
        losses.append(record.loss)
        norms.append(record.grad_norm)
        local_grads.append({name: g.copy() for name, g in trainer.update.last_grads.items()})
    ledger = runtime.ledger.as_list()  # the training's traffic, before the gathers below
    arrays: dict[str, np.ndarray] = {}
    for step, grads in enumerate(local_grads):
        if isinstance(trainer.update, ZeroUpdate):  # ZeRO-1/2 keep pieces: assemble them
            grads = trainer.update.full_gradients(grads)
        full = runtime.full_arrays(grads)
        arrays.update({f"grad.{step}.{name}": g for name, g in full.items()})
    params = runtime.full_arrays({n: p.data for n, p in trainer.model.params.items()})
    arrays.update({f"param.{name}": a for name, a in params.items()})
    # Pipeline stages hold different parameters: rank 0 collects them all (test plumbing, so
    # pickled gathers are fine here).
    if mesh.world_size > 1:
        gathered = mesh.comm.gather(arrays, root=0)
        if mesh.rank == 0:
            for other in gathered:
                for key, value in other.items():
                    arrays.setdefault(key, value)
    peaks = [max(t.peak_in_flight for t in trainer.timelines)]
    memory = [{**trainer.memory(), "closed_form": trainer.memory_closed_form()}]
    routing = [trainer.routing.as_dict()]
    if mesh.world_size > 1:
        peaks = mesh.comm.gather(peaks[0], root=0)
        memory = mesh.comm.gather(memory[0], root=0)
        routing = mesh.comm.gather(routing[0], root=0)
    if mesh.rank == 0:
        arrays["loss"] = np.array(losses)
        arrays["grad_norm"] = np.array(norms)
        arrays["ledger"] = np.array(json.dumps(ledger))
        arrays["grad_bytes"] = np.array(trainer.update.grad_bytes)
        arrays["peak_in_flight"] = np.array(peaks)  # by world rank
        arrays["memory"] = np.array(json.dumps(memory))  # by world rank
        arrays["routing"] = np.array(json.dumps(routing))  # MoE routing, by world rank
        np.savez(out_path, **arrays)


if __name__ == "__main__":
    main()
