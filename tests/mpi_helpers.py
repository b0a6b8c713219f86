"""Start multi-rank checks from pytest: `mpiexec -n N python ...` with a hard timeout.

A deadlocked collective must fail its test, not hang the suite, so every launch has a timeout
after which mpiexec and every process below it are killed. The environment pins one BLAS thread
per rank, as `launch.launcher.rank_environment` does for `civetta train`.

Tests run 4 ranks on 2 cores. MPICH's busy-wait yields the core every
MPIR_CVAR_POLLS_BEFORE_YIELD polls, so waiting ranks share it with computing ones; its heavy yield
(a nanosleep per poll) is left off, as the launcher leaves it: the suite takes the same time
either way, and training layouts measured up to 1.6x slower with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

WORKERS = Path(__file__).parent / "mpi_workers"

RANK_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}

# What an enclosing MPI launcher put in our own environment; a nested mpiexec must not see it.
_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "MPI_LOCALNRANKS", "MPI_LOCALRANKID", "HYDRA_")


class MPIRunError(AssertionError):
    """An MPI launch exited non-zero or timed out; the message carries its output."""


def find_mpiexec() -> str:
    """mpiexec next to this Python (the `mpich` wheel), else $CIVETTA_MPIEXEC, else on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    if os.environ.get("CIVETTA_MPIEXEC"):
        return os.environ["CIVETTA_MPIEXEC"]
    found = shutil.which("mpiexec")
    if found is None:
        raise MPIRunError("no mpiexec: install the `mpich` wheel or set CIVETTA_MPIEXEC")
    return found


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc). MPICH's hydra starts its proxy and the ranks in
    sessions of their own, so killing mpiexec's process group alone can miss them."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.parent.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _kill_tree(proc: subprocess.Popen[str], grace: float = 3.0) -> None:
    """Stop mpiexec and everything it started.

    SIGTERM first: hydra then kills its proxies and ranks itself and reaps them (a proxy killed
    from outside stays a zombie where PID 1 does not reap). Whatever is left after `grace`
    seconds is killed by pid.
    """
    doomed = _descendants(proc.pid) if Path("/proc").is_dir() else []
    # The processes may already be gone; that is the outcome we want.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def run_mpi(
    n: int,
    args: Sequence[str],
    timeout: float = 120,
    env: dict[str, str] | None = None,
    check: bool = True,
    abort_on_error: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run `mpiexec -n n <python> *args` and return its completed process.

    `args` is what follows the interpreter: a script path and its arguments, ["-m", module, ...]
    or ["-c", code]. With `abort_on_error` the ranks run under `python -m mpi4py`, which calls
    MPI_Abort on an uncaught exception: otherwise the failing rank would wait in MPI_Finalize for
    its peers, which wait in a collective for it, and the failure would look like a hang.
    Raises `MPIRunError` with the captured output on a timeout, and on a non-zero exit when
    `check` is true.
    """
    runner = ["-m", "mpi4py"] if abort_on_error else []
    command = [find_mpiexec(), "-n", str(n), sys.executable, *runner, *args]
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}
    full_env = {**inherited, **RANK_ENV, **(env or {})}
    start = time.perf_counter()
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        start_new_session=True,  # its own process group, killable as one
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        stdout, stderr = proc.communicate()
        raise MPIRunError(
            f"timed out after {timeout:.0f} s (deadlock?): {' '.join(command)}\n"
            f"--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
        ) from None
    result = subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise MPIRunError(
            f"exit code {proc.returncode} after {time.perf_counter() - start:.1f} s: "
            f"{' '.join(command)}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
        )
    return result


def run_mpi_json(n: int, args: Sequence[str], timeout: float = 120, **kwargs: Any) -> Any:
    """`run_mpi`, then the JSON value of the last stdout line starting with '{' (rank 0's)."""
    result = run_mpi(n, args, timeout=timeout, **kwargs)
    for line in reversed(result.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise MPIRunError(f"no JSON line in the output\n--- stdout ---\n{result.stdout}")


def run_worker(n: int, name: str, *worker_args: str, timeout: float = 120) -> Any:
    """Run tests/mpi_workers/<name>.py on n ranks and return rank 0's JSON result."""
    return run_mpi_json(n, [str(WORKERS / f"{name}.py"), *worker_args], timeout=timeout)
