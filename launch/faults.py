"""Fault injection for failure tests:
`CIVETTA_FAULT="rank=R,step=S,kind=raise|kill|enospc|linger[,at=step|checkpoint]"`, or several
such specs joined by ';'.

Rank R raises an exception (or SIGKILLs itself, or fails as a full disk does: OSError ENOSPC)
when it reaches step S, so tests can prove that one failing rank ends the whole job quickly with
a message naming it. `at=checkpoint` fails instead while rank R writes its checkpoint file of
step S (written, not yet synced or renamed). Unset, it costs one dict lookup per step.

`kind=linger` does not fail: from step S on, a detached helper keeps rank R's stdout and stderr
open for a moment after rank R ends, and closes them one at a time. MPICH's process manager
(hydra's proxy) then reaps rank R while its output is still open, which records the SIGKILL
hydra's own cleanup sent it as a bad termination of its own, and, rank order winning, reports
rank R's PID as the process that died. Under load the same happens by chance; this makes it
happen every time.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys

ENV = "CIVETTA_FAULT"
KINDS = ("raise", "kill", "enospc", "linger")
POINTS = ("step", "checkpoint")

# The helper of kind=linger: wait until the rank has ended (a zombie counts: hydra has not reaped
# it yet; 60 s at most), then close stdout, then stderr, each a little later, so hydra's proxy
# sees one of the rank's outputs close while the other is still open and reaps the rank between.
_LINGER = """\
import os, sys, time

def ended(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True

rank, deadline = int(sys.argv[1]), time.monotonic() + 60
while not ended(rank) and time.monotonic() < deadline:
    time.sleep(0.02)
time.sleep(0.3)
os.close(1)
time.sleep(0.3)
"""


class InjectedFaultError(RuntimeError):
    """The failure asked for by CIVETTA_FAULT."""


def parse(spec: str) -> tuple[int, int, str, str]:
    fields = dict(part.split("=", 1) for part in spec.split(",") if "=" in part)
    try:
        rank, step = int(fields["rank"]), int(fields["step"])
    except (KeyError, ValueError):
        raise ValueError(
            f"{ENV} expected 'rank=R,step=S[,kind={'|'.join(KINDS)}][,at=step|checkpoint]', "
            f"got {spec!r}"
        ) from None
    kind = fields.get("kind", "raise")
    if kind not in KINDS:
        raise ValueError(f"{ENV} kind expected one of {', '.join(KINDS)}, got {kind!r}")
    at = fields.get("at", "step")
    if at not in POINTS:
        raise ValueError(f"{ENV} at expected one of {', '.join(POINTS)}, got {at!r}")
    return rank, step, kind, at


def maybe_fail(rank: int, step: int, at: str = "step") -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    for one in spec.split(";"):
        fault_rank, fault_step, kind, fault_at = parse(one)
        if (rank, step, at) == (fault_rank, fault_step, fault_at):
            _fail(rank, step, kind)


def _fail(rank: int, step: int, kind: str) -> None:
    if kind == "linger":
        # A session of its own, so the SIGKILL hydra sends this rank's process group spares it.
        subprocess.Popen(
            [sys.executable, "-c", _LINGER, str(os.getpid())],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        return
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    raise InjectedFaultError(f"injected fault on rank {rank} at step {step}")
