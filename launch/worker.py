"""The per-rank side of `civetta train`: build the mesh, train, and let rank 0 report.

Rank 0 alone prints and writes `metrics.json`, which holds every rank's memory and ledger
(gathered as JSON text through buffer calls, never pickle). An exception on any rank prints one
line naming the rank and aborts the whole MPI job, so no rank is left waiting in a collective.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from civetta.allocator import keep_freed_memory
from launch.config import ExperimentConfig
from launch.progress import TrainingProgress
from launch.trainer import RunResult, Trainer
from parallel.mesh import Mesh
from parallel.runtime import Runtime


def gather_json(comm: Any, payload: Any) -> list[Any] | None:
    """Every rank's JSON-able payload, on rank 0 (None elsewhere)."""
    data = np.frombuffer(json.dumps(payload).encode(), dtype=np.uint8)
    if comm.Get_size() == 1:
        return [payload]
    sizes = np.zeros(comm.Get_size(), dtype=np.int64)
    comm.Gather(np.array([data.size], dtype=np.int64), sizes, root=0)
    if comm.Get_rank() != 0:
        comm.Gatherv(data, None, root=0)
        return None
    buffer = np.empty(int(sizes.sum()), dtype=np.uint8)
    comm.Gatherv(data, (buffer, sizes), root=0)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [json.loads(buffer[bounds[i] : bounds[i + 1]].tobytes()) for i in range(comm.Get_size())]


def build_metrics(
    config: ExperimentConfig, result: RunResult, per_rank: list[dict[str, Any]]
) -> dict[str, Any]:
    p = config.parallel
    step_times = [s.time_s for s in result.steps]
    median = float(np.median(step_times[1:] or step_times))
    return {
        "config": config.to_dict(),
        "world_size": config.world_size,
        "layout": {
            "dp": p.dp,
            "tp": p.tp,
            "pp": p.pp,
            "order": p.order,
            "schedule": p.schedule,
            "zero": p.zero,
            "sequence_parallel": p.sequence_parallel,
            "recompute": p.recompute,
        },
        "steps": [
            {
                "step": s.step,
                "loss": s.loss,
                "time_s": s.time_s,
                "lr": s.lr,
                "grad_norm": s.grad_norm,
            }
            for s in result.steps
        ],
        "final_loss": result.steps[-1].loss if result.steps else None,
        "val_loss": result.val_loss,
        "step_time_median_s": median,
        "tokens_per_step": result.tokens_per_step,
        "tokens_per_s": result.tokens_per_step / median if median > 0 else None,
        "memory": {"per_rank": [{"rank": r["rank"], **r["memory"]} for r in per_rank]},
        "comm": {"per_rank": [{"rank": r["rank"], "ops": r["ops"]} for r in per_rank]},
        "pipeline": {"schedule": p.schedule if p.pp > 1 else None, "bubble_fraction": 0.0},
    }


def write_json_atomically(path: Path, payload: Any) -> None:
    """Write to a temporary file and rename it, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _run(config: ExperimentConfig, out_dir: Path) -> int:
    keep_freed_memory()
    p = config.parallel
    mesh = Mesh(p.dp, p.tp, p.pp, p.order)
    runtime = Runtime(mesh, sequence_parallel=p.sequence_parallel, bucket_mb=p.bucket_mb)
    trainer = Trainer(config, runtime)
    leader = mesh.rank == 0
    progress = TrainingProgress(config, enabled=leader)
    with progress:
        result = trainer.run(progress.update)
    per_rank = gather_json(
        mesh.comm, {"rank": mesh.rank, "memory": result.memory, "ops": runtime.ledger.as_list()}
    )
    if leader:
        assert per_rank is not None
        metrics = build_metrics(config, result, per_rank)
        write_json_atomically(out_dir / "metrics.json", metrics)
        progress.summary(metrics, out_dir / "metrics.json")
    return 0


def train(config: ExperimentConfig, out_dir: Path) -> int:
    """Run on this rank; under MPI a failure on any rank aborts the job with the rank named."""
    try:
        return _run(config, out_dir)
    except Exception as exc:
        from parallel.comm import launched_by_mpi

        if not launched_by_mpi():
            raise
        from mpi4py import MPI

        rank = MPI.COMM_WORLD.Get_rank()
        traceback.print_exc(file=sys.stderr)
        print(
            f"error: rank {rank} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True
        )
        MPI.COMM_WORLD.Abort(1)
        return 1
