"""The MPI test harness itself: a hang fails within its timeout and leaves no rank behind."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from mpi_helpers import WORKERS, MPIRunError, run_mpi, run_worker


def _ranks_alive(script: Path) -> list[int]:
    alive = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(script).encode() in cmdline.read_bytes():
                alive.append(int(cmdline.parent.name))
        except OSError:
            continue
    return alive


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to look for leftovers")
def test_deadlock_fails_and_is_killed() -> None:
    script = WORKERS / "hang_worker.py"
    start = time.perf_counter()
    with pytest.raises(MPIRunError, match="timed out") as info:
        run_mpi(2, [str(script)], timeout=2)
    assert time.perf_counter() - start < 10
    assert "started" in str(info.value)  # the output so far is in the message
    deadline = time.perf_counter() + 5
    while _ranks_alive(script) and time.perf_counter() < deadline:
        time.sleep(0.05)
    assert _ranks_alive(script) == [], "ranks survived the timeout"


def test_nonzero_exit_raises_with_output() -> None:
    with pytest.raises(MPIRunError, match="rank 1 gives up"):
        run_mpi(2, [str(WORKERS / "hang_worker.py"), "crash"], timeout=60)


def test_rank_environment(tmp_path: Path) -> None:
    # Each rank writes its own file: ranks' stdout lines may interleave mid-line.
    code = (
        "import os; from mpi4py import MPI; "
        f"open(os.path.join({str(tmp_path)!r}, str(MPI.COMM_WORLD.rank)), 'w').write("
        "os.environ['OMP_NUM_THREADS'] + ' ' + os.environ['CIVETTA_PROBE'])"
    )
    run_mpi(2, ["-c", code], timeout=60, env={"CIVETTA_PROBE": "x"})
    assert [(tmp_path / str(r)).read_text() for r in range(2)] == ["1 x", "1 x"]
    assert os.environ.get("CIVETTA_PROBE") is None  # the caller's environment is untouched


def test_worker_json() -> None:
    with pytest.raises(MPIRunError, match=r"(?i)no such file"):
        run_worker(1, "no_such_worker", timeout=60)
