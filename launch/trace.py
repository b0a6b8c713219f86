"""Timelines as Chrome trace-event JSON (`trace.json`), which Perfetto (ui.perfetto.dev) and
chrome://tracing open.

The format: a JSON object whose `traceEvents` are complete events (`ph: "X"`, `ts` and `dur` in
microseconds, `pid`, `tid`, `name`, `cat`, `args`) and metadata events (`ph: "M"`) naming each
process and thread. Here a process is one rank ("rank R", `pid` R) with two threads: its pipeline
actions (`tid` 0) and its recorded communication calls (`tid` 1), which do not nest inside each
other exactly, so they get a track each.

`civetta train` traces one step (the last): each rank's actions from its `StepTimeline` and its
calls from the ledger's event log, both in microseconds from the step's common start (the
barrier before the pipeline), so the ranks' clocks line up without a shared clock. `civetta
schedule --save-trace` traces a schedule's unit-time replay, one unit drawn as `unit_us`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from parallel.comm import CallEvent
from parallel.pipeline import StepTimeline
from parallel.schedules import Schedule, simulate

US = 1e6  # microseconds a second
ACTIONS_TID = 0
COMM_TID = 1


def _us(seconds: float) -> float:
    return round(seconds * US, 3)


def action_event(
    rank: int, name: str, kind: str, stage: int, microbatch: int, ts: float, dur: float
) -> dict[str, Any]:
    """One pipeline action as a complete event on the rank's action track (`ts`, `dur` in µs)."""
    return {
        "name": name,
        "cat": "compute" if kind in ("F", "B", "I", "W") else "pipeline_message",
        "ph": "X",
        "ts": ts,
        "dur": dur,
        "pid": rank,
        "tid": ACTIONS_TID,
        "args": {"kind": kind, "stage": stage, "microbatch": microbatch},
    }


def step_events(
    rank: int, timeline: StepTimeline | None, calls: Sequence[CallEvent]
) -> list[dict[str, Any]]:
    """One rank's events of a traced step: every action of `timeline` and every logged call,
    in µs from the timeline's origin (the step's common start)."""
    if timeline is None:
        return []
    events = [
        action_event(
            rank,
            str(t.action),
            t.action.kind,
            t.action.stage,
            t.action.microbatch,
            _us(t.start_s),
            _us(t.end_s - t.start_s),
        )
        for t in timeline.timings
    ]
    origin = timeline.origin_s
    for call in calls:
        events.append(
            {
                "name": f"{call.op} {call.axis}",
                "cat": "comm",
                "ph": "X",
                "ts": _us(call.start - origin),
                "dur": _us(call.seconds),
                "pid": rank,
                "tid": COMM_TID,
                "args": {
                    "op": call.op,
                    "axis": call.axis,
                    "phase": call.phase,
                    "bytes": call.nbytes,
                },
            }
        )
    return events


def metadata_events(ranks: int, threads: Sequence[str]) -> list[dict[str, Any]]:
    """Process names ("rank R", sorted by rank) and the names of each rank's threads."""
    events: list[dict[str, Any]] = []
    for rank in range(ranks):
        events.append(
            {"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}}
        )
        events.append(
            {"name": "process_sort_index", "ph": "M", "pid": rank, "args": {"sort_index": rank}}
        )
        for tid, thread in enumerate(threads):
            events.append(
                {
                    "name": "thread_name",
                    "ph": "M",
                    "pid": rank,
                    "tid": tid,
                    "args": {"name": thread},
                }
            )
    return events


def train_trace(
    per_rank: Sequence[Sequence[dict[str, Any]]], step: int | None, **other: Any
) -> dict[str, Any]:
    """trace.json of `civetta train`: rank r's `step_events` on process r."""
    events = metadata_events(len(per_rank), ("pipeline actions", "communication"))
    for rank_events in per_rank:
        events.extend(rank_events)
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {"source": "civetta train", "step": step, **other},
    }


def schedule_trace(schedule: Schedule, unit_us: float = 1000.0) -> dict[str, Any]:
    """A schedule's unit-time replay (F=1, B=2, I=W=1) as a trace, one process per pipeline
    rank: compute on thread 0, sends and receives on thread 1 (a send takes no time; a receive
    lasts until its message arrives)."""
    timeline = simulate(schedule, include_comm=True)
    events = metadata_events(schedule.pp, ("compute", "messages"))
    for rank, row in enumerate(timeline):
        for action, start, end in row:
            event = action_event(
                rank,
                str(action),
                action.kind,
                action.stage,
                action.microbatch,
                round(start * unit_us, 3),
                round((end - start) * unit_us, 3),
            )
            if not action.is_compute:
                event["tid"] = COMM_TID
            events.append(event)
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "source": "civetta schedule",
            "schedule": schedule.name,
            "pp": schedule.pp,
            "microbatches": schedule.microbatches,
            "virtual_stages": schedule.virtual_stages,
            "unit_us": unit_us,
        },
    }


def write_trace(path: Path, trace: dict[str, Any]) -> None:
    """Write compact JSON to a temporary file and rename it, so no reader sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(trace, separators=(",", ":")) + "\n", encoding="utf-8")
    os.replace(tmp, path)
