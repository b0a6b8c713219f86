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
