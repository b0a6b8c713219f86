"""The pipeline bubble from per-stage forward and backward times: analytic, with a seam for the
discrete-event replay of a real schedule.

`bubble_time` takes the time of one microbatch through the slowest device (forward, backward,
and the weight-gradient part of backward) and returns the idle time the schedule adds to a step.
When a `replay` callable is given (for `parallel.schedules.simulate` once it lands: it builds the
schedule, replays it with these durations and returns the makespan), the bubble is the replayed
makespan minus the busy time; otherwise the closed forms below are used, with p stages,
m microbatches and v virtual stages per device:

    gpipe, 1f1b          (p - 1)·(t_f + t_b)               Huang et al. 2019; Narayanan et al. 2021
    interleaved-1f1b     (p - 1)·(t_f + t_b) / v           Narayanan et al. 2021, §2.2.2
    zb-h1                (p - 1)·(t_f + t_b - 2·t_w)       Qi et al. 2023 ("Zero Bubble"), with
                         t_b = t_B + t_W: deferring the weight gradients W fills the cool-down,
                         leaving (p - 1)·(T_F + T_B - T_W); ≈ (p - 1)·t_f when t_B = t_W.

Bubble times are in seconds; as a fraction they are taken of the whole step time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1")


@dataclass(frozen=True)
class StageTimes:
    """One microbatch on the slowest pipeline device, all its virtual stages together."""

    forward_s: float
    backward_s: float  # includes recomputation and the weight-gradient part
    weight_grad_s: float  # the part of backward_s that zb-h1 may defer


# (schedule, stages, microbatches, virtual_stages, times) -> makespan in seconds
Replay = Callable[[str, int, int, int, StageTimes], float]


def busy_time(microbatches: int, times: StageTimes) -> float:
    """What one device computes in a step: every microbatch forward and backward once."""
    return microbatches * (times.forward_s + times.backward_s)


def analytic_bubble(
    schedule: str, stages: int, microbatches: int, virtual_stages: int, times: StageTimes
) -> float:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if stages == 1:
        return 0.0
    tick = times.forward_s + times.backward_s
    if schedule in ("gpipe", "1f1b"):
        return (stages - 1) * tick
    if schedule == "interleaved-1f1b":
        return (stages - 1) * tick / virtual_stages
    return (stages - 1) * max(0.0, tick - 2 * times.weight_grad_s)  # zb-h1


def bubble_time(
    schedule: str,
    stages: int,
    microbatches: int,
    virtual_stages: int,
    times: StageTimes,
    replay: Replay | None = None,
) -> float:
    """Idle time a step spends in the pipeline bubble (seconds)."""
    if replay is None or stages == 1:
        return analytic_bubble(schedule, stages, microbatches, virtual_stages, times)
    makespan = replay(schedule, stages, microbatches, virtual_stages, times)
    return max(0.0, makespan - busy_time(microbatches, times))


def bubble_fraction_analytic(schedule: str, stages: int, microbatches: int, v: int = 1) -> float:
    """Bubble / step time with t_b = 2·t_f and t_W = t_b / 2, no communication: e.g.
    (p - 1)/(m + p - 1) for 1f1b."""
    times = StageTimes(1.0, 2.0, 1.0)
    bubble = analytic_bubble(schedule, stages, microbatches, v, times)
    return bubble / (busy_time(microbatches, times) + bubble)
