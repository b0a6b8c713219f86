"""Starting the ranks: re-execute `civetta` under `mpiexec -n N` when a layout needs N > 1.

The launcher is, in order: `--mpiexec PATH`, `$CIVETTA_MPIEXEC`, the `mpiexec` installed beside
this Python (the `mpich` wheel puts it there), then `mpiexec` on PATH. Each of N ranks on C
cores gets max(1, C // N) threads (`OMP_NUM_THREADS` and the BLAS and numexpr counts) unless the
user set `OMP_NUM_THREADS`, so the ranks do not fight over cores.

`kill_tree` is the one way civetta stops a job it started (an interrupted relaunch, a compare
run past its timeout, a calibration that hangs, a test's deadlock): mpiexec and every process
below it.

`relaunch` runs each rank under `guard` (`python -m launch.launcher guard ...`), its parent,
which writes down a rank that ended abnormally before MPICH's process manager can learn of it.
That, not hydra's "BAD TERMINATION ... PID" report, names a rank that was killed: when one rank
dies hydra SIGKILLs the others, and whether it then records a survivor's SIGKILL as a bad
termination of its own depends on when it reaps it; it prints the lowest such rank.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

# Where each rank's guard writes how its rank ended, when abnormally: one file per rank process.
EXITS_ENV = "CIVETTA_RANK_EXITS"


class LauncherError(RuntimeError):
    """No usable MPI launcher; one line for the user."""


def inside_mpi_job() -> bool:
    """Started by mpirun/mpiexec/srun: every rank runs the experiment in place."""
    # Imported here: a rank's guard imports this module and must start quickly (no numpy).
    from parallel.comm import launched_by_mpi

    return launched_by_mpi() or ("SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ)


def find_mpiexec(explicit: str | None = None) -> str:
    if explicit:  # asked for by name: that one or an error, never a silent substitute
        found = shutil.which(explicit)
        if found is None:
            raise LauncherError(f"--mpiexec {explicit!r} is not an executable")
        return found
    candidates = [os.environ.get("CIVETTA_MPIEXEC")]
    candidates.append(str(Path(sys.executable).parent / "mpiexec"))
    candidates.append(shutil.which("mpiexec"))
    for candidate in candidates:
        if candidate and (shutil.which(candidate) or Path(candidate).is_file()):
            return shutil.which(candidate) or candidate
    raise LauncherError(
        "no mpiexec found: install the 'mpich' wheel, or set CIVETTA_MPIEXEC / --mpiexec"
    )


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from Linux's /proc (empty where there is none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            # The command name in parentheses may hold spaces; the ppid is the 2nd field after it.
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(stat.parent.name))
    found, stack = [], [pid]
    while stack:
        below = children.get(stack.pop(), [])
        found += below
        stack += below
    return found


def kill_tree(process: subprocess.Popen, grace_s: float = 3.0) -> None:
    """Stop `process` (mpiexec, or a `civetta train` above it) and everything it started.

    SIGTERM first, to its process group when it leads one (`start_new_session=True`): hydra then
    stops its proxies and ranks itself and reaps them (a proxy killed from outside stays a zombie
    where PID 1 does not reap). After `grace_s` seconds SIGKILL, and by pid too for every process
    that was below it, since hydra starts the ranks in sessions of their own.
    """
    below = descendants(process.pid)

    def send(sig: signal.Signals) -> None:
        # The processes may already be gone: that is the outcome wanted.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(process.pid) == process.pid:
                os.killpg(process.pid, sig)
            else:
                process.send_signal(sig)

    send(signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
    for pid in below:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


def available_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def threads_per_rank(ranks: int, cores: int | None = None) -> int:
    """max(1, C // N): N ranks share the C cores without oversubscribing them."""
    return max(1, (available_cores() if cores is None else cores) // max(1, ranks))


def rank_environment(ranks: int | None = None) -> dict[str, str]:
    """The environment of each of `ranks` ranks: `threads_per_rank(ranks)` threads for the
    thread pools (OpenMP, OpenBLAS, MKL, numexpr) unless the user set `OMP_NUM_THREADS`; with
    `ranks` None one thread (a baseline timed like one rank of a layout that fills the cores)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(1 if ranks is None else threads_per_rank(ranks)))
    for name in THREAD_VARIABLES[1:]:
        env.setdefault(name, env["OMP_NUM_THREADS"])
    # With more ranks than cores, MPICH's own busy-wait already yields the core every
    # MPIR_CVAR_POLLS_BEFORE_YIELD polls, so a waiting rank does not starve one that computes.
    # Its heavy yield (a nanosleep per poll) is left off: measured on 4 ranks on 2 cores, it made
    # dp=2 x tp=2 1.3x and ZeRO-3 dp=4 1.6x slower, and dp=4 and pp=4 no faster.
    return env


def mpi_command(
    n: int, argv: list[str], mpiexec: str | None = None, guarded: bool = False
) -> list[str]:
    """The command that runs `python -m launch ARGV` on `n` ranks (each under `guard` if
    `guarded`).

    `-m mpi4py` makes an exception that escapes before the worker's own handler (an import
    error, say) abort the job instead of leaving the other ranks waiting in a collective.
    """
    python = [sys.executable, "-m", "mpi4py", "-m", "launch"]
    if guarded:
        python = [sys.executable, "-m", "launch.launcher", "guard", *python]
    return [find_mpiexec(mpiexec), "-n", str(n), *python, *argv]


@dataclass
class JobResult:
    exit_code: int
    # Process ids of the ranks that ended abnormally on their own (killed by a signal, or a
    # non-zero exit), first first; not those the launcher killed because another one died.
    bad_pids: list[int] = field(default_factory=list)


def guard(command: list[str]) -> NoReturn:
    """Run one rank, `command`, as this process's child, and end as it ended.

    hydra started this process and holds its ends of the rank's stdout, stderr and PMI socket,
    which the rank shares with it: they stay open while this process lives, so hydra learns that
    the rank ended only when this process exits, after it has written down (in `$EXITS_ENV`)
    how and when. A survivor that hydra kills because a peer died is killed with its guard (one
    process group, one SIGKILL), so it is never written down.
    """
    # Ctrl-C is for the rank to handle; a KeyboardInterrupt here would only print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        try:
            os.execv(command[0], command)
        except OSError as exc:
            print(f"error: cannot start {command[0]}: {exc}", file=sys.stderr, flush=True)
        os._exit(127)
    _, status = os.waitpid(pid, 0)
    directory = os.environ.get(EXITS_ENV)
    if status != 0 and directory:
        with contextlib.suppress(OSError):  # no record: the launcher then names no rank
            record = Path(directory) / f"{pid}.exit"
            record.write_text(f"{time.monotonic_ns()} {status}\n", encoding="utf-8")
    if os.WIFSIGNALED(status):  # end as the rank did, so mpiexec reports and exits the same
        sig = os.WTERMSIG(status)
        with contextlib.suppress(OSError, ValueError):  # SIGKILL has no handler to reset
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)


def read_exits(directory: Path) -> list[int]:
    """The pids the guards wrote down in `directory`, in the order their ranks ended."""
    ended = []
    for record in directory.glob("*.exit"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ended.append((int(record.read_text(encoding="utf-8").split()[0]), int(record.stem)))
    return [pid for _, pid in sorted(ended)]


def relaunch(n: int, argv: list[str], mpiexec: str | None = None) -> JobResult:
    """Run this command line again on `n` ranks and return how the job ended.

    The job's output is passed through as it comes (rank 0's progress bar included). Each rank
    runs under `guard`, so the ranks that died on their own come back as `bad_pids`, for the
    caller to name. Raises `LauncherError` when there is no MPI launcher.
    """
    # No launcher: LauncherError, for the CLI to print.
    command = mpi_command(n, argv, mpiexec, guarded=True)
    exits = Path(tempfile.mkdtemp(prefix="civetta-exits-"))
    try:
        code = _run_job(command, exits, n)
        return JobResult(code, read_exits(exits))
    finally:
        shutil.rmtree(exits, ignore_errors=True)


def _run_job(command: list[str], exits: Path, ranks: int) -> int:
    env = rank_environment(ranks)
    env[EXITS_ENV] = str(exits)
    if sys.stdout.isatty():
        env.setdefault("TTY_COMPATIBLE", "1")  # rank 0 keeps its live progress bar
        env.setdefault("TTY_INTERACTIVE", "1")
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE)
    assert isinstance(job.stdout, io.BufferedReader)  # bufsize -1: buffered, with read1
    out = sys.stdout.buffer
    try:
        while chunk := job.stdout.read1(65536):
            out.write(chunk)
            out.flush()
        return job.wait()
    except BaseException:  # Ctrl-C, or our stdout closed: no rank may outlive this process
        kill_tree(job)
        raise


if __name__ == "__main__":  # what mpiexec starts for each rank: `... guard COMMAND...`
    if sys.argv[1:2] != ["guard"] or len(sys.argv) < 3:
        sys.exit("usage: python -m launch.launcher guard COMMAND...")
    guard(sys.argv[2:])
