"""Zero-bubble pipeline schedules as data: ZB-H2 and ZB-V (Qi et al.) and DualPipeV (DeepSeek).

All three split the backward pass into I (input gradient, on the critical path) and W (weight
gradient, free to move), and use the W passes to fill the time a rank would otherwise wait.

* ZB-H2 ("Zero Bubble Pipeline Parallelism", Qi et al. 2023, handcrafted schedule 2): one stage
  per rank; rank r may keep up to 2·pp − 1 microbatches in flight, so the warm-up runs forwards
  until the first gradient arrives and the pipeline becomes a parallelogram.
* ZB-V (the same paper, newer version): two stages per rank placed in a V (`v_placement`), at most
  2·pp chunk activations in flight per rank (the activation memory of 1F1B's rank 0).
* DualPipeV (DeepSeek's DualPipe repository, the "cut-in-half" V form of DualPipe): the same V,
  with DeepSeek's fixed step order, in which the forward of one microbatch and the backward of
  another run as one overlapped unit "F&B".

ZB-H2 and ZB-V come from one greedy list scheduler over unit times F = I = W (the papers'
assumption): whenever a rank is free it runs a ready input-gradient pass I, else a ready forward
if the rank holds fewer activations than its cap, else its oldest pending W. DualPipeV follows
DeepSeek's eight steps literally.

Two bubble measures matter here, and they differ:

* `unit_time_bubble` (schedules.py) replays one step from time 0 to the last compute end. Rank
  pp − 1 cannot start before pp − 1 forwards have run upstream and every rank has the same work,
  so no schedule gets below (pp − 1)/(3m + pp − 1) on one stage per rank or (pp − 1)/(6m + pp − 1)
  on a V (chunk units). From m = pp on, ZB-H1 already reaches the first floor, ZB-H2 ties it and
  ZB-V reaches the second.
* `steady_state_bubble` (here) is the bubble of the papers' "zero": with the optimizer step's
  synchronization bypassed (Qi et al.'s post-validation), a rank starts the next step as soon as
  its own part of this one is done, so what counts is the idle time inside each rank's span.
  ZB-H2 and ZB-V make every span equal (the parallelogram) and reach exactly 0 from
  m = 2·pp − 1 microbatches on.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from parallel.schedules import (
    Action,
    Durations,
    Placement,
    Schedule,
    ScheduleError,
    insert_communication,
    interleaved_placement,
    simulate,
    unit_durations,
    v_placement,
)


def _check_positive(pp: Any, m: Any) -> None:
    for label, value in (("pp", pp), ("microbatches", m)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ScheduleError(f"{label} must be a positive integer, got {value!r}")


# ----------------------------------------------------------------------------------------------
# The greedy list scheduler behind ZB-H2 and ZB-V


def _list_schedule(
    name: str, pp: int, m: int, placement: Placement, cap: int
) -> list[list[Action]]:
    """Per-rank compute orders from a unit-time list scheduler (F = I = W = 1).

    At every tick each rank picks one action: a ready I (the critical path: the gradient chain
    must never wait), else a ready F while it holds fewer than `cap` activations (the memory
    budget that decides how far the warm-up runs ahead), else its oldest pending W (off the
    critical path, so it fills whatever gap is left). Ties go to the smaller microbatch for I and
    to the later stage for F, which finishes microbatches and frees activations sooner.
    """
    stages = len(placement)
    last = stages - 1
    held = [[s for s in range(stages) if placement[s] == r] for r in range(pp)]
    forward_end: list[list[int | None]] = [[None] * m for _ in range(stages)]
    input_end: list[list[int | None]] = [[None] * m for _ in range(stages)]
    next_forward = [0] * stages
    next_input = [0] * stages
    pending_w: list[deque[tuple[int, int]]] = [deque() for _ in range(pp)]
    live = [0] * pp
    orders: list[list[Action]] = [[] for _ in range(pp)]

    def done_by(end: int | None, t: int) -> bool:
        return end is not None and end <= t

    remaining = 3 * m * stages
    t = 0
    while remaining:
        started = 0
        for r in range(pp):
            ready_i = [
                (next_input[s], s)
                for s in held[r]
                if next_input[s] < m
                and done_by(forward_end[s][next_input[s]], t)
                and (s == last or done_by(input_end[s + 1][next_input[s]], t))
            ]
            ready_f = [
                (next_forward[s], s)
                for s in held[r]
                if next_forward[s] < m
                and (s == 0 or done_by(forward_end[s - 1][next_forward[s]], t))
            ]
            if ready_i:
                i, s = min(ready_i, key=lambda item: (item[0], -item[1]))
                action = Action("I", i, s)
                input_end[s][i] = t + 1
                next_input[s] += 1
                live[r] -= 1
                pending_w[r].append((i, s))
            elif ready_f and live[r] < cap:
                i, s = min(ready_f, key=lambda item: (-item[1], item[0]))
                action = Action("F", i, s)
                forward_end[s][i] = t + 1
                next_forward[s] += 1
                live[r] += 1
            elif pending_w[r]:
                i, s = pending_w[r].popleft()
                action = Action("W", i, s)
            else:
                continue
            orders[r].append(action)
            started += 1
        if not started:  # nothing ran and nothing is running: nothing ever will
            raise ScheduleError(f"{name}: the list scheduler stalled at tick {t} (pp={pp}, m={m})")
        remaining -= started
        t += 1
    return orders


def zb_h2(pp: int, m: int) -> Schedule:
    """ZB-H2 (Qi et al. 2023): zero bubble in the steady state for twice 1F1B's activations.

    Rank r may hold 2·pp − 1 activations, so it keeps running forwards until its first gradient
    arrives: in flight at most min(2·(pp − r) − 1, m) on rank r (2·pp − 1 on rank 0, the paper's
    (2p − 1)·M_B). Input-gradient passes go first whenever ready, which lets the gradients of the
    cool-down race up the pipeline while each rank's deferred W passes fill its tail. With
    F = I = W every rank is then busy for exactly 3m from its first forward to its last W (a
    parallelogram): `steady_state_bubble` is 0 from m = 2·pp − 1 on, and the one-step
    `unit_time_bubble` equals ZB-H1's (the floor (pp − 1)/(3m + pp − 1) from m = pp on).
    """
    _check_positive(pp, m)
    compute = _list_schedule("zb-h2", pp, m, interleaved_placement(pp, 1), cap=2 * pp - 1)
    return Schedule("zb-h2", pp, m, 1, insert_communication(compute, pp, 1))


def zb_v(pp: int, m: int) -> Schedule:
    """ZB-V (Qi et al., the paper's newer version): zero bubble for 1F1B's activation memory.

    2·pp stages in a V (rank r holds stages r and 2·pp − 1 − r), and at most 2·pp chunk
    activations in flight per rank, i.e. pp full stages, what 1F1B holds on rank 0; every rank
    reaches it from m = 2·pp − 1 on (min(2·pp, m + 1 + r, 2m) on rank r below that). The V puts
    the first and the last stage on rank 0, so the ramp-up of one half meets the ramp-down of the
    other and, with F = I = W per chunk, every rank is busy for exactly 6m chunk times from its
    first forward to its last W: `steady_state_bubble` is 0 from m = 2·pp − 1 on; from m = pp on
    the one-step `unit_time_bubble` is the V's floor (pp − 1)/(6m + pp − 1), half ZB-H2's idle.
    """
    _check_positive(pp, m)
    placement = v_placement(pp)
    compute = _list_schedule("zb-v", pp, m, placement, cap=2 * pp)
    return Schedule("zb-v", pp, m, 2, insert_communication(compute, pp, 2, placement), placement)


# ----------------------------------------------------------------------------------------------
# DualPipeV


def _dualpipev_units(pp: int, m: int, rank: int) -> list[tuple[Action, ...]]:
    """DeepSeek's DualPipeV step order on `rank`, as units: one action, or an F&B pair.

    Phase 0 is the rank's stage on the way down the V (stage r), phase 1 its stage on the way back
    (2·pp − 1 − r); each phase runs its microbatches in order. A backward with DualPipe's
    zero-bubble switch on becomes I, with its W queued and run, oldest first, where DualPipe
    calls its weight step; without it the backward stays one full B.
    """
    stage = (rank, 2 * pp - 1 - rank)
    forwards = [0, 0]
    backwards = [0, 0]
    weights: deque[Action] = deque()
    units: list[tuple[Action, ...]] = []

    def forward(phase: int) -> Action:
        action = Action("F", forwards[phase], stage[phase])
        forwards[phase] += 1
        return action

    def backward(phase: int, split: bool = False) -> Action:
        i = backwards[phase]
        backwards[phase] += 1
        if split:
            weights.append(Action("W", i, stage[phase]))
            return Action("I", i, stage[phase])
        return Action("B", i, stage[phase])

    def one(action: Action) -> None:
        units.append((action,))

    later = pp - rank - 1  # ranks after this one
    # 1. Warm-up: forwards of the first phase, two per later rank.
    for _ in range(2 * later):
        one(forward(0))
    # 2. Forwards alternating down and back: the turn of the V fills.
    for _ in range(rank + 1):
        one(forward(0))
        one(forward(1))
    # 3. The first gradients arrive on phase 1: I, its W right away, and a phase-1 forward.
    for _ in range(later):
        one(backward(1, split=True))
        one(weights.popleft())
        one(forward(1))
    # 4. Steady state: F&B pairs, a forward of one phase overlapped with a backward of the other.
    for i in range(m - 2 * pp + rank + 1):
        if i == 0 and rank == pp - 1:  # DualPipeV runs this first pair unoverlapped
            one(forward(0))
            one(backward(1))
        else:
            units.append((forward(0), backward(1)))
        units.append((forward(1), backward(0)))
    # 5. Forwards run out: a phase-1 backward, then a phase-1 forward paired with a backward.
    for _ in range(later):
        one(backward(1))
        units.append((forward(1), backward(0)))
    # 6. Cool-down: backwards of both phases; the second half splits off its W passes (on odd
    # ranks from the phase-1 backward of the middle iteration, on even ranks from the phase-0 one).
    split = False
    for i in range(rank + 1):
        if i == (rank + 1) // 2 and rank % 2 == 1:
            split = True
        one(backward(1, split))
        if i == (rank + 1) // 2 and rank % 2 == 0:
            split = True
        one(backward(0, split))
    # 7. Deferred W passes fill the waits between the last phase-0 input gradients.
    for _ in range(later):
        one(weights.popleft())
        one(backward(0, split=True))
    # 8. The remaining W passes.
    while weights:
        one(weights.popleft())
    return units


def _pair_messages(units: list[tuple[Action, ...]], with_comm: list[Action]) -> list[Action]:
    """Move the messages of each F&B pair to the pair's edges: both RECVs before it, both SENDs
    after it, as DualPipe's overlapped chunk does (it waits for both inputs, computes both, then
    sends both). `with_comm` is `insert_communication`'s output for the flattened units."""
    groups: list[tuple[list[Action], Action, list[Action]]] = []
    recvs: list[Action] = []
    for action in with_comm:
        if action.kind in ("RECV_F", "RECV_B"):
            recvs.append(action)
        elif action.is_compute:
            groups.append((recvs, action, []))
            recvs = []
        else:  # a SEND follows the compute that produced it
            groups[-1][2].append(action)
    out: list[Action] = []
    position = 0
    for unit in units:
        members = groups[position : position + len(unit)]
        position += len(unit)
        for before, _, _ in members:
            out += before
        out += [compute for _, compute, _ in members]
        for _, _, after in members:
            out += after
    return out


def dualpipev(pp: int, m: int) -> Schedule:
    """DualPipeV (DeepSeek's DualPipe repository): the V of ZB-V with DeepSeek's step order.

    civetta overlaps nothing on a CPU, so an overlapped F&B unit is two consecutive actions, the
    forward then the backward, taking F + B; its messages stay at the unit's edges (both inputs
    received before it, both outputs sent after it), as in DualPipe. With that, every rank idles
    DeepSeek's published (PP/2 − 1)·(F&B + B − 3W) per step, where PP = 2·pp is the number of
    stages (DeepSeek's README counts stages, on PP/2 devices) and F, B, W are per-chunk times: for
    F = I = W = 1 that is 2·(pp − 1) chunk times (`dualpipev_idle`). Every rank holds at most
    PP + 1 = 2·pp + 1 chunk activations, the README's figure (the F&B unit holds its forward's
    activation before its backward frees one). Any pp works (the V always has an even number of
    stages; only bidirectional DualPipe needs an even number of ranks), and DualPipeV needs
    m >= 2·pp microbatches, as DeepSeek's code asserts.
    """
    _check_positive(pp, m)
    if m < 2 * pp:
        raise ScheduleError(
            f"dualpipev needs microbatches >= 2·pp (DeepSeek's DualPipeV asserts it): "
            f"got microbatches={m}, pp={pp}"
        )
    placement = v_placement(pp)
    units = [_dualpipev_units(pp, m, rank) for rank in range(pp)]
    compute = [[action for unit in rank_units for action in unit] for rank_units in units]
    with_comm = insert_communication(compute, pp, 2, placement)
    actions = [_pair_messages(u, c) for u, c in zip(units, with_comm, strict=True)]
    return Schedule("dualpipev", pp, m, 2, actions, placement)


def dualpipev_idle(pp: int, f: float = 1.0, b: float = 2.0, w: float = 1.0) -> float:
    """DeepSeek's published DualPipeV bubble, idle time per rank and step: (PP/2 − 1)·(F&B + B −
    3W) with PP = 2·pp stages, F&B = F + B (no overlap here) and per-chunk times F = f, full
    backward B = b, weight part W = w (the `unit_durations` convention). The replay of `dualpipev`
    matches it exactly when F = I and W <= F (so for F = I = W); other ratios drift from it."""
    return (pp - 1) * ((f + b) + b - 3 * w)


# ----------------------------------------------------------------------------------------------
# Steady-state bubble


def steady_state_bubble(schedule: Schedule, durations: Durations | None = None) -> float:
    """The bubble when consecutive steps overlap: 1 − Σ busy / (pp · P).

    P is the longest span of any rank, from its first compute start to its last compute end.
    Once the optimizer step needs no pipeline-wide synchronization (Qi et al.'s post-validation),
    rank r starts the next step's forwards as soon as its own work is done, so the step repeats
    every P: exactly so for a parallelogram, where every rank's span is the same and each starts
    one forward after its predecessor (ZB-H2, ZB-V), a lower bound otherwise. This is the measure
    under which the zero-bubble papers' "zero" holds; `unit_time_bubble` counts one isolated step,
    ramp-up included. `durations` as for `simulate` (default F=1, B=2, I=W=1).
    """
    timeline = simulate(schedule, unit_durations() if durations is None else durations)
    rows = [row for row in timeline if row]
    if not rows:
        return 0.0
    period = max(row[-1][2] - row[0][1] for row in rows)
    if period <= 0:
        return 0.0
    busy = sum(end - start for row in rows for _, start, end in row)
    return 1.0 - busy / (schedule.pp * period)
