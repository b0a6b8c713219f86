"""Pipeline schedules as data: generators, a checker, a discrete-event replay, CSV/YAML files.

A schedule is, for every pipeline rank, an ordered list of `Action`s: compute (F forward, B full
backward, or I backward-input then W backward-weight) of one microbatch on one (virtual) stage,
and point-to-point communication (SEND_F/RECV_F carry activations forward, SEND_B/RECV_B carry
input gradients backward). A schedule says where each stage lives (`placement`, stage → rank);
by default stage s lives on rank s % pp, so with v virtual stages rank r holds stages r, r+pp,
r+2pp, ... (Megatron-LM's interleaved layout). V-shaped schedules (ZB-V, DualPipeV) place two
stages per rank in a V: rank r holds stages r and 2·pp − 1 − r (`v_placement`).

Communication convention shared with the executor: SEND_F(m, s) runs on rank(s) right after
F(m, s) and is matched by RECV_F(m, s) on rank(s+1); SEND_B(m, s) runs on rank(s) after the B or I
of (m, s) and is matched by RECV_B(m, s) on rank(s-1). SENDs never block (Isend, completed at the
end of the step); RECVs block until the matching SEND has run. Consecutive stages on one rank
(pp == 1, or the turn of a V) exchange nothing: the executor hands the tensors over in memory.

Nothing here needs MPI: `check_schedule` proves a schedule complete and deadlock-free before it
runs, and `simulate` replays it with per-action durations (the cost model's discrete-event replay).
"""

from __future__ import annotations

import functools
import re
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

ACTION_KINDS = ("F", "B", "I", "W", "SEND_F", "RECV_F", "SEND_B", "RECV_B")
_KIND_SET = frozenset(ACTION_KINDS)
COMPUTE_KINDS = ("F", "B", "I", "W")
COMM_KINDS = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")
V_SHAPED = ("zb-v", "dualpipev")  # two stages per rank, placed in a V (`v_placement`)
SCHEDULE_NAMES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", *V_SHAPED)

_ACTION_RE = re.compile(r"^(SEND_F|RECV_F|SEND_B|RECV_B|F|B|I|W)(\d+)@s(\d+)$")
_BACKWARD_KINDS = ("B", "I")


class ScheduleError(ValueError):
    """A schedule that cannot run (or cannot be built, parsed or loaded); one line for the user."""


@dataclass(frozen=True, order=True)
class Action:
    """One step of one rank: compute or communication for `microbatch` on virtual `stage`."""

    kind: str
    microbatch: int
    stage: int

    def __post_init__(self) -> None:
        # One fast test for the valid case: generators build millions of actions for a tuner.
        m, s = self.microbatch, self.stage
        if self.kind in _KIND_SET and type(m) is int and type(s) is int and m >= 0 and s >= 0:
            return
        if self.kind not in ACTION_KINDS:
            raise ScheduleError(
                f"unknown action kind {self.kind!r}; expected one of {', '.join(ACTION_KINDS)}"
            )
        for field_name in ("microbatch", "stage"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ScheduleError(
                    f"action {field_name} must be a non-negative integer, got {value!r}"
                )

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}@s{self.stage}"

    @classmethod
    def parse(cls, text: str) -> Action:
        """The inverse of `str`: "F3@s1" -> Action("F", 3, 1)."""
        match = _ACTION_RE.match(text.strip()) if isinstance(text, str) else None
        if match is None:
            raise ScheduleError(
                f"cannot parse action {text!r}: expected KIND<microbatch>@s<stage> "
                f"such as F3@s1 or SEND_B0@s2, KIND one of {', '.join(ACTION_KINDS)}"
            )
        return cls(match.group(1), int(match.group(2)), int(match.group(3)))

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE_KINDS

    @property
    def is_comm(self) -> bool:
        return self.kind in COMM_KINDS


Placement = tuple[int, ...]  # stage -> the pipeline rank that holds it


def interleaved_placement(pp: int, v: int = 1) -> Placement:
    """Stage s on rank s % pp: rank r holds r, r+pp, r+2pp, ... (Megatron-LM's interleaving)."""
    return tuple(s % pp for s in range(pp * v))


def v_placement(pp: int) -> Placement:
    """Two stages per rank in a V: rank r holds stages r and 2·pp − 1 − r, so the first and the
    last stage share rank 0 and the turn (stages pp − 1 and pp) stays on rank pp − 1."""
    return tuple(range(pp)) + tuple(reversed(range(pp)))


@dataclass
class Schedule:
    """Per-rank ordered action lists for `pp` ranks, `microbatches` and `virtual_stages`, and
    where each of the pp · virtual_stages stages lives (`placement`; None: interleaved)."""

    name: str
    pp: int
    microbatches: int
    virtual_stages: int
    actions: list[list[Action]]
    placement: Placement | None = None

    def __post_init__(self) -> None:
        if self.placement is not None:
            check_placement(self.placement, self.pp, self.virtual_stages)

    def stage_rank(self, stage: int) -> int:
        """The rank holding `stage` (interleaved by default: rank r holds r, r+pp, ...)."""
        if self.placement is None:
            return stage % self.pp
        return self.placement[stage]

    @property
    def num_stages(self) -> int:
        return self.pp * self.virtual_stages

    @property
    def stage_placement(self) -> Placement:
        """The placement, spelled out."""
        if self.placement is None:
            return interleaved_placement(self.pp, self.virtual_stages)
        return self.placement

    def stages_of(self, rank: int) -> list[int]:
        """The virtual stages held by `rank`, in model order."""
        return [s for s, r in enumerate(self.stage_placement) if r == rank]

    @property
    def has_communication(self) -> bool:
        return any(action.is_comm for rank_actions in self.actions for action in rank_actions)

    def compute_only(self) -> list[list[Action]]:
        """The compute actions of every rank, communication stripped."""
        return [[a for a in rank_actions if a.is_compute] for rank_actions in self.actions]


def check_placement(placement: Any, pp: int, v: int) -> None:
    """A placement names a rank in 0..pp-1 for each of the pp · v stages, v stages per rank."""
    stages = pp * v
    if not isinstance(placement, tuple | list) or len(placement) != stages:
        raise ScheduleError(
            f"placement expected {stages} ranks (pp={pp} × virtual_stages={v} stages), "
            f"got {placement!r}"
        )
    for stage, rank in enumerate(placement):
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < pp:
            raise ScheduleError(
                f"placement of stage {stage} expected a rank in 0..{pp - 1}, got {rank!r}"
            )
    for rank in range(pp):
        held = sum(1 for r in placement if r == rank)
        if held != v:
            raise ScheduleError(
                f"placement puts {held} stages on rank {rank}; every rank holds virtual_stages={v}"
            )


# ----------------------------------------------------------------------------------------------
# Generators


def _check_sizes(pp: Any, microbatches: Any, virtual_stages: Any = 1) -> None:
    for label, value in (
        ("pp", pp),
        ("microbatches", microbatches),
        ("virtual_stages", virtual_stages),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ScheduleError(f"{label} must be a positive integer, got {value!r}")


def insert_communication(
    compute_only: list[list[Action]], pp: int, v: int = 1, placement: Placement | None = None
) -> list[list[Action]]:
    """Add the SEND/RECV actions a compute-only schedule needs, per rank, for stages placed by
    `placement` (None: interleaved).

    Each RECV goes right before the compute that consumes it and each SEND right after the
    compute that produced it: the latest receive and the earliest send, so the communication adds
    no ordering constraint beyond the compute order itself.
    """
    _check_sizes(pp, 1, v)
    where = interleaved_placement(pp, v) if placement is None else tuple(placement)
    check_placement(where, pp, v)
    if len(compute_only) != pp:
        raise ScheduleError(
            f"expected {pp} rank lists (one per pipeline rank), got {len(compute_only)}"
        )
    num_stages = pp * v
    result: list[list[Action]] = []
    for rank, rank_actions in enumerate(compute_only):
        out: list[Action] = []
        for index, action in enumerate(rank_actions):
            if action.is_comm:
                raise ScheduleError(
                    f"rank {rank}, action {index} ({action}): insert_communication expects "
                    f"compute actions only (F, B, I, W)"
                )
            m, s = action.microbatch, action.stage
            if s >= num_stages:
                raise ScheduleError(
                    f"rank {rank}, action {index} ({action}): stage {s} out of range "
                    f"({num_stages} stages)"
                )
            # Neighbours on the same rank (pp == 1, a V's turn) hand tensors over in memory.
            prev_remote = s > 0 and where[s - 1] != where[s]
            next_remote = s + 1 < num_stages and where[s + 1] != where[s]
            if action.kind == "F":
                if prev_remote:
                    out.append(Action("RECV_F", m, s - 1))
                out.append(action)
                if next_remote:
                    out.append(Action("SEND_F", m, s))
            elif action.kind in _BACKWARD_KINDS:
                if next_remote:
                    out.append(Action("RECV_B", m, s + 1))
                out.append(action)
                if prev_remote:
                    out.append(Action("SEND_B", m, s))
            else:
                out.append(action)
        result.append(out)
    return result


def _build(
    name: str,
    pp: int,
    m: int,
    v: int,
    compute: list[list[Action]],
    placement: Placement | None = None,
) -> Schedule:
    actions = insert_communication(compute, pp, v, placement)
    return Schedule(name, pp, m, v, actions, placement)


def gpipe(pp: int, m: int) -> Schedule:
    """All forwards, then all backwards (Huang et al. 2019): every rank holds all m activations."""
    _check_sizes(pp, m)
    compute = [
        [Action("F", i, r) for i in range(m)] + [Action("B", i, r) for i in range(m)]
        for r in range(pp)
    ]
    return _build("gpipe", pp, m, 1, compute)


def _one_f_one_b_order(pp: int, m: int, rank: int, backward: str) -> list[tuple[str, int]]:
    """(kind, microbatch) order of 1F1B on `rank`: pp-1-rank warm-up forwards, then F/B pairs."""
    warmup = min(pp - 1 - rank, m)
    order = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):
        order += [("F", warmup + i), (backward, i)]
    order += [(backward, i) for i in range(m - warmup, m)]
    return order


def one_f_one_b(pp: int, m: int) -> Schedule:
    """1F1B (PipeDream-Flush, Narayanan et al. 2021): at most pp - rank activations in flight."""
    _check_sizes(pp, m)
    compute = [
        [Action(kind, i, r) for kind, i in _one_f_one_b_order(pp, m, r, "B")] for r in range(pp)
    ]
    return _build("1f1b", pp, m, 1, compute)


def interleaved_1f1b(pp: int, m: int, v: int) -> Schedule:
    """Megatron-LM's interleaved 1F1B (Narayanan et al. 2021) over v virtual stages per rank.

    Microbatches go through a rank's chunks in rounds of pp: forwards of microbatches 0..pp-1 on
    chunk 0, then the same on chunk 1, ...; backwards mirror this from the last chunk. The warm-up
    is Megatron's 2·(pp-1-rank) + (v-1)·pp forwards, which lets the first gradient arrive before
    the rank runs dry. With v == 1 this is exactly `one_f_one_b` (Megatron does the same); the
    microbatches must be a multiple of pp for every v, so a config means the same thing at any v.
    """
    _check_sizes(pp, m, v)
    if m % pp != 0:
        raise ScheduleError(
            f"interleaved-1f1b needs microbatches divisible by pp: got microbatches={m}, pp={pp}"
        )
    if v == 1:
        schedule = one_f_one_b(pp, m)
        schedule.name = "interleaved-1f1b"
        return schedule
    total = m * v

    def chunk_and_microbatch(k: int, forward: bool) -> tuple[int, int]:
        chunk = (k // pp) % v
        if not forward:
            chunk = v - 1 - chunk
        return chunk, (k // (pp * v)) * pp + k % pp

    compute = []
    for r in range(pp):
        warmup = min(2 * (pp - 1 - r) + (v - 1) * pp, total)
        order = [(True, k) for k in range(warmup)]
        for k in range(total - warmup):
            order += [(True, warmup + k), (False, k)]
        order += [(False, k) for k in range(total - warmup, total)]
        actions = []
        for forward, k in order:
            chunk, microbatch = chunk_and_microbatch(k, forward)
            actions.append(Action("F" if forward else "B", microbatch, chunk * pp + r))
        compute.append(actions)
    return _build("interleaved-1f1b", pp, m, v, compute)


def zb_h1(pp: int, m: int) -> Schedule:
    """ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism"), backward split into I and W.

    The forwards and input-gradient passes I follow 1F1B exactly, so the in-flight activations
    (F done, I not) peak as in 1F1B. The weight-gradient pass W of a microbatch is off the
    critical path: rank r runs W right after I except for its first r microbatches, whose W
    passes move to the end, where in 1F1B rank r would idle while the last gradients travel up.
    """
    _check_sizes(pp, m)
    compute = []
    for r in range(pp):
        actions = []
        weight_done = 0
        backward_done = 0
        for kind, i in _one_f_one_b_order(pp, m, r, "I"):
            actions.append(Action(kind, i, r))
            if kind == "I":
                backward_done += 1
                if backward_done > r:
                    actions.append(Action("W", weight_done, r))
                    weight_done += 1
        actions += [Action("W", i, r) for i in range(weight_done, m)]
        compute.append(actions)
    return _build("zb-h1", pp, m, 1, compute)


def make_schedule(name: str, pp: int, m: int, v: int = 1) -> Schedule:
    """The named schedule: "gpipe" | "1f1b" | "interleaved-1f1b" | "zb-h1" | "zb-h2" | "zb-v" |
    "dualpipev" (the last two V-shaped, two stages per rank whatever `v` says)."""
    _check_sizes(pp, m, v)
    if name == "interleaved-1f1b":
        return interleaved_1f1b(pp, m, v)
    if name in ("zb-h2", *V_SHAPED):
        from parallel import zero_bubble  # it builds on this module's generators

        zero_bubble_builders = {
            "zb-h2": zero_bubble.zb_h2,
            "zb-v": zero_bubble.zb_v,
            "dualpipev": zero_bubble.dualpipev,
        }
        if v != 1 and name == "zb-h2":
            raise ScheduleError(f"virtual_stages must be 1 for schedule 'zb-h2' (got {v})")
        return zero_bubble_builders[name](pp, m)
    builders: dict[str, Callable[[int, int], Schedule]] = {
        "gpipe": gpipe,
        "1f1b": one_f_one_b,
        "zb-h1": zb_h1,
    }
    if name not in builders:
        raise ScheduleError(
            f"unknown pipeline schedule {name!r}; expected one of {', '.join(SCHEDULE_NAMES)}"
        )
    if v != 1:
        raise ScheduleError(
            f"virtual_stages must be 1 for schedule {name!r} (got {v}); "
            f"only interleaved-1f1b uses virtual stages"
        )
    return builders[name](pp, m)


@functools.lru_cache(maxsize=64)
def schedule_of(layout: Any) -> Schedule:
    """The schedule a `parallel.layout.Layout` runs, checked: its file's actions (read by the
    launcher into the layout) or its generator's. Cached: the trainer and every projection of
    one layout share it, and nobody changes a schedule once built."""
    if layout.schedule_actions is not None:
        actions = [[Action.parse(a) for a in rank] for rank in layout.schedule_actions]
        schedule = Schedule(
            layout.schedule_label,
            layout.pp,
            layout.microbatches,
            layout.stages_per_rank,
            actions,
            layout.placement,
        )
    else:
        schedule = make_schedule(
            layout.schedule, layout.pp, layout.microbatches, layout.virtual_stages
        )
    check_schedule(schedule)
    return schedule


# ----------------------------------------------------------------------------------------------
# Checker


def _where(rank: int, index: int, action: Action) -> str:
    return f"rank {rank}, action {index} ({action})"


def _offending(rank: int, index: int, action: Action, problem: str) -> ScheduleError:
    """The error naming an offending action: "rank 1, action 4 (B3@s1): <problem>"."""
    return ScheduleError(f"{_where(rank, index, action)}: {problem}")


def _comm_peer(action: Action) -> int:
    """The stage on the other end of a communication action."""
    return action.stage + 1 if action.kind in ("SEND_F", "RECV_F") else action.stage - 1


def _expected_rank(schedule: Schedule, action: Action) -> int:
    """The rank an action must run on (a RECV runs on the receiving stage's rank)."""
    if action.kind.startswith("RECV"):
        return schedule.stage_rank(_comm_peer(action))
    return schedule.stage_rank(action.stage)


_Key = tuple[str, int, int]  # (kind, microbatch, stage): cheaper to build than an Action


def _key(action: Action) -> _Key:
    return (action.kind, action.microbatch, action.stage)


def _check_actions(schedule: Schedule) -> dict[_Key, tuple[int, int]]:
    """Indices in range, every action on its rank, no action twice; returns where each runs."""
    pp, num_stages = schedule.pp, schedule.num_stages
    seen: dict[_Key, tuple[int, int]] = {}
    for rank, rank_actions in enumerate(schedule.actions):
        for index, action in enumerate(rank_actions):
            if not isinstance(action, Action):
                raise ScheduleError(f"rank {rank}, action {index}: {action!r} is not an Action")
            if action.microbatch >= schedule.microbatches:
                raise _offending(
                    rank,
                    index,
                    action,
                    f"microbatch {action.microbatch} out of range "
                    f"(the schedule has {schedule.microbatches} microbatches)",
                )
            if action.stage >= num_stages:
                raise _offending(
                    rank,
                    index,
                    action,
                    f"stage {action.stage} out of range (pp={pp} × "
                    f"virtual_stages={schedule.virtual_stages} gives {num_stages} stages)",
                )
            if action.is_comm:
                peer = _comm_peer(action)
                if not 0 <= peer < num_stages:
                    raise _offending(
                        rank, index, action, f"stage {action.stage} has no stage {peer} to talk to"
                    )
                if schedule.stage_rank(peer) == schedule.stage_rank(action.stage):
                    raise _offending(
                        rank,
                        index,
                        action,
                        f"stages {action.stage} and {peer} both live on rank "
                        f"{schedule.stage_rank(peer)}, which passes tensors between them in memory",
                    )
            expected = _expected_rank(schedule, action)
            if expected != rank:
                raise _offending(
                    rank, index, action, f"belongs on rank {expected}, not rank {rank}"
                )
            key = _key(action)
            if key in seen:
                first_rank, first_index = seen[key]
                raise _offending(
                    rank, index, action, f"duplicate of action {first_index} on rank {first_rank}"
                )
            seen[key] = (rank, index)
    return seen


def _check_complete(schedule: Schedule, seen: dict[_Key, tuple[int, int]]) -> None:
    """Every (microbatch, stage) has one F and either one B or one I plus one W."""
    for rank, rank_actions in enumerate(schedule.actions):
        for index, action in enumerate(rank_actions):
            if not action.is_compute:
                continue
            m, s = action.microbatch, action.stage
            has = {kind: (kind, m, s) in seen for kind in COMPUTE_KINDS}
            if action.kind != "F" and not has["F"]:
                raise _offending(rank, index, action, f"its forward F{m}@s{s} is missing")
            if action.kind == "F" and not (has["B"] or has["I"]):
                raise _offending(
                    rank,
                    index,
                    action,
                    f"its backward is missing (expected B{m}@s{s}, or I{m}@s{s} and "
                    f"W{m}@s{s}, on rank {rank})",
                )
            if has["B"] and (has["I"] or has["W"]):
                raise _offending(
                    rank,
                    index,
                    action,
                    f"microbatch {m} on stage {s} has both a full backward B and a split "
                    f"one (I/W); use one or the other",
                )
            if action.kind == "I" and not has["W"]:
                raise _offending(
                    rank, index, action, f"its weight-gradient pass W{m}@s{s} is missing"
                )
            if action.kind == "W" and not has["I"]:
                raise _offending(
                    rank, index, action, f"its input-gradient pass I{m}@s{s} is missing"
                )
    for rank in range(schedule.pp):
        for s in schedule.stages_of(rank):
            for m in range(schedule.microbatches):
                if ("F", m, s) not in seen:
                    raise ScheduleError(
                        f"rank {rank}: F{m}@s{s} is missing (every microbatch needs a forward "
                        f"and a backward on every stage)"
                    )


_OTHER_HALF = {"SEND_F": "RECV_F", "RECV_F": "SEND_F", "SEND_B": "RECV_B", "RECV_B": "SEND_B"}


def _matching(action: Action) -> Action:
    """The other half of a SEND/RECV pair."""
    return Action(_OTHER_HALF[action.kind], action.microbatch, action.stage)


def _check_matching(schedule: Schedule, seen: dict[_Key, tuple[int, int]]) -> None:
    """Every SEND has its RECV on the peer rank and vice versa."""
    for rank, rank_actions in enumerate(schedule.actions):
        for index, action in enumerate(rank_actions):
            kind = _OTHER_HALF.get(action.kind)
            if kind is not None and (kind, action.microbatch, action.stage) not in seen:
                other = _matching(action)
                raise _offending(
                    rank,
                    index,
                    action,
                    f"no matching {other} on rank {_expected_rank(schedule, other)}",
                )


def _check_local_order(schedule: Schedule) -> None:
    """On each rank, every action's inputs were computed or received earlier on that rank."""
    last = schedule.num_stages - 1
    for rank, rank_actions in enumerate(schedule.actions):
        done: set[_Key] = set()
        for index, action in enumerate(rank_actions):
            m, s, kind = action.microbatch, action.stage, action.kind
            needs: list[tuple[_Key, ...]] = []  # each entry: any one of these must be done
            if kind == "F" and s > 0:
                local = schedule.stage_rank(s - 1) == rank
                needs.append((("F", m, s - 1),) if local else (("RECV_F", m, s - 1),))
            elif kind in _BACKWARD_KINDS:
                needs.append((("F", m, s),))
                if s < last:
                    if schedule.stage_rank(s + 1) == rank:
                        needs.append((("B", m, s + 1), ("I", m, s + 1)))
                    else:
                        needs.append((("RECV_B", m, s + 1),))
            elif kind == "W":
                needs.append((("I", m, s),))
            elif kind == "SEND_F":
                needs.append((("F", m, s),))
            elif kind == "SEND_B":
                needs.append((("B", m, s), ("I", m, s)))
            for options in needs:
                if not any(option in done for option in options):
                    wanted = " or ".join(str(Action(*option)) for option in options)
                    raise _offending(rank, index, action, f"runs before {wanted} on rank {rank}")
            done.add((kind, m, s))


def check_schedule(schedule: Schedule) -> None:
    """Raise ScheduleError naming the first offending action unless the schedule can run.

    Checks, in this order (the first failing check reports its first offending action in
    rank-major order): actions in range and on their rank, no duplicates; completeness (one F
    and one B, or one I and one W, per microbatch and stage); every SEND matched by a RECV and
    vice versa; on each rank, every action's inputs were computed or received earlier; and a
    replay with non-blocking SENDs and blocking RECVs finishes on every rank (no circular wait).
    """
    _check_sizes(schedule.pp, schedule.microbatches, schedule.virtual_stages)
    if len(schedule.actions) != schedule.pp:
        raise ScheduleError(
            f"schedule {schedule.name!r} has {len(schedule.actions)} rank lists, "
            f"expected one per rank (pp={schedule.pp})"
        )
    seen = _check_actions(schedule)
    _check_complete(schedule, seen)
    _check_matching(schedule, seen)
    _check_local_order(schedule)
    _replay(schedule, lambda action: 0.0)


# ----------------------------------------------------------------------------------------------
# Discrete-event replay

Durations = Mapping[str, float] | Callable[[Action], float]


def unit_durations(f: float = 1.0, b: float = 2.0, w: float | None = None) -> dict[str, float]:
    """Per-kind durations: F=f, B=b; a split backward is I=b-w, W=w with w defaulting to b/2."""
    weight = b / 2 if w is None else w
    return {"F": f, "B": b, "I": b - weight, "W": weight}


def _duration_fn(durations: Durations) -> Callable[[Action], float]:
    if callable(durations):
        return durations
    table = dict(durations)

    def lookup(action: Action) -> float:
        if action.kind in table:
            return float(table[action.kind])
        if action.is_comm:
            return 0.0
        raise ScheduleError(f"no duration given for action kind {action.kind!r} ({action})")

    return lookup


def _replay(
    schedule: Schedule, duration: Callable[[Action], float]
) -> list[list[tuple[Action, float, float]]]:
    """Run every rank's list under "SEND never blocks, RECV blocks until its SEND has run".

    Compute takes `duration(action)` on its rank; a SEND takes no time on its rank and its
    duration is the transfer time until the message is available at the receiver; a RECV ends
    when both its rank and its message are ready. Each rank runs until it blocks, and a SEND wakes
    the rank blocked on it, so the replay is linear in the number of actions. Times depend only
    on the causal order, never on the order ranks are visited here.
    """
    pp = schedule.pp
    position = [0] * pp
    clock = [0.0] * pp
    timeline: list[list[tuple[Action, float, float]]] = [[] for _ in range(pp)]
    arrival: dict[_Key, float] = {}  # keyed by the RECV a message satisfies
    blocked_on: dict[_Key, int] = {}
    ready = deque(range(pp))
    while ready:
        rank = ready.popleft()
        rank_actions = schedule.actions[rank]
        while position[rank] < len(rank_actions):
            action = rank_actions[position[rank]]
            start = clock[rank]
            kind = action.kind
            if kind == "RECV_F" or kind == "RECV_B":
                key = (kind, action.microbatch, action.stage)
                if key not in arrival:
                    blocked_on[key] = rank
                    break
                end = max(start, arrival[key])
            elif kind == "SEND_F" or kind == "SEND_B":
                end = start
                recv = (_OTHER_HALF[kind], action.microbatch, action.stage)
                arrival[recv] = start + duration(action)
                if recv in blocked_on:
                    ready.append(blocked_on.pop(recv))
            else:
                end = start + duration(action)
            timeline[rank].append((action, start, end))
            clock[rank] = end
            position[rank] += 1
    stuck = [r for r in range(pp) if position[r] < len(schedule.actions[r])]
    if stuck:
        raise ScheduleError(_describe_deadlock(schedule, position, stuck[0]))
    return timeline


def _describe_deadlock(schedule: Schedule, position: list[int], first: int) -> str:
    """Follow who-waits-for-whom from the first stuck rank until a rank repeats."""
    parts = []
    visited: set[int] = set()
    rank = first
    while rank not in visited:
        visited.add(rank)
        index = position[rank]
        action = schedule.actions[rank][index]
        send = _matching(action)
        sender = schedule.stage_rank(send.stage)
        sender_state = (
            f"blocked at action {position[sender]} ({schedule.actions[sender][position[sender]]})"
        )
        parts.append(
            f"{_where(rank, index, action)} waits for {send} on rank {sender}, "
            f"which is {sender_state}"
        )
        rank = sender
    return "deadlock (circular wait): " + "; ".join(parts)


def simulate(
    schedule: Schedule,
    durations: Durations | None = None,
    *,
    include_comm: bool = False,
    check: bool = True,
) -> list[list[tuple[Action, float, float]]]:
    """Per rank, (action, start, end) of every compute action, in execution order.

    `durations` maps an action kind to its duration ({"F": 1, "B": 2, "I": 1, "W": 1}, the
    default) or is a function of the Action (per-stage costs). Communication kinds default to 0;
    a SEND's duration is the transfer time before its RECV can complete, and the sender never
    waits for it. All ranks start at time 0. The schedule is checked first unless `check` is
    false (the cost model replays generated schedules, already proven, many times); a schedule
    that deadlocks still raises ScheduleError either way.
    """
    if check:
        check_schedule(schedule)
    timeline = _replay(schedule, _duration_fn(unit_durations() if durations is None else durations))
    if include_comm:
        return timeline
    return [[entry for entry in rank_line if entry[0].is_compute] for rank_line in timeline]


def bubble_fraction(schedule: Schedule, durations: Durations | None = None) -> float:
    """Idle time over total time, averaged over ranks: 1 - Σ busy / (pp · makespan).

    The makespan runs from 0 (every rank starts together) to the last compute end on any rank,
    so a rank that finishes early counts its wait for the step to end as idle, as it would in
    training (the optimizer step waits for every stage).
    """
    timeline = simulate(schedule, durations)
    makespan = max((end for rank_line in timeline for _, _, end in rank_line), default=0.0)
    if makespan <= 0:
        return 0.0
    busy = sum(end - start for rank_line in timeline for _, start, end in rank_line)
    return 1.0 - busy / (schedule.pp * makespan)


def unit_time_bubble(
    schedule: Schedule, f: float = 1.0, b: float = 2.0, w: float | None = None
) -> float:
    """`bubble_fraction` with F=f, B=b and a split backward I=b-w, W=w (w = b/2 by default).

    Each action on a virtual stage takes the given time, so for interleaved schedules a "unit"
    is one chunk; the fraction does not depend on that scale. GPipe and 1F1B give exactly
    (p-1)/(m+p-1) for any f and b.
    """
    return bubble_fraction(schedule, unit_durations(f, b, w))


def textbook_bubble(pp: int, m: int, v: int = 1) -> float:
    """The textbook bubble fraction (idle / makespan): (p-1)/(m+p-1) for v = 1.

    For v > 1 Megatron-LM's interleaving divides the bubble time by v: bubble/ideal = (p-1)/(v·m).
    Expressed as a fraction of the makespan, like `bubble_fraction`, that is (p-1)/(v·m+p-1),
    which is what is returned (and equals (p-1)/(m+p-1) at v = 1).
    """
    _check_sizes(pp, m, v)
    return (pp - 1) / (v * m + pp - 1)


def peak_in_flight(schedule: Schedule) -> list[int]:
    """Per rank, the most (microbatch, stage) pairs whose F ran there and whose B/I has not.

    With v = 1 this counts microbatches whose activations the rank holds (1F1B: pp - rank at most;
    GPipe: m). With v > 1 each unit is one chunk's activations, 1/v of the rank's layers.
    """
    peaks = []
    for rank_actions in schedule.actions:
        live = peak = 0
        for action in rank_actions:
            if action.kind == "F":
                live += 1
                peak = max(peak, live)
            elif action.kind in _BACKWARD_KINDS:
                live -= 1
        peaks.append(peak)
    return peaks
