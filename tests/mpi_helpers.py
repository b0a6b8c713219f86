"""Start multi-rank checks from pytest: `mpiexec -n N python ...` with a hard timeout.

A deadlocked collective must fail its test, not hang the suite, so every launch has a timeout
after which mpiexec and every process below it are killed (`launch.launcher.kill_tree`). The
mpiexec is the one `civetta train` would use (`launch.launcher.find_mpiexec`), and the
environment pins one BLAS thread per rank, as `launch.launcher.rank_environment` does.

Tests run 4 ranks on 2 cores. MPICH's busy-wait yields the core every
MPIR_CVAR_POLLS_BEFORE_YIELD polls, so waiting ranks share it with computing ones; its heavy yield
(a nanosleep per poll) is left off, as the launcher leaves it: the suite takes the same time
either way, and training layouts measured up to 1.6x slower with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from launch.launcher import find_mpiexec, kill_tree

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
        kill_tree(proc)
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


def train_worker_run(
    out_dir: Path, overrides: Sequence[str], ranks: int = 1, timeout: float = 180
) -> dict[str, np.ndarray]:
    """tests/mpi_workers/train_worker.py under `ranks` ranks (one process: no MPI at all) with
    these `--set`-style overrides; its arrays (losses, norms, gathered gradients, ...)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "run.npz"
    args = [str(WORKERS / "train_worker.py"), str(out), *overrides]
    if ranks == 1:
        subprocess.run([sys.executable, *args], check=True, timeout=timeout)
    else:
        run_mpi(ranks, args, timeout=timeout)
    with np.load(out, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def assert_same_run(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    """A layout's run equals one process's in float64: every step's loss and global gradient
    norm within 1e-10 relative, every gathered gradient within 1e-9 of its largest entry."""
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-10, atol=0)
    np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=1e-10, atol=0)
    grads = sorted(k for k in ref if k.startswith("grad."))
    assert grads == sorted(k for k in got if k.startswith("grad."))
    for key in grads:
        scale = np.max(np.abs(ref[key])) + 1e-30
        assert np.max(np.abs(got[key] - ref[key])) / scale < 1e-9, key
