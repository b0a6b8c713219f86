"""Fault injection for failure tests:
`CIVETTA_FAULT="rank=R,step=S,kind=raise|kill|enospc[,at=step|checkpoint]"`.

Rank R raises an exception (or SIGKILLs itself, or fails as a full disk does: OSError ENOSPC)
when it reaches step S, so tests can prove that one failing rank ends the whole job quickly with
a message naming it. `at=checkpoint` fails instead while rank R writes its checkpoint file of
step S (written, not yet synced or renamed). Unset, it costs one dict lookup per step.
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "CIVETTA_FAULT"
KINDS = ("raise", "kill", "enospc")
POINTS = ("step", "checkpoint")


class InjectedFaultError(RuntimeError):
    """The failure asked for by CIVETTA_FAULT."""


def parse(spec: str) -> tuple[int, int, str, str]:
    fields = dict(part.split("=", 1) for part in spec.split(",") if "=" in part)
    try:
        rank, step = int(fields["rank"]), int(fields["step"])
    except (KeyError, ValueError):
        raise ValueError(
            f"{ENV} expected 'rank=R,step=S[,kind=raise|kill|enospc][,at=step|checkpoint]', "
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
    fault_rank, fault_step, kind, fault_at = parse(spec)
    if (rank, step, at) != (fault_rank, fault_step, fault_at):
        return
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    raise InjectedFaultError(f"injected fault on rank {rank} at step {step}")
