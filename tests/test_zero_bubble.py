"""ZB-H2, ZB-V and DualPipeV: complete, deadlock-free, and the papers' bubbles and memory.

Pure Python, no MPI. Times are unit times per (virtual) stage: F = I = W = 1, i.e.
`unit_time_bubble(s, 1, 2, 1)`; on the V schedules a unit is one chunk, half a rank's layers.
"""

from __future__ import annotations

import pytest

from parallel.schedules import (
    Action,
    Schedule,
    ScheduleError,
    check_schedule,
    insert_communication,
    one_f_one_b,
    peak_in_flight,
    simulate,
    unit_durations,
    unit_time_bubble,
    v_placement,
    zb_h1,
)
from parallel.zero_bubble import dualpipev, dualpipev_idle, steady_state_bubble, zb_h2, zb_v

PPS = (1, 2, 3, 4, 8)


def microbatch_grid(pp: int, least: int = 1) -> list[int]:
    """Below, at and above pp, the threshold 2·pp − 1 for a zero bubble, and a long run."""
    return sorted(m for m in {1, 2, pp, 2 * pp - 1, 2 * pp, 2 * pp + 1, 4 * pp, 32} if m >= least)


def idle_per_rank(schedule: Schedule, f: float = 1, b: float = 2, w: float = 1) -> list[float]:
    """Makespan minus busy time, per rank, for one step."""
    timeline = simulate(schedule, unit_durations(f, b, w))
    makespan = max(row[-1][2] for row in timeline if row)
    return [makespan - sum(end - start for _, start, end in row) for row in timeline]


# ---------------------------------------------------------------------------------------------
# Every size builds, checks, and has the shape the wiring expects


@pytest.mark.parametrize("pp", PPS)
def test_zb_h2_builds_and_checks(pp: int) -> None:
    for m in microbatch_grid(pp):
        schedule = zb_h2(pp, m)
        assert (schedule.name, schedule.pp, schedule.microbatches) == ("zb-h2", pp, m)
        assert schedule.virtual_stages == 1
        assert schedule.placement is None  # one stage per rank, like 1F1B and ZB-H1
        check_schedule(schedule)


@pytest.mark.parametrize("pp", PPS)
@pytest.mark.parametrize("build", [zb_v, dualpipev])
def test_v_schedules_build_and_check(build, pp: int) -> None:
    least = 2 * pp if build is dualpipev else 1
    for m in microbatch_grid(pp, least):
        schedule = build(pp, m)
        assert (schedule.pp, schedule.microbatches, schedule.virtual_stages) == (pp, m, 2)
        assert schedule.name == build.__name__.replace("_", "-")
        assert schedule.placement == v_placement(pp)
        assert schedule.stages_of(0) == [0, 2 * pp - 1]  # first and last stage share rank 0
        check_schedule(schedule)


@pytest.mark.parametrize("build", [zb_h2, zb_v, dualpipev])
def test_every_backward_is_split_or_full_once(build) -> None:
    schedule = build(4, 8)
    for rank, actions in enumerate(schedule.compute_only()):
        kinds = [a.kind for a in actions]
        per_stage = len(schedule.stages_of(rank)) * 8
        assert kinds.count("F") == per_stage
        assert kinds.count("I") == kinds.count("W")
        assert kinds.count("B") + kinds.count("I") == per_stage
    if build is not dualpipev:  # the list scheduler always splits
        assert all(a.kind != "B" for row in schedule.actions for a in row)


# ---------------------------------------------------------------------------------------------
# ZB-H2


@pytest.mark.parametrize("pp", PPS)
def test_zb_h2_is_a_parallelogram_with_zero_steady_bubble(pp: int) -> None:
    for m in microbatch_grid(pp):
        schedule = zb_h2(pp, m)
        if m >= 2 * pp - 1:
            # Qi et al.: zero bubble for F = I = W once the optimizer step no longer syncs.
            assert steady_state_bubble(schedule) == 0.0
            spans = [row[-1][2] - row[0][1] for row in simulate(schedule)]
            assert spans == [3.0 * m] * pp
        one_step = unit_time_bubble(schedule, 1, 2, 1)
        if m >= pp:
            # One isolated step: rank pp-1 waits pp-1 forwards, a floor every schedule shares.
            assert one_step == pytest.approx((pp - 1) / (3 * m + pp - 1), abs=1e-12)
        else:  # too few microbatches for more forwards in flight: ZB-H1's order and bubble
            assert one_step == pytest.approx(unit_time_bubble(zb_h1(pp, m), 1, 2, 1), abs=1e-12)


@pytest.mark.parametrize("pp", PPS)
def test_zb_h2_holds_up_to_2p_minus_1_activations(pp: int) -> None:
    for m in microbatch_grid(pp):
        # Qi et al.: (2p - 1)·M_B at the first stage, two fewer on each later one.
        assert peak_in_flight(zb_h2(pp, m)) == [min(2 * (pp - r) - 1, m) for r in range(pp)]


def test_zb_h2_warm_up_runs_forwards_until_the_first_gradient() -> None:
    first = zb_h2(4, 8).compute_only()[0]
    assert [str(a) for a in first[:8]] == [f"F{i}@s0" for i in range(7)] + ["I0@s0"]


@pytest.mark.parametrize("pp", [2, 4, 8])
@pytest.mark.parametrize("rounds", [2, 4])
def test_zb_h2_beats_zb_h1_beats_1f1b(pp: int, rounds: int) -> None:
    m = pp * rounds
    h2, h1, base = zb_h2(pp, m), zb_h1(pp, m), one_f_one_b(pp, m)
    # Steady state (steps overlap): only ZB-H2's parallelogram tiles without a gap.
    assert steady_state_bubble(h2) == 0.0 < steady_state_bubble(h1) < steady_state_bubble(base)
    # One isolated step: ZB-H1 already sits on the floor, so ZB-H2 can only tie it.
    assert unit_time_bubble(h2, 1, 2, 1) == pytest.approx(unit_time_bubble(h1, 1, 2, 1))
    assert unit_time_bubble(h1, 1, 2, 1) < unit_time_bubble(base, 1, 2, 1)


def test_zb_h2_below_the_threshold_is_no_worse_than_zb_h1() -> None:
    for pp in (2, 4, 8):
        m = pp  # too few microbatches to fill the 2·pp − 1 warm-up
        assert steady_state_bubble(zb_h2(pp, m)) <= steady_state_bubble(zb_h1(pp, m))
        assert steady_state_bubble(zb_h2(pp, m)) > 0.0


# ---------------------------------------------------------------------------------------------
# ZB-V


@pytest.mark.parametrize("pp", PPS)
def test_zb_v_has_zero_steady_bubble_and_half_the_ramp(pp: int) -> None:
    for m in microbatch_grid(pp):
        schedule = zb_v(pp, m)
        if m >= 2 * pp - 1:
            assert steady_state_bubble(schedule) == 0.0
        if m >= pp:
            # One isolated step: the ramp-up is pp - 1 chunk forwards, half ZB-H2's idle time.
            floor = (pp - 1) / (6 * m + pp - 1)
            assert unit_time_bubble(schedule, 1, 2, 1) == pytest.approx(floor, abs=1e-12)
        if pp > 1:
            assert unit_time_bubble(schedule, 1, 2, 1) < unit_time_bubble(zb_h2(pp, m), 1, 2, 1)


@pytest.mark.parametrize("pp", PPS)
def test_zb_v_memory_is_1f1b_on_every_rank(pp: int) -> None:
    for m in microbatch_grid(pp):
        peaks = peak_in_flight(zb_v(pp, m))
        # Counted in chunks: 2·pp chunks are pp full stages, what 1F1B holds on rank 0.
        assert peaks == [min(2 * pp, m + 1 + r, 2 * m) for r in range(pp)]
        assert max(peaks) <= 2 * max(peak_in_flight(one_f_one_b(pp, m)))
        if m >= 2 * pp - 1:
            assert peaks == [2 * pp] * pp


def test_zb_v_exchanges_nothing_at_the_turn() -> None:
    schedule = zb_v(4, 8)
    messages = {(a.kind, a.stage) for row in schedule.actions for a in row if a.is_comm}
    assert ("SEND_F", 3) not in messages and ("SEND_B", 4) not in messages
    assert ("SEND_F", 2) in messages and ("SEND_B", 7) in messages


# ---------------------------------------------------------------------------------------------
# DualPipeV


@pytest.mark.parametrize("pp", PPS)
def test_dualpipev_idles_the_published_bubble(pp: int) -> None:
    for m in microbatch_grid(pp, 2 * pp):
        schedule = dualpipev(pp, m)
        # DeepSeek: (PP/2 - 1)(F&B + B - 3W), PP = 2·pp stages, F&B = F + B, per-chunk times.
        published = dualpipev_idle(pp)
        assert published == 2 * (pp - 1)
        assert idle_per_rank(schedule) == [published] * pp
        fraction = published / (6 * m + published)
        assert unit_time_bubble(schedule, 1, 2, 1) == pytest.approx(fraction, abs=1e-12)


@pytest.mark.parametrize(("f", "b", "w"), [(2, 4, 2), (2, 3, 1), (3, 3.5, 0.5)])
def test_dualpipev_formula_holds_when_forward_equals_input_gradient(f, b, w) -> None:
    for pp in (2, 3, 4):
        assert idle_per_rank(dualpipev(pp, 3 * pp), f, b, w) == [dualpipev_idle(pp, f, b, w)] * pp


@pytest.mark.parametrize("pp", PPS)
def test_dualpipev_holds_pp_plus_one_chunks(pp: int) -> None:
    for m in microbatch_grid(pp, 2 * pp):
        # DeepSeek's README: PP + 1 activations per device, PP = 2·pp stages, in chunks.
        assert peak_in_flight(dualpipev(pp, m)) == [2 * pp + 1] * pp


def test_dualpipev_step_order_on_the_first_and_last_rank() -> None:
    first, last = (dualpipev(2, 4).compute_only()[r] for r in (0, 1))
    assert " ".join(map(str, first)) == (
        "F0@s0 F1@s0 F2@s0 F0@s3 I0@s3 W0@s3 F1@s3 F3@s0 B1@s3 F2@s3 B0@s0 "
        "B2@s3 F3@s3 B1@s0 B3@s3 I2@s0 W2@s0 I3@s0 W3@s0"
    )
    assert " ".join(map(str, last)) == (
        "F0@s1 F0@s2 F1@s1 F1@s2 F2@s1 B0@s2 F2@s2 B0@s1 F3@s1 B1@s2 F3@s2 B1@s1 "
        "B2@s2 B2@s1 I3@s2 I3@s1 W3@s2 W3@s1"
    )


def test_dualpipev_pair_exchanges_its_messages_at_its_edges() -> None:
    rank1 = [str(a) for a in dualpipev(4, 8).actions[1]]
    # F6@s1 overlapped with B2@s6: receive both, compute both, then send both, as DualPipe does.
    start = rank1.index("F6@s1") - 2
    assert rank1[start : start + 6] == [
        "RECV_F6@s0",
        "RECV_B2@s7",
        "F6@s1",
        "B2@s6",
        "SEND_F6@s1",
        "SEND_B2@s6",
    ]
    # Sending the forward's output mid-pair instead would idle only pp - 1: the pair would no
    # longer cost F + B on the critical path.
    schedule = dualpipev(2, 4)
    plain = insert_communication(schedule.compute_only(), 2, 2, schedule.placement)
    eager = Schedule("eager", 2, 4, 2, plain, schedule.placement)
    check_schedule(eager)
    assert idle_per_rank(eager) == [1.0, 1.0]


# ---------------------------------------------------------------------------------------------
# Sizes that cannot be built


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: dualpipev(4, 7), "dualpipev needs microbatches >= 2·pp"),
        (lambda: dualpipev(2, 1), "got microbatches=1, pp=2"),
        (lambda: zb_h2(0, 4), "pp must be a positive integer, got 0"),
        (lambda: zb_v(2, True), "microbatches must be a positive integer, got True"),
        (lambda: dualpipev(-1, 4), "pp must be a positive integer, got -1"),
    ],
)
def test_unbuildable_sizes_are_one_clear_line(call, message: str) -> None:
    with pytest.raises(ScheduleError) as error:
        call()
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_steady_state_bubble_without_a_pipeline() -> None:
    # One stage, one microbatch: nothing to overlap, nothing idle.
    schedule = Schedule("one", 1, 1, 1, [[Action("F", 0, 0), Action("B", 0, 0)]])
    assert steady_state_bubble(schedule) == 0.0
