"""The pipeline's share of a step: the bubble and the exposed point-to-point messages, either
replayed from the actual schedule or from closed forms.

The replay (the default of `parallel.cost.projection.CostOptions`) takes the layout's schedule
(a generator's, or a schedule file's: `parallel.schedules.schedule_of`) and runs it through
`parallel.schedules.simulate`, the discrete-event replay the executor's checker uses: every
forward, backward (or input-gradient and weight-gradient half) of every microbatch on every
virtual stage takes that stage's time, and every message takes the p2p time between its SEND and
its RECV. The replay is per pipeline (p ranks), never per GPU: every data-parallel replica and
tensor-parallel rank runs the same one. It is replayed twice, without and with message times, so
the step splits into

    bubble       = makespan without messages - busy time of the busiest device
    exposed p2p  = makespan with messages - makespan without

The closed forms, used when no replay is given (or when the schedule is too long to replay
quickly), with p stages, m microbatches, v virtual stages per device and the slowest device's
t_f, t_b (t_b includes t_W, the weight-gradient part):

    gpipe, 1f1b          (p - 1)·(t_f + t_b)               Huang et al. 2019; Narayanan et al. 2021
    interleaved-1f1b     (p - 1)·(t_f + t_b) / v           Narayanan et al. 2021, §2.2.2
    zb-h1                (p - 1)·(t_f + t_b - 2·t_w)       Qi et al. 2023 ("Zero Bubble"), with
                         t_b = t_B + t_W: deferring the weight gradients W fills the cool-down,
                         leaving (p - 1)·(T_F + T_B - T_W); ≈ (p - 1)·t_f when t_B = t_W.
    zb-h2                as zb-h1                          one step from a synchronised
                         start cannot do better than ZB-H1 (the first forwards must cross the
                         pipeline); the paper's zero bubble holds once steps overlap
                         (`parallel.zero_bubble.steady_state_bubble`), which civetta's
                         optimizer step does not allow.
    zb-v                 (p - 1)·(t_f + t_b - 2·t_w) / 2   ZB-H1's form at the V's per-chunk
                         times: half ZB-H1's idle time.
    dualpipev            (p - 1)·(F&B + B - 3·W)           DeepSeek's (PP/2 - 1)·(F&B + B - 3W)
                         with PP = 2·p stages, per-chunk times and F&B = F + B (a CPU overlaps
                         nothing; `parallel.zero_bubble.dualpipev_idle`).
    exposed p2p          2·(m·v + p - 1) messages on the critical path

Times are in seconds; as a fraction, the bubble is taken of the whole step time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from parallel.schedules import V_SHAPED, Action, Schedule, make_schedule, simulate, v_placement

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", "zb-v", "dualpipev")

# Above this many actions per replay the closed forms are used: the replay is linear in the
# actions but runs in Python (about a microsecond each, twice per projection).
REPLAY_LIMIT = 120_000


@dataclass(frozen=True)
class StageTimes:
    """One microbatch's forward and backward times on one stage (or one device's stages)."""

    forward_s: float
    backward_s: float  # includes recomputation and the weight-gradient part
    weight_grad_s: float  # the part of backward_s that zb-h1 may defer


@dataclass(frozen=True)
class PipelineTimes:
    """What a replay needs: every virtual stage's times, in model order (p·v of them), and the
    time from a SEND to its RECV for one activation or gradient message."""

    stages: tuple[StageTimes, ...]
    p2p_s: float = 0.0

    def device(self, rank: int, placement: tuple[int, ...]) -> StageTimes:
        """The stages of pipeline rank `rank` together (`placement`: each stage's rank)."""
        mine = [t for t, r in zip(self.stages, placement, strict=True) if r == rank]
        return StageTimes(
            sum(s.forward_s for s in mine),
            sum(s.backward_s for s in mine),
            sum(s.weight_grad_s for s in mine),
        )

    def slowest(self, placement: tuple[int, ...]) -> StageTimes:
        devices = [self.device(r, placement) for r in sorted(set(placement))]
        return max(devices, key=lambda t: t.forward_s + t.backward_s)

    def without_messages(self) -> PipelineTimes:
        return PipelineTimes(self.stages, 0.0)


# (schedule, stages, microbatches, virtual_stages, times) -> makespan in seconds; the schedule is
# a generator's name or the built Schedule itself (a file's).
Replay = Callable[[str | Schedule, int, int, int, PipelineTimes], float]


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
    if schedule in ("zb-h1", "zb-h2"):
        return (stages - 1) * max(0.0, tick - 2 * times.weight_grad_s)
    if schedule == "zb-v":  # two chunks per device, each half the device's time
        return (stages - 1) * max(0.0, tick - 2 * times.weight_grad_s) / 2
    from parallel.zero_bubble import dualpipev_idle

    half = StageTimes(times.forward_s / 2, times.backward_s / 2, times.weight_grad_s / 2)
    return max(0.0, dualpipev_idle(stages, half.forward_s, half.backward_s, half.weight_grad_s))


def analytic_p2p(stages: int, microbatches: int, virtual_stages: int, p2p_s: float) -> float:
    """Messages on the critical path: one forward and one backward per tick."""
    if stages == 1:
        return 0.0
    return (microbatches * virtual_stages + stages - 1) * 2 * p2p_s


@lru_cache(maxsize=256)
def cached_schedule(name: str, stages: int, microbatches: int, virtual_stages: int) -> Schedule:
    # Built once per shape: a tuner projects many layouts that share their pipeline shape.
    return make_schedule(name, stages, microbatches, virtual_stages)


def replay_actions(stages: int, microbatches: int, virtual_stages: int) -> int:
    """Upper bound on the actions of one replay: F, B (or I and W), SEND and RECV per
    microbatch and virtual stage."""
    return 6 * stages * microbatches * virtual_stages


def replayed_makespan(
    schedule: str | Schedule,
    stages: int,
    microbatches: int,
    virtual_stages: int,
    times: PipelineTimes,
) -> float:
    """Makespan of the schedule (named, or built) replayed with `times`
    (`parallel.schedules.simulate`)."""
    if isinstance(schedule, Schedule):
        built = schedule
    else:
        built = cached_schedule(schedule, stages, microbatches, virtual_stages)
    forward = [s.forward_s for s in times.stages]
    backward = [s.backward_s for s in times.stages]
    weight = [s.weight_grad_s for s in times.stages]
    # Per action kind, the duration on each virtual stage.
    table = {
        "F": forward,
        "B": backward,
        "I": [b - w for b, w in zip(backward, weight, strict=True)],
        "W": weight,
        "SEND_F": [times.p2p_s] * len(forward),
        "SEND_B": [times.p2p_s] * len(forward),
        "RECV_F": [0.0] * len(forward),
        "RECV_B": [0.0] * len(forward),
    }

    def duration(action: Action) -> float:
        return table[action.kind][action.stage]

    # The generators' schedules are proven by tests/test_schedules.py: no need to check each one.
    timeline = simulate(built, duration, check=False)
    return max((end for rank_line in timeline for _, _, end in rank_line), default=0.0)


def pipeline_time(
    schedule: str | Schedule,
    stages: int,
    microbatches: int,
    virtual_stages: int,
    times: PipelineTimes,
    replay: Replay | None = replayed_makespan,
    placement: tuple[int, ...] | None = None,
) -> tuple[float, float, str]:
    """(bubble seconds, exposed p2p seconds, "replay" | "closed form") of one step. `stages`
    is the pipeline's ranks; `placement` each stage's rank (default interleaved). A built
    schedule from a file has no closed form: it is always replayed."""
    if placement is None:
        named_v = isinstance(schedule, str) and schedule in V_SHAPED
        placement = (
            v_placement(stages) if named_v else tuple(k % stages for k in range(len(times.stages)))
        )
    slowest = times.slowest(placement)
    if stages == 1:
        return 0.0, 0.0, "none"
    too_long = replay_actions(stages, microbatches, virtual_stages) > REPLAY_LIMIT
    named = isinstance(schedule, str) or schedule.name in SCHEDULES
    if named and (replay is None or (too_long and replay is replayed_makespan)):
        name = schedule if isinstance(schedule, str) else schedule.name
        bubble = analytic_bubble(name, stages, microbatches, virtual_stages, slowest)
        p2p = analytic_p2p(stages, microbatches, virtual_stages, times.p2p_s)
        return bubble, p2p, "closed form"
    replay = replay or replayed_makespan  # a file's schedule has no closed form
    idle = replay(schedule, stages, microbatches, virtual_stages, times.without_messages())
    with_messages = replay(schedule, stages, microbatches, virtual_stages, times)
    bubble = max(0.0, idle - busy_time(microbatches, slowest))
    return bubble, max(0.0, with_messages - max(idle, busy_time(microbatches, slowest))), "replay"


def bubble_time(
    schedule: str,
    stages: int,
    microbatches: int,
    virtual_stages: int,
    times: StageTimes,
    replay: Replay | None = None,
) -> float:
    """Idle time a step spends in the pipeline bubble (seconds), every stage of a device taking
    `times` / its stages per device (two for a V) and messages taking no time."""
    v_shaped = schedule in V_SHAPED
    per_device = 2 if v_shaped else virtual_stages
    per_stage = StageTimes(
        times.forward_s / per_device,
        times.backward_s / per_device,
        times.weight_grad_s / per_device,
    )
    uniform = PipelineTimes((per_stage,) * (stages * per_device))
    placement = v_placement(stages) if v_shaped else None
    bubble, _, _ = pipeline_time(
        schedule, stages, microbatches, virtual_stages, uniform, replay, placement
    )
    return bubble


def bubble_fraction_analytic(schedule: str, stages: int, microbatches: int, v: int = 1) -> float:
    """Bubble / step time with t_b = 2·t_f and t_W = t_b / 2, no communication: e.g.
    (p - 1)/(m + p - 1) for 1f1b."""
    times = StageTimes(1.0, 2.0, 1.0)
    bubble = analytic_bubble(schedule, stages, microbatches, v, times)
    return bubble / (busy_time(microbatches, times) + bubble)
