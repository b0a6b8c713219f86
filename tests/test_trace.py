"""trace.json (Chrome trace events, for Perfetto): a tiny pp=2 `civetta train` under mpiexec,
`civetta schedule --save-trace`, the ledger's call log, and the report's projected-against-
measured plot, which appears only with projections (`civetta compare --hardware`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from launch import cli, report
from launch.config import load
from parallel.comm import Ledger, launched_by_mpi
from parallel.schedules import make_schedule

REPO = Path(__file__).resolve().parent.parent
TINY_PP2 = """\
model: {n_layer: 2, n_head: 2, n_embd: 16, block_size: 8}
data: {source: synthetic}
train: {steps: 2, batch_size: 4, microbatch_size: 1, eval_batches: 1}
parallel: {pp: 2}
"""
PROJECTION_TITLE = "against measured"


def complete_events(trace: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in trace["traceEvents"] if e["ph"] == "X"]


def process_names(trace: dict[str, Any]) -> dict[int, str]:
    return {
        e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"
    }


@pytest.fixture(scope="module")
def pp2_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if launched_by_mpi():
        pytest.skip("mpi4py.MPI is loaded in this process: no nested mpiexec")
    root = tmp_path_factory.mktemp("pp2")
    (root / "tiny.yaml").write_text(TINY_PP2, encoding="utf-8")
    script = Path(sys.executable).parent / "civetta"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "launch"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI_", "MPI_"))}
    completed = subprocess.run(
        [*command, "train", "tiny.yaml", "--out", "run"],
        cwd=root,
        env={**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return root / "run"


def test_train_trace_has_a_track_per_rank_with_every_action_and_call(pp2_run: Path) -> None:
    trace = json.loads((pp2_run / "trace.json").read_text(encoding="utf-8"))
    metrics = json.loads((pp2_run / "metrics.json").read_text(encoding="utf-8"))
    assert process_names(trace) == {0: "rank 0", 1: "rank 1"}
    assert trace["otherData"]["step"] == 1  # the last step, the one metrics.json draws
    events = complete_events(trace)
    assert {e["pid"] for e in events} == {0, 1}
    for e in events:
        assert e["ts"] >= 0 and e["dur"] >= 0, e
    for rank in metrics["pipeline"]["per_rank"]:
        compute = [e for e in events if e["pid"] == rank["rank"] and e["cat"] == "compute"]
        # Every compute action of the step's timeline, in order, at the times metrics.json has.
        assert [e["name"] for e in compute] == [name for name, _, _ in rank["timeline"]]
        for e, (_, start, _) in zip(compute, rank["timeline"], strict=True):
            assert abs(e["ts"] - start * 1e6) < 2.0
            assert {"kind", "stage", "microbatch"} <= set(e["args"])
        messages = [e for e in events if e["pid"] == rank["rank"] and e["cat"] == "comm"]
        ops = Counter(e["args"]["op"] for e in messages)
        assert ops["send"] > 0 and ops["recv"] > 0 and ops["all_reduce"] > 0, ops
        for e in messages:
            assert set(e["args"]) == {"op", "axis", "phase", "bytes"}
        # The log holds one step: its sends are the run's sends divided by the steps.
        sends = sum(
            op["calls"]
            for entry in metrics["comm"]["per_rank"]
            if entry["rank"] == rank["rank"]
            for op in entry["ops"]
            if op["op"] == "send"
        )
        assert ops["send"] * len(metrics["steps"]) == sends


def test_the_ledger_logs_calls_only_when_asked() -> None:
    ledger = Ledger()
    ledger.record("all_reduce", "dp", 100, 0.5)
    assert ledger.events is None
    ledger.start_events()
    with ledger.phase("backward"):
        ledger.record("all_gather", "tp", 8, 0.125, wire_bytes=8)
    events = ledger.stop_events()
    ledger.record("all_reduce", "dp", 10, 0.5)
    assert [(e.op, e.axis, e.phase, e.nbytes, e.seconds) for e in events] == [
        ("all_gather", "tp", "backward", 8, 0.125)
    ]
    assert ledger.events is None and ledger.stop_events() == []
    assert ledger.calls() == 3 and ledger.bytes() == 118  # the totals are not affected


@pytest.mark.parametrize(
    ("pp", "m", "name", "v"), [(4, 8, "1f1b", 1), (2, 4, "interleaved-1f1b", 2), (3, 6, "zb-h1", 1)]
)
def test_schedule_save_trace_has_every_action_on_its_rank(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], pp: int, m: int, name: str, v: int
) -> None:
    path = tmp_path / "schedule.trace.json"
    argv = ["schedule", "--pp", str(pp), "--microbatches", str(m), "--schedule", name]
    assert cli.main([*argv, "--virtual-stages", str(v), "--save-trace", str(path)]) == 0
    assert "ui.perfetto.dev" in capsys.readouterr().out
    trace = json.loads(path.read_text(encoding="utf-8"))
    schedule = make_schedule(name, pp, m, v)
    assert process_names(trace) == {r: f"rank {r}" for r in range(pp)}
    events = complete_events(trace)
    for rank, actions in enumerate(schedule.actions):
        mine = [e for e in events if e["pid"] == rank]
        assert sorted(e["name"] for e in mine) == sorted(str(a) for a in actions)
        compute = [e for e in mine if e["tid"] == 0]
        assert [e["name"] for e in compute] == [str(a) for a in actions if a.is_compute]
        # Unit times: F = 1 unit = 1000 µs, B = 2 units.
        for e in compute:
            assert e["dur"] == {"F": 1000, "B": 2000, "I": 1000, "W": 1000}[e["args"]["kind"]]


def test_the_projection_plot_appears_only_with_projections(pp2_run: Path) -> None:
    from launch.compare import projection_of
    from launch.profiles import load_profile

    metrics = json.loads((pp2_run / "metrics.json").read_text(encoding="utf-8"))
    config = load(str(pp2_run.parent / "tiny.yaml"))
    row = report.summarize("pp2", "layout", config.layout.as_dict(), metrics)
    without = report.figures([row])
    assert not any(PROJECTION_TITLE in svg for svg in without)
    row["projection"] = projection_of(config, load_profile("a100-dgx"))
    with_projection = report.figures([row])
    assert len(with_projection) == len(without) + 1
    plot = with_projection[-1]
    assert PROJECTION_TITLE in plot and "a100-dgx" in plot
    root = ET.fromstring(plot)  # well-formed inline SVG
    ns = "{http://www.w3.org/2000/svg}"
    assert len(root.findall(f"{ns}circle")) == 1  # one dot per layout
    assert any("projected = measured" in (t.text or "") for t in root.iter(f"{ns}title"))
