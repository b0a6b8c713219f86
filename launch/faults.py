"""Fault injection for failure tests: `CIVETTA_FAULT="rank=R,step=S,kind=raise|kill"`.

Rank R raises an exception (or SIGKILLs itself) when it reaches step S, so tests can prove that
one failing rank ends the whole job quickly with a message naming it. Unset, it costs one dict
lookup per step.
"""

from __future__ import annotations

import os
import signal

ENV = "CIVETTA_FAULT"
KINDS = ("raise", "kill")


class InjectedFaultError(RuntimeError):
    """The failure asked for by CIVETTA_FAULT."""


def parse(spec: str) -> tuple[int, int, str]:
    fields = dict(part.split("=", 1) for part in spec.split(",") if "=" in part)
    try:
        rank, step = int(fields["rank"]), int(fields["step"])
    except (KeyError, ValueError):
        raise ValueError(
            f"{ENV} expected 'rank=R,step=S[,kind=raise|kill]', got {spec!r}"
        ) from None
    kind = fields.get("kind", "raise")
    if kind not in KINDS:
        raise ValueError(f"{ENV} kind expected one of {', '.join(KINDS)}, got {kind!r}")
    return rank, step, kind


def maybe_fail(rank: int, step: int) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    fault_rank, fault_step, kind = parse(spec)
    if (rank, step) != (fault_rank, fault_step):
        return
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFaultError(f"injected fault on rank {rank} at step {step}")
