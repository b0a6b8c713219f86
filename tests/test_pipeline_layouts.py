"""Pipeline layouts beyond equal stages and generated schedules: the zero-bubble ZB-H2, the
V-shaped ZB-V and DualPipeV (two stages per rank, stages r and 2·pp − 1 − r on rank r), layers
split unevenly by default or as `parallel.pipeline_layout` says (a stage may hold no layer), and
training from a schedule file. Each reproduces one process within 1e-10 in float64 under mpiexec
(3 AdamW steps of a tiny untied GPT); bad layouts and schedule files are one line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mpi_helpers import assert_same_run, train_worker_run

from launch.config import ConfigError, load
from launch.schedule_files import save_schedule
from parallel.schedules import Action, Schedule, make_schedule

TINY = [
    "model.block_size=16",
    "model.n_layer=8",
    "model.n_head=4",
    "model.n_embd=32",
    "model.tie_embeddings=false",
    "train.batch_size=8",
    "train.steps=3",
    "train.eval_batches=1",
    "data.source=synthetic",
    "train.dtype=float64",
]


def run(tmp: Path, *overrides: str, ranks: int = 1) -> dict[str, np.ndarray]:
    return train_worker_run(tmp, [*TINY, *overrides], ranks)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    return run(tmp_path_factory.mktemp("reference"))


LAYOUTS = {  # label: (ranks, overrides)
    "zb-h2-pp2": (2, ["parallel.pp=2", "parallel.schedule=zb-h2", "train.microbatch_size=1"]),
    "zb-h2-pp4": (4, ["parallel.pp=4", "parallel.schedule=zb-h2", "train.microbatch_size=1"]),
    "zb-v-pp2": (2, ["parallel.pp=2", "parallel.schedule=zb-v", "train.microbatch_size=1"]),
    "zb-v-pp4": (4, ["parallel.pp=4", "parallel.schedule=zb-v", "train.microbatch_size=1"]),
    "zb-v-pp2-m4": (2, ["parallel.pp=2", "parallel.schedule=zb-v", "train.microbatch_size=2"]),
    "dualpipev-pp2": (
        2,
        ["parallel.pp=2", "parallel.schedule=dualpipev", "train.microbatch_size=1"],
    ),
    "dualpipev-pp4": (
        4,
        ["parallel.pp=4", "parallel.schedule=dualpipev", "train.microbatch_size=1"],
    ),
    "zb-v-pp2-dp2-zero1": (
        4,
        [
            "parallel.pp=2",
            "parallel.schedule=zb-v",
            "parallel.dp=2",
            "parallel.zero=1",
            "train.microbatch_size=1",
        ],
    ),
    "zb-v-pp2-tp2-sp": (
        4,
        [
            "parallel.pp=2",
            "parallel.schedule=zb-v",
            "parallel.tp=2",
            "parallel.sequence_parallel=true",
            "train.microbatch_size=2",
        ],
    ),
    "dualpipev-pp2-dp2-zero3": (
        4,
        [
            "parallel.pp=2",
            "parallel.schedule=dualpipev",
            "parallel.dp=2",
            "parallel.zero=3",
            "train.microbatch_size=1",
        ],
    ),
    "zb-h2-pp2-tp2": (
        4,
        ["parallel.pp=2", "parallel.schedule=zb-h2", "parallel.tp=2", "train.microbatch_size=1"],
    ),
    "uneven-pp3": (3, ["parallel.pp=3", "train.microbatch_size=2"]),  # 3, 3, 2 layers
    "layout-empty-ends": (
        3,
        ["parallel.pp=3", "parallel.pipeline_layout=E|t*8|L", "train.microbatch_size=2"],
    ),
    "layout-list-zb-v": (
        2,
        [
            "parallel.pp=2",
            "parallel.schedule=zb-v",
            "parallel.pipeline_layout=[1,3,3,1]",
            "train.microbatch_size=1",
        ],
    ),
}


@pytest.mark.parametrize("label", list(LAYOUTS))
def test_pipeline_layout_matches_single_process(reference, tmp_path, label: str) -> None:
    ranks, overrides = LAYOUTS[label]
    assert_same_run(run(tmp_path, *overrides, ranks=ranks), reference)


def test_a_schedule_file_trains_and_states_its_placement(reference, tmp_path) -> None:
    """A V-shaped schedule saved to YAML (its placement written beside the actions) trains
    from the file as it trains from its generator."""
    path = tmp_path / "zb-v.yaml"
    save_schedule(make_schedule("zb-v", 2, 8), path)
    assert "placement: [0, 1, 1, 0]" in path.read_text()
    got = run(tmp_path, "parallel.pp=2", f"parallel.schedule={path}", "train.microbatch_size=1",
              ranks=2)  # fmt: skip
    assert_same_run(got, reference)


def test_a_hand_written_compute_only_file_trains(reference, tmp_path) -> None:
    """GPipe on two ranks, written by hand with no sends or receives: they are inserted."""
    m = 4
    lines = ["ranks:"]
    for rank in range(2):
        actions = [f"F{i}@s{rank}" for i in range(m)] + [f"B{i}@s{rank}" for i in range(m)]
        lines.append("  - [" + ", ".join(actions) + "]")
    path = tmp_path / "mine.yaml"
    path.write_text("\n".join(lines) + "\n")
    got = run(tmp_path, "parallel.pp=2", f"parallel.schedule={path}", "train.microbatch_size=2",
              ranks=2)  # fmt: skip
    assert_same_run(got, reference)


def test_a_deadlocking_file_is_refused_with_the_checkers_line(tmp_path) -> None:
    actions = [
        [Action("RECV_B", 0, 1), Action("F", 0, 0), Action("SEND_F", 0, 0), Action("B", 0, 0)],
        [Action("RECV_F", 0, 0), Action("F", 0, 1), Action("B", 0, 1), Action("SEND_B", 0, 1)],
    ]
    path = tmp_path / "stuck.yaml"
    save_schedule(Schedule("stuck", 2, 1, 1, actions), path)
    with pytest.raises(ConfigError) as caught:
        load(None, [*TINY, "parallel.pp=2", f"parallel.schedule={path}"])
    message = str(caught.value)
    assert message.startswith(f"parallel.schedule: {path}: ") and "\n" not in message
    assert "runs before" in message or "deadlock" in message


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.pp=2", "parallel.pipeline_layout=Et*4|t*3L"],
         "parallel.pipeline_layout places 7 layers, model.n_layer=8"),
        (["parallel.pp=2", "parallel.pipeline_layout=Et*8L"],
         "parallel.pipeline_layout expected 2 stages separated by '|' (one per pipeline "
         "stage), got 1 in 'Et*8L'"),
        (["parallel.pp=2", "parallel.pipeline_layout=t*4|Et*4L"],
         "parallel.pipeline_layout: 'E' belongs once at the first stage's start, got "
         "'t*4|Et*4L'"),
        (["parallel.pp=4", "parallel.schedule=zb-v", "model.n_layer=6"],
         "the pipeline has 8 stages, more than model.n_layer=6 (set parallel.pipeline_layout "
         "to leave a stage without layers)"),
    ],
)  # fmt: skip
def test_bad_pipeline_layouts_are_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(None, [*TINY, *overrides])
    assert str(caught.value) == message


def test_uneven_layers_go_to_the_middle_stages_first() -> None:
    layout = load(None, [*TINY, "model.n_layer=10", "parallel.pp=4"]).layout
    assert [len(r) for r in layout.stage_layers(10)] == [2, 3, 3, 2]


@pytest.mark.parametrize("schedule", ["zb-v", "dualpipev"])
def test_a_tied_table_under_a_v_is_one_tensor_on_rank_0(tmp_path, schedule: str) -> None:
    """A V puts the first and last stage on rank 0: the head reuses the embedding's table (one
    tensor, its gradient the sum of both uses), as one process does."""
    tied = ("model.tie_embeddings=true",)
    ref = run(tmp_path / "one", *tied)
    v = ("parallel.pp=2", f"parallel.schedule={schedule}", "train.microbatch_size=1")
    assert_same_run(run(tmp_path / "v", *tied, *v, ranks=2), ref)
