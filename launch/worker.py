"""The per-rank side of `civetta train`: build the mesh, train, and let rank 0 report.

Rank 0 alone prints and writes `metrics.json`, which holds every rank's memory and ledger
(gathered as JSON text through buffer calls, never pickle). Each rank keeps a status file under
`OUT/logs/`; an exception on any rank prints one line naming the rank, leaves the traceback in
that rank's log and aborts the whole MPI job, so no rank is left waiting in a collective.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from civetta.allocator import keep_freed_memory
from launch import checkpoint, trace
from launch.config import ExperimentConfig
from launch.launcher import EXITS_ENV
from launch.progress import TrainingProgress
from launch.trainer import NonFiniteError, RunResult, StepRecord, Trainer
from parallel.comm import CallEvent, launched_by_mpi
from parallel.pipeline import COMPUTE_KINDS, StepTimeline
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


def pipeline_summary(timelines: list[StepTimeline]) -> dict[str, Any]:
    """One rank's pipeline figures: median bubble over the steps after the first (which pays
    for warm-up), peak in-flight microbatches, and the last step's action timeline."""
    if not timelines:  # a run resumed at its last step
        return {"bubble_fraction": 0.0, "peak_in_flight": 0, "timeline": [], "window_s": 0.0}
    steady = timelines[1:] or timelines
    last = timelines[-1]
    return {
        "bubble_fraction": float(np.median([t.bubble_fraction for t in steady])),
        "peak_in_flight": max(t.peak_in_flight for t in timelines),
        "timeline": [
            [str(t.action), round(t.start_s, 6), round(t.end_s, 6)]
            for t in last.timings
            if t.action.kind in COMPUTE_KINDS
        ],
        "window_s": last.window_s,
    }


def build_metrics(
    config: ExperimentConfig, result: RunResult, per_rank: list[dict[str, Any]]
) -> dict[str, Any]:
    p = config.layout
    step_times = [s.time_s for s in result.steps]
    median = float(np.median(step_times[1:] or step_times))
    return {
        "config": config.to_dict(),
        "world_size": config.world_size,
        "layout": config.layout.as_dict(),
        "steps": [
            {
                "step": s.step,
                "loss": s.loss,
                "time_s": s.time_s,
                "lr": s.lr,
                "grad_norm": s.grad_norm,
                "skipped": s.skipped,
                "loss_scale": s.loss_scale,
                "nonfinite": s.nonfinite,
            }
            for s in result.steps
        ],
        "final_loss": result.steps[-1].loss if result.steps else None,
        "val_loss": result.val_loss,
        "step_time_median_s": median,
        "tokens_per_step": result.tokens_per_step,
        "tokens_per_s": result.tokens_per_step / median if median > 0 else None,
        "flops": {
            # Model FLOPs: the matmuls the model needs; hardware FLOPs: what the ranks ran,
            # recomputation included (per step, summed over ranks).
            "model_per_step": result.model_flops_per_step,
            "hardware_per_step": sum(r["flops_per_step"] for r in per_rank),
        },
        "memory": {"per_rank": [{"rank": r["rank"], **r["memory"]} for r in per_rank]},
        "comm": {"per_rank": [{"rank": r["rank"], "ops": r["ops"]} for r in per_rank]},
        **routing_metrics(per_rank),
        "pipeline": {
            "schedule": p.schedule,
            "virtual_stages": p.virtual_stages,
            "microbatches": p.microbatches,
            # The mean over ranks of each rank's idle share of its pipeline phase.
            "bubble_fraction": float(np.mean([r["pipeline"]["bubble_fraction"] for r in per_rank])),
            "per_rank": [{"rank": r["rank"], **r["pipeline"]} for r in per_rank],
        },
    }


def routing_metrics(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """metrics.json's `moe` section (absent for a dense model): per MoE layer, over every
    rank's tokens and every training step, the slots routed to each expert before capacity
    (`tokens_per_expert`), those dropped, the imbalance max/mean of the routed counts, and the
    mean unweighted load-balancing term."""
    layers: dict[str, dict[str, Any]] = {}
    for rank in per_rank:
        for layer, record in rank.get("routing", {}).items():
            into = layers.setdefault(layer, {"routed": 0, "kept": 0, "aux": np.zeros(2)})
            into["routed"] = into["routed"] + np.asarray(record["routed"], dtype=np.int64)
            into["kept"] = into["kept"] + np.asarray(record["kept"], dtype=np.int64)
            into["aux"] = into["aux"] + np.asarray(record["aux"], dtype=np.float64)
    if not layers:
        return {}
    rows = []
    for layer in sorted(layers, key=_layer_order):
        routed, kept, aux = layers[layer]["routed"], layers[layer]["kept"], layers[layer]["aux"]
        mean = routed.mean()
        rows.append(
            {
                "layer": layer,
                "tokens_per_expert": [int(n) for n in routed],
                "dropped_per_expert": [int(n) for n in routed - kept],
                "dropped": int((routed - kept).sum()),
                "dropped_fraction": float((routed - kept).sum() / routed.sum()),
                "imbalance": float(routed.max() / mean) if mean else 0.0,
                "aux_loss": float(aux[0] / aux[1]) if aux[1] else None,
            }
        )
    total = sum(r["dropped"] for r in rows)
    slots = sum(sum(r["tokens_per_expert"]) for r in rows)
    return {
        "moe": {
            "layers": rows,
            "dropped_fraction": total / slots if slots else 0.0,
            "max_imbalance": max(r["imbalance"] for r in rows),
        }
    }


def _layer_order(name: str) -> tuple[int, str]:
    """model.layers.10.x after model.layers.9.x."""
    digits = [part for part in name.split(".") if part.isdigit()]
    return (int(digits[0]) if digits else -1, name)


def write_json_atomically(path: Path, payload: Any) -> None:
    """Write to a temporary file and rename it, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _run(config: ExperimentConfig, out_dir: Path, resume: Path | None) -> int:
    keep_freed_memory()
    runtime = Runtime(config.layout)
    mesh = runtime.mesh
    trainer = Trainer(config, runtime)
    start = checkpoint.load(trainer, resume) + 1 if resume is not None else 0
    every = config.train.checkpoint_every
    leader = mesh.rank == 0
    progress = TrainingProgress(config, enabled=leader, start=start)
    # trace.json holds the last step: the ledger logs its calls (and only its calls) for it.
    traced_step = config.train.steps - 1
    ledger = runtime.ledger
    calls: list[CallEvent] = []
    if start == traced_step:
        ledger.start_events()

    def after_step(record: StepRecord) -> None:
        if record.step == traced_step:
            calls.extend(ledger.stop_events())
        elif record.step + 1 == traced_step:
            ledger.start_events()
        progress.update(record)
        if every and (record.step + 1) % every == 0:
            checkpoint.save(trainer, out_dir, record.step)

    with progress:
        result = trainer.run(after_step, start_step=start)
    ran_traced_step = bool(result.steps) and result.steps[-1].step == traced_step
    traced_timeline = trainer.timelines[-1] if ran_traced_step and trainer.timelines else None
    per_rank = gather_json(
        mesh.comm,
        {
            "rank": mesh.rank,
            # Measured bytes, and beside them the closed forms they must equal (parallel.zero).
            "memory": {**result.memory, "closed_form": trainer.memory_closed_form()},
            "ops": result.ledger,
            "pipeline": pipeline_summary(trainer.timelines),
            "flops_per_step": result.steps[-1].flops if result.steps else 0,
            "trace": trace.step_events(mesh.rank, traced_timeline, calls),
            # Tensor-parallel ranks without sequence parallelism route the same tokens: one
            # of them counts.
            "routing": trainer.routing.as_dict()
            if runtime.sequence_parallel or mesh.coords["tp"] == 0
            else {},
        },
    )
    if leader:
        assert per_rank is not None
        metrics = build_metrics(config, result, per_rank)
        write_json_atomically(out_dir / "metrics.json", metrics)
        traces = [r["trace"] for r in per_rank]
        trace.write_trace(out_dir / "trace.json", trace.train_trace(traces, traced_step))
        progress.summary(metrics, out_dir / "metrics.json")
    return 0


def status_path(out_dir: Path, rank: int) -> Path:
    return out_dir / "logs" / f"rank{rank}.status"


def write_status(out_dir: Path, rank: int, text: str) -> None:
    path = status_path(out_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")


def train(config: ExperimentConfig, out_dir: Path, resume: Path | None = None) -> int:
    """Run on this rank. Only rank 0 writes to the console; every other rank's output goes to
    `OUT/logs/rankR.log`. A failure leaves the traceback in that log and a one-line status, is
    printed once (by `civetta train` when it launched the job, else by rank 0 itself) and,
    under MPI, aborts the whole job so no rank waits forever."""
    under_mpi = launched_by_mpi()
    rank = 0
    if under_mpi:
        from mpi4py import MPI

        rank = MPI.COMM_WORLD.Get_rank()
    log = out_dir / "logs" / f"rank{rank}.log"
    write_status(out_dir, rank, f"running pid={os.getpid()}")
    if rank > 0:
        _redirect_output(log)
    try:
        code = _run(config, out_dir, resume)
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
        with log.open("a", encoding="utf-8") as file:
            file.write(traceback.format_exc())
        # A non-finite step stops every rank at once: the line names the rank that holds the
        # first non-finite parameter, and the others wait until rank 0 has reported it.
        culprit = exc.rank if isinstance(exc, NonFiniteError) else rank
        line = failure_line(culprit, message, out_dir / "logs" / f"rank{culprit}.log")
        if rank == 0 and under_mpi and os.environ.get(EXITS_ENV):
            # `civetta train` launched the job and prints the line: printed here it would cross
            # hydra's output forwarding, which the abort below can cut before it arrives.
            report_path(out_dir).write_text(line + "\n", encoding="utf-8")
        else:  # to the console, or another rank's log
            print(line, file=sys.stderr, flush=True)
        write_status(out_dir, rank, f"failed: {message}")  # after the report: it is this run's
        if under_mpi:
            if isinstance(exc, NonFiniteError):
                MPI.COMM_WORLD.Barrier()
            MPI.COMM_WORLD.Abort(1)
        return 1
    write_status(out_dir, rank, "done")
    return code


def report_path(out_dir: Path) -> Path:
    """Where rank 0 leaves its failure line for the launcher to print."""
    return out_dir / "logs" / "rank0.failure"


def failure_line(rank: int, message: str, log: Path) -> str:
    return f"error: rank {rank} failed: {message} (traceback: {log})"


def _redirect_output(log: Path) -> None:
    """Send this process's stdout and stderr, C libraries' included, to `log`."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def read_status(out_dir: Path, rank: int) -> str:
    path = status_path(out_dir, rank)
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return "not started"


def explain_failure(
    out_dir: Path, world_size: int, exit_code: int, dead_pids: Sequence[int] = ()
) -> str:
    """After a failed job, one line on what happened, from the status files the ranks left
    and `dead_pids`, the ranks' processes that ended abnormally on their own (as their guards
    saw it: `launch.launcher.guard`)."""
    statuses = [read_status(out_dir, rank) for rank in range(world_size)]
    for rank, status in enumerate(statuses):
        if status.startswith("failed: "):
            if rank == 0:  # its own line, which may name another rank (a non-finite step)
                with contextlib.suppress(OSError):
                    return report_path(out_dir).read_text(encoding="utf-8").strip()
            log = out_dir / "logs" / f"rank{rank}.log"
            return failure_line(rank, status.removeprefix("failed: "), log)
    # A rank killed by a signal leaves no word; the launcher then stops all the others, which
    # are not among dead_pids, although they too end with their status still "running".
    dead = [r for r, status in enumerate(statuses) if _pid_of(status) in dead_pids]
    who = f"rank {', '.join(map(str, dead))} died" if dead else "a rank died"
    return (
        f"error: {who} without reporting an error (killed?); the MPI job exited with code "
        f"{exit_code}; rank logs: {out_dir / 'logs'}"
    )


def _pid_of(status: str) -> int | None:
    prefix = "running pid="
    return int(status.removeprefix(prefix)) if status.startswith(prefix) else None
