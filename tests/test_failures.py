"""One failing rank ends the whole job quickly, with a line naming it, and never hangs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

QUICK = [
    "--set", "model.n_layer=1", "--set", "model.n_embd=32", "--set", "model.block_size=16",
    "--set", "train.steps=6", "--set", "train.warmup_steps=0", "--set", "train.batch_size=4",
    "--set", "data.source=synthetic",
]  # fmt: skip
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


def civetta_train(out: Path, fault: str, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "CIVETTA_FAULT": fault}
    command = [sys.executable, "-m", "launch", "train", str(CONFIG), "--out", str(out)]
    start = time.perf_counter()
    result = subprocess.run(
        [*command, *QUICK, *extra], capture_output=True, text=True, env=env, timeout=60
    )
    return result, time.perf_counter() - start


def leftover_ranks(out: Path) -> list[str]:
    """Command lines of processes still running this experiment."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(out) in text:
            found.append(text)
    return found


def test_exception_on_one_rank_aborts_the_job_naming_the_rank(tmp_path: Path) -> None:
    result, seconds = civetta_train(tmp_path, "rank=1,step=2", "--set", "parallel.dp=2")
    assert result.returncode != 0
    assert seconds < 30
    line = "error: rank 1 failed: InjectedFaultError: injected fault on rank 1 at step 2"
    assert result.stderr.count(line) == 1  # reported once
    assert "Traceback" not in result.stderr  # the traceback goes to the rank's log
    assert "Traceback" in (tmp_path / "logs" / "rank1.log").read_text()
    assert not (tmp_path / "metrics.json").exists()
    assert leftover_ranks(tmp_path) == []


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="process listing needs /proc")
def test_killed_rank_ends_the_job_quickly_with_no_process_left(tmp_path: Path) -> None:
    result, seconds = civetta_train(tmp_path, "rank=1,step=2,kind=kill", "--set", "parallel.dp=2")
    assert result.returncode != 0
    assert seconds < 30
    assert "error: rank 1 died without reporting an error (killed?)" in result.stderr
    assert leftover_ranks(tmp_path) == []


def test_single_process_failure_is_one_line(tmp_path: Path) -> None:
    result, _ = civetta_train(tmp_path, "rank=0,step=1")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: rank 0 failed: InjectedFaultError: injected fault on rank 0 at step 1 "
        f"(traceback: {tmp_path / 'logs' / 'rank0.log'})"
    ]


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="process listing needs /proc")
def test_killed_rank_is_named_when_hydra_reports_a_survivor(tmp_path: Path) -> None:
    """Rank 1 is killed; hydra SIGKILLs rank 0 and, as kind=linger makes it do every time (and
    load does by chance), reports rank 0's process as the bad termination. The launcher names
    rank 1 from what rank 1's guard saw, not from hydra's report."""
    fault = "rank=1,step=2,kind=kill;rank=0,step=1,kind=linger"
    result, seconds = civetta_train(tmp_path, fault, "--set", "parallel.dp=2")
    assert "BAD TERMINATION" in result.stdout  # hydra did report a process
    assert result.returncode != 0
    assert seconds < 30
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: rank 1 died without reporting an error (killed?)"
    ), result.stderr
    assert leftover_ranks(tmp_path) == []


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="process listing needs /proc")
def test_killed_rank_0_is_named(tmp_path: Path) -> None:
    result, seconds = civetta_train(tmp_path, "rank=0,step=2,kind=kill", "--set", "parallel.dp=2")
    assert result.returncode != 0
    assert seconds < 30
    assert "error: rank 0 died without reporting an error (killed?)" in result.stderr
    assert "rank 1" not in result.stderr
    assert leftover_ranks(tmp_path) == []


def test_exception_on_rank_0_of_two_is_named_once(tmp_path: Path) -> None:
    result, seconds = civetta_train(tmp_path, "rank=0,step=2", "--set", "parallel.dp=2")
    assert result.returncode != 0
    assert seconds < 30
    line = "error: rank 0 failed: InjectedFaultError: injected fault on rank 0 at step 2"
    assert result.stderr.count(line) == 1
    assert "died" not in result.stderr and "rank 1" not in result.stderr
    assert leftover_ranks(tmp_path) == []


def test_guard_writes_down_a_rank_that_ended_abnormally_and_ends_as_it_did(
    tmp_path: Path,
) -> None:
    """`launch.launcher guard` (the parent of every rank) records a killed or failing child
    with its pid and ends with the same status; a clean exit leaves no record."""
    from launch.launcher import EXITS_ENV, read_exits

    env = {**os.environ, EXITS_ENV: str(tmp_path)}
    guard = [sys.executable, "-m", "launch.launcher", "guard"]
    cases = [("kill -9 $$", -9), ("exit 3", 3), ("exit 0", 0)]
    for script, expected in cases:
        child = ["/bin/sh", "-c", f"echo $$ > {tmp_path}/pid; {script}"]
        done = subprocess.run([*guard, *child], env=env, timeout=30)
        assert done.returncode == expected
        pid = int((tmp_path / "pid").read_text())
        assert (pid in read_exits(tmp_path)) == (expected != 0)
    assert len(read_exits(tmp_path)) == 2
