"""Pipeline schedules as data: generators, checker, replay, bubble, files and the Gantt chart.

No MPI here: a schedule is a list of actions per rank, and the checker's replay (SENDs never
block, RECVs block until their SEND has run) is what the executor's Isend/Recv does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from rich.console import Console

from launch.gantt import render_gantt, schedule_command
from launch.schedule_files import load_schedule, save_schedule
from parallel.schedules import (
    ACTION_KINDS,
    Action,
    Schedule,
    ScheduleError,
    check_schedule,
    gpipe,
    insert_communication,
    interleaved_1f1b,
    make_schedule,
    one_f_one_b,
    peak_in_flight,
    simulate,
    textbook_bubble,
    unit_time_bubble,
    zb_h1,
)

NAMES = ("gpipe", "1f1b", "zb-h1", "interleaved-1f1b")


def grid_microbatches(pp: int, name: str) -> list[int]:
    """A representative set of microbatch counts: below, at and above pp, and the maximum."""
    if name == "interleaved-1f1b":
        return sorted({pp, 2 * pp, (32 // pp) * pp})
    return sorted({1, 2, max(pp - 1, 1), pp, pp + 1, 2 * pp, 32})


def compute(text: str) -> list[Action]:
    return [Action.parse(item) for item in text.split()]


# ---------------------------------------------------------------------------------------------
# Actions


@pytest.mark.parametrize("kind", ACTION_KINDS)
def test_action_string_round_trip(kind: str) -> None:
    action = Action(kind, 12, 3)
    assert str(action) == f"{kind}12@s3"
    assert Action.parse(str(action)) == action
    assert Action.parse(f"  {action} ") == action


@pytest.mark.parametrize("text", ["X1@s0", "F@s0", "F1s0", "F1@0", "f1@s0", "F-1@s0", ""])
def test_action_parse_rejects_garbage(text: str) -> None:
    with pytest.raises(ScheduleError, match="cannot parse action"):
        Action.parse(text)


def test_action_rejects_bad_fields() -> None:
    with pytest.raises(ScheduleError, match="unknown action kind 'Z'"):
        Action("Z", 0, 0)
    with pytest.raises(ScheduleError, match="microbatch must be a non-negative integer"):
        Action("F", -1, 0)


def test_stage_rank_is_interleaved() -> None:
    schedule = interleaved_1f1b(4, 8, 3)
    assert schedule.num_stages == 12
    assert [schedule.stage_rank(s) for s in range(12)] == [0, 1, 2, 3] * 3
    assert schedule.stages_of(1) == [1, 5, 9]


# ---------------------------------------------------------------------------------------------
# Generators and the checker on generated schedules


@pytest.mark.parametrize("pp", range(1, 9))
@pytest.mark.parametrize("name", NAMES)
def test_checker_accepts_every_generated_schedule(name: str, pp: int) -> None:
    for m in grid_microbatches(pp, name):
        for v in range(1, 5) if name == "interleaved-1f1b" else (1,):
            schedule = make_schedule(name, pp, m, v)
            assert (schedule.name, schedule.pp, schedule.microbatches) == (name, pp, m)
            assert schedule.virtual_stages == v and len(schedule.actions) == pp
            check_schedule(schedule)


def test_one_f_one_b_order_on_each_rank() -> None:
    schedule = one_f_one_b(3, 4)
    assert [str(a) for a in schedule.compute_only()[0]] == (
        ["F0@s0", "F1@s0", "F2@s0", "B0@s0", "F3@s0", "B1@s0", "B2@s0", "B3@s0"]
    )
    assert [str(a) for a in schedule.compute_only()[2]] == (
        ["F0@s2", "B0@s2", "F1@s2", "B1@s2", "F2@s2", "B2@s2", "F3@s2", "B3@s2"]
    )
    # Communication sits right around the compute that needs or produces it.
    assert [str(a) for a in schedule.actions[1][:4]] == [
        "RECV_F0@s0",
        "F0@s1",
        "SEND_F0@s1",
        "RECV_F1@s0",
    ]


def test_zb_h1_delays_weight_passes_on_later_ranks() -> None:
    schedule = zb_h1(4, 8)
    for rank, actions in enumerate(schedule.compute_only()):
        kinds = [a.kind for a in actions]
        assert "B" not in kinds and kinds.count("I") == kinds.count("W") == 8
        # Rank r holds its first r weight passes back: they run last, after the W that
        # follows the final input-gradient pass.
        last_i = max(i for i, kind in enumerate(kinds) if kind == "I")
        assert kinds[last_i + 1 :] == ["W"] * (rank + 1)


def test_pp_one_with_virtual_stages_has_no_communication() -> None:
    schedule = interleaved_1f1b(1, 3, 2)
    assert not schedule.has_communication
    check_schedule(schedule)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: interleaved_1f1b(4, 6, 2), "microbatches divisible by pp: got microbatches=6"),
        (lambda: make_schedule("1f1b", 4, 8, 2), "virtual_stages must be 1 for schedule '1f1b'"),
        (lambda: make_schedule("pipedream", 4, 8), "unknown pipeline schedule 'pipedream'"),
        (lambda: make_schedule("gpipe", 0, 8), "pp must be a positive integer, got 0"),
        (lambda: gpipe(2, True), "microbatches must be a positive integer, got True"),
    ],
)
def test_generators_reject_bad_arguments(call, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        call()


# ---------------------------------------------------------------------------------------------
# The checker on broken schedules


def broken(pp: int, m: int, ranks: list[str], comms: bool = True) -> Schedule:
    compute_only = [compute(text) for text in ranks]
    actions = insert_communication(compute_only, pp, 1) if comms else compute_only
    return Schedule("broken", pp, m, 1, actions)


def test_rejects_missing_backward() -> None:
    schedule = broken(2, 2, ["F0@s0 F1@s0 B0@s0 B1@s0", "F0@s1 B0@s1 F1@s1"])
    with pytest.raises(ScheduleError) as error:
        check_schedule(schedule)
    assert str(error.value).startswith("rank 1, action 5 (F1@s1): its backward is missing")


def test_rejects_backward_before_forward() -> None:
    schedule = broken(2, 1, ["F0@s0 B0@s0", "B0@s1 F0@s1"])
    with pytest.raises(ScheduleError) as error:
        check_schedule(schedule)
    assert str(error.value) == "rank 1, action 0 (B0@s1): runs before F0@s1 on rank 1"


def test_rejects_recv_without_send() -> None:
    schedule = one_f_one_b(2, 2)
    schedule.actions[0].remove(Action("SEND_F", 1, 0))
    with pytest.raises(ScheduleError) as error:
        check_schedule(schedule)
    assert str(error.value) == "rank 1, action 4 (RECV_F1@s0): no matching SEND_F1@s0 on rank 0"


def test_rejects_send_without_recv() -> None:
    schedule = one_f_one_b(2, 2)
    schedule.actions[0].remove(Action("RECV_B", 0, 1))
    with pytest.raises(ScheduleError, match=r"\(SEND_B0@s1\): no matching RECV_B0@s1 on rank 0"):
        check_schedule(schedule)


def test_rejects_circular_wait() -> None:
    # Each rank first waits for a message the other sends only after its own wait.
    actions = [
        compute("RECV_B0@s1 F0@s0 SEND_F0@s0 B0@s0"),
        compute("RECV_F0@s0 F0@s1 B0@s1 SEND_B0@s1"),
    ]
    with pytest.raises(ScheduleError) as error:
        check_schedule(Schedule("cycle", 2, 1, 1, actions))
    message = str(error.value)
    assert message.startswith("deadlock (circular wait): rank 0, action 0 (RECV_B0@s1) waits for")
    assert "rank 1, action 0 (RECV_F0@s0) waits for SEND_F0@s0 on rank 0" in message


def test_rejects_deadlock_deep_in_a_long_schedule() -> None:
    # Rank 0 waits for microbatch 3's gradient before sending microbatch 3's activation.
    schedule = gpipe(2, 4)
    rank0 = schedule.actions[0]
    rank0.remove(Action("RECV_B", 3, 1))
    rank0.insert(rank0.index(Action("F", 3, 0)), Action("RECV_B", 3, 1))
    with pytest.raises(ScheduleError, match=r"circular wait\): rank 0, action 6 \(RECV_B3@s1\)"):
        check_schedule(schedule)


@pytest.mark.parametrize(
    ("ranks", "message"),
    [
        (
            ["F0@s0 B0@s0 B0@s0", "F0@s1 B0@s1"],
            "rank 0, action 4 (RECV_B0@s1): duplicate of action 2",
        ),
        (["F0@s0 B0@s0", "F0@s1 B0@s1 F0@s0"], "(F0@s0): belongs on rank 0, not rank 1"),
        (["F0@s0 B0@s0", "F0@s1 B0@s1 F1@s1"], "(RECV_F1@s0): microbatch 1 out of range"),
        (["F0@s0 I0@s0", "F0@s1 B0@s1"], "(I0@s0): its weight-gradient pass W0@s0 is missing"),
        (["F0@s0 B0@s0 W0@s0", "F0@s1 B0@s1"], "both a full backward B and a split one"),
        (["F0@s0 B0@s0", "B0@s1"], "rank 1, action 0 (B0@s1): its forward F0@s1 is missing"),
        (["F0@s0 B0@s0", ""], "rank 1: F0@s1 is missing"),
        (["F0@s0 W0@s0 I0@s0", "F0@s1 B0@s1"], "(W0@s0): runs before I0@s0 on rank 0"),
    ],
)
def test_rejects_other_mistakes(ranks: list[str], message: str) -> None:
    with pytest.raises(ScheduleError) as error:
        check_schedule(broken(2, 1, ranks))
    assert message in str(error.value)


def test_rejects_communication_within_one_rank() -> None:
    actions = [compute("F0@s0 SEND_F0@s0 RECV_F0@s0 F0@s1 B0@s1 B0@s0")]
    with pytest.raises(ScheduleError, match=r"\(SEND_F0@s0\): stages 0 and 1 both live on rank 0"):
        check_schedule(Schedule("local", 1, 1, 2, actions))


def test_insert_communication_rejects_communication() -> None:
    with pytest.raises(ScheduleError, match=r"rank 0, action 1 \(SEND_F0@s0\): .*compute actions"):
        insert_communication([compute("F0@s0 SEND_F0@s0"), []], 2, 1)


# ---------------------------------------------------------------------------------------------
# Memory, replay and bubble


@pytest.mark.parametrize("pp", [1, 2, 4, 8])
@pytest.mark.parametrize("m", [1, 3, 8, 32])
def test_peak_in_flight(pp: int, m: int) -> None:
    expected_1f1b = [min(pp - rank, m) for rank in range(pp)]
    assert peak_in_flight(one_f_one_b(pp, m)) == expected_1f1b
    assert all(peak <= pp for peak in expected_1f1b)
    assert peak_in_flight(gpipe(pp, m)) == [m] * pp
    assert peak_in_flight(zb_h1(pp, m)) == expected_1f1b


def test_simulate_gives_start_and_end_of_every_compute_action() -> None:
    timeline = simulate(one_f_one_b(2, 2))
    as_text = [[(str(a), start, end) for a, start, end in row] for row in timeline]
    assert as_text == [
        [("F0@s0", 0, 1), ("F1@s0", 1, 2), ("B0@s0", 4, 6), ("B1@s0", 7, 9)],
        [("F0@s1", 1, 2), ("B0@s1", 2, 4), ("F1@s1", 4, 5), ("B1@s1", 5, 7)],
    ]


def test_simulate_takes_per_action_durations_and_transfer_times() -> None:
    def duration(action: Action) -> float:
        if action.kind.startswith("SEND"):
            return 0.5  # transfer time: delays the receiver, not the sender
        return {"F": 1.0, "B": 2.0}[action.kind] * (3.0 if action.stage == 1 else 1.0)

    timeline = simulate(gpipe(2, 1), duration, include_comm=True)
    assert [(str(a), s, e) for a, s, e in timeline[0]] == [
        ("F0@s0", 0, 1),
        ("SEND_F0@s0", 1, 1),
        ("RECV_B0@s1", 1, 11.0),  # B0@s1 ends at 4.5 + 6, its gradient lands 0.5 later
        ("B0@s0", 11.0, 13.0),
    ]
    assert [(str(a), s, e) for a, s, e in timeline[1]] == [
        ("RECV_F0@s0", 0, 1.5),
        ("F0@s1", 1.5, 4.5),
        ("B0@s1", 4.5, 10.5),
        ("SEND_B0@s1", 10.5, 10.5),
    ]


@pytest.mark.parametrize("pp", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 2, 4, 7, 8, 32])
def test_gpipe_and_1f1b_bubble_is_the_textbook_value(pp: int, m: int) -> None:
    expected = (pp - 1) / (m + pp - 1)
    assert textbook_bubble(pp, m) == expected
    for schedule in (gpipe(pp, m), one_f_one_b(pp, m)):
        # The bubble is (p-1)(f+b) per rank for any f, b, so the fraction never depends on them.
        for f, b in ((1.0, 2.0), (1.0, 1.0), (2.0, 3.0)):
            assert unit_time_bubble(schedule, f, b) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("pp", [2, 4, 8])
@pytest.mark.parametrize("rounds", [1, 2, 4])
def test_interleaving_divides_the_bubble_by_v(pp: int, rounds: int) -> None:
    m = pp * rounds
    plain = unit_time_bubble(one_f_one_b(pp, m))
    previous = plain
    for v in (2, 3, 4):
        bubble = unit_time_bubble(interleaved_1f1b(pp, m, v))
        assert bubble == pytest.approx(textbook_bubble(pp, m, v), rel=1e-12)
        assert bubble < previous
        previous = bubble


@pytest.mark.parametrize("pp", [2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 2, 4, 8, 32])
def test_zb_h1_bubble_is_below_1f1b(pp: int, m: int) -> None:
    zero_bubble = unit_time_bubble(zb_h1(pp, m))
    assert zero_bubble < unit_time_bubble(one_f_one_b(pp, m))
    if m >= pp:
        # Qi et al.: with F = I = W the idle time per rank drops from 3(p-1) to (p-1).
        assert zero_bubble == pytest.approx((pp - 1) / (3 * m + pp - 1), rel=1e-12)


def test_bubble_is_zero_without_pipeline() -> None:
    for name in NAMES:
        assert unit_time_bubble(make_schedule(name, 1, 4)) == 0.0


# ---------------------------------------------------------------------------------------------
# Files


@pytest.mark.parametrize("suffix", [".csv", ".yaml"])
@pytest.mark.parametrize(
    ("name", "pp", "m", "v"), [("1f1b", 4, 8, 1), ("zb-h1", 3, 5, 1), ("interleaved-1f1b", 2, 4, 3)]
)
def test_save_load_round_trip(
    tmp_path: Path, suffix: str, name: str, pp: int, m: int, v: int
) -> None:
    schedule = make_schedule(name, pp, m, v)
    path = tmp_path / f"schedule{suffix}"
    save_schedule(schedule, path)
    assert load_schedule(path) == schedule


def test_yaml_file_is_plain_data(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    save_schedule(gpipe(2, 1), path)
    assert yaml.safe_load(path.read_text()) == {
        "name": "gpipe",
        "pp": 2,
        "microbatches": 1,
        "virtual_stages": 1,
        "ranks": [
            ["F0@s0", "SEND_F0@s0", "RECV_B0@s1", "B0@s0"],
            ["RECV_F0@s0", "F0@s1", "B0@s1", "SEND_B0@s1"],
        ],
    }


def test_compute_only_yaml_gets_communication(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(
        "pp: 2\nranks:\n"
        "  - [F0@s0, F1@s0, I0@s0, I1@s0, W0@s0, W1@s0]\n"
        "  - [F0@s1, I0@s1, W0@s1, F1@s1, I1@s1, W1@s1]\n"
    )
    schedule = load_schedule(path)
    assert (schedule.name, schedule.pp, schedule.microbatches, schedule.virtual_stages) == (
        "mine",
        2,
        2,
        1,
    )
    assert schedule.has_communication
    assert Action("RECV_B", 0, 1) in schedule.actions[0]
    check_schedule(schedule)
    with pytest.raises(
        ScheduleError, match=r"mine\.yaml: rank 0, action 2 \(I0@s0\): runs before RECV_B0@s1"
    ):
        load_schedule(path, insert_comms=False)


def test_compute_only_csv_without_metadata(tmp_path: Path) -> None:
    path = tmp_path / "mine.csv"
    rows = ["rank,index,kind,microbatch,stage"]
    for rank, actions in enumerate(one_f_one_b(2, 3).compute_only()):
        rows += [f"{rank},{i},{a.kind},{a.microbatch},{a.stage}" for i, a in enumerate(actions)]
    path.write_text("\n".join(rows) + "\n")
    assert load_schedule(path).actions == one_f_one_b(2, 3).actions


@pytest.mark.parametrize(
    ("filename", "text", "message"),
    [
        (
            "s.yaml",
            "ranks: [[F0@s0, B0@s0], [F0@s1, Bx@s1]]",
            "s.yaml rank 1, item 1: cannot parse",
        ),
        ("s.yaml", "ranks: [[F0@s0, B0@s0]]\nspeed: 3", "s.yaml: unknown key 'speed'"),
        ("s.yaml", "pp: two\nranks: [[F0@s0, B0@s0]]", "s.yaml key 'pp': pp must be a positive"),
        ("s.yaml", "ranks: [F0@s0", "s.yaml line 1: expected ',' or ']'"),
        ("s.yaml", "- F0@s0", "s.yaml: expected a mapping with 'ranks'"),
        (
            "s.csv",
            "rank,index,kind,microbatch,stage\n0,0,F,0,0\n0,1,X,0,0\n",
            "s.csv line 3: unknown",
        ),
        (
            "s.csv",
            "rank,index,kind,microbatch,stage\n0,0,F,0\n",
            "s.csv line 2: expected 5 columns",
        ),
        ("s.csv", "rank,index,kind,microbatch,stage\n0,a,F,0,0\n", "s.csv line 2: index must be"),
        ("s.csv", "0,0,F,0,0\n", "s.csv line 1: expected the header rank,index,kind"),
        (
            "s.csv",
            "rank,index,kind,microbatch,stage\n0,0,B,0,0\n",
            "s.csv: rank 0, action 0 (B0@s0)",
        ),
        ("s.txt", "", "s.txt: schedule files must end in .csv, .yaml or .yml"),
    ],
)
def test_load_errors_are_one_clear_line(
    tmp_path: Path, filename: str, text: str, message: str
) -> None:
    path = tmp_path / filename
    path.write_text(text)
    with pytest.raises(ScheduleError) as error:
        load_schedule(path)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ScheduleError, match=r"nope\.yaml: cannot read schedule"):
        load_schedule(tmp_path / "nope.yaml")


# ---------------------------------------------------------------------------------------------
# Gantt chart and the `civetta schedule` command


def rendered(renderable, width: int = 200) -> str:
    console = Console(record=True, width=width, force_terminal=False)
    console.print(renderable)
    return console.export_text()


def test_gantt_has_a_row_per_rank_and_the_bubble_summary() -> None:
    text = rendered(render_gantt(one_f_one_b(4, 8)))
    for rank in range(4):
        assert f"rank {rank} " in text
    assert "rank 0 F0 F1 F2 F3 ······" in text
    assert "rank 3 ·········F0 B0    F1" in text
    assert "bubble (unit times F=1, B=2, I=W=1): 27.3% · textbook (p−1)/(m+p−1) = 27.3%" in text
    assert "peak in-flight microbatches per rank: 4 3 2 1" in text


def test_gantt_folds_into_bands_when_narrow() -> None:
    text = rendered(render_gantt(interleaved_1f1b(4, 8, 2)), width=80)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert text.count("rank 3 ") > 1
    assert "F0.1" in text  # microbatch 0 on chunk 1


def test_schedule_command_draws_saves_and_loads(tmp_path: Path) -> None:
    console = Console(record=True, width=160, force_terminal=False)
    path = tmp_path / "zb.yaml"
    assert schedule_command(2, 4, "zb-h1", 1, save=path, console=console) == 0
    assert schedule_command(99, 99, "ignored", 1, load=path, console=console) == 0
    text = console.export_text()
    assert text.count("zb-h1: pp=2, microbatches=4") == 2
    assert "W0" in text and f"saved zb-h1 schedule to {path}" in text
    with pytest.raises(ScheduleError, match="unknown pipeline schedule"):
        schedule_command(2, 4, "nope", 1, console=console)
