"""The `Layout`: one frozen value for every parallel choice, checked in one place.

Every invalid layout gets the same one line from `civetta train`, `compare`, `simulate` and
`tune`; the runtime, the checkpoints, metrics.json and the cost model all read the same value;
and the packages import in one direction only (civetta ← parallel ← parallel.cost ← launch).
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from launch import cli
from launch.config import load
from parallel.layout import Layout, LayoutError

REPO = Path(__file__).resolve().parent.parent

TINY_YAML = """\
model: {n_layer: 2, n_head: 4, n_embd: 16, block_size: 8}
data: {source: synthetic}
train: {steps: 2, batch_size: 8, eval_batches: 1}
"""


def test_defaults_are_one_process() -> None:
    layout = Layout()
    assert (layout.world_size, layout.global_batch, layout.num_stages) == (1, 1, 1)
    assert layout.label == "single"


def test_for_batch_cuts_the_batch_into_microbatches() -> None:
    layout = Layout.for_batch(16, 2, dp=2, pp=2)
    assert (layout.microbatch_size, layout.microbatches, layout.global_batch) == (2, 4, 16)
    assert Layout.for_batch(16, dp=4).microbatch_size == 4  # default: the whole share
    with pytest.raises(LayoutError, match=r"^parallel\.dp=3 does not divide train\.batch_size=16$"):
        Layout.for_batch(16, dp=3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dp": 0}, "parallel.dp expected a positive integer, got 0"),
        ({"microbatches": True}, "microbatches expected a positive integer, got True"),
        ({"ep": 2}, "parallel.ep=2 does not divide parallel.dp × parallel.cp = 1"),
        ({"cp": 2, "cp_comm": "p2p"}, "parallel.cp_comm expected one of ring | all_gather | a2a"),
        ({"schedule": "1f2b"}, "parallel.schedule expected one of gpipe | 1f1b | "),
        ({"zero": 4}, "parallel.zero expected one of 0 | 1 | 2 | 3, got 4"),
        ({"order": "dp-tp"}, "parallel.order expected the axes dp, tp, pp (and optionally cp)"),
        ({"bucket_mb": 0.0}, "parallel.bucket_mb expected a positive number, got 0.0"),
        ({"pp": 2, "virtual_stages": 2}, "parallel.virtual_stages=2 needs parallel.schedule="),
        (
            {"pp": 2, "microbatches": 3, "schedule": "interleaved-1f1b"},
            "needs the microbatches per step (3) to be a multiple of parallel.pp=2",
        ),
    ],
)
def test_a_bad_layout_is_refused_when_built(kwargs: dict, message: str) -> None:
    with pytest.raises(LayoutError) as caught:
        Layout(**kwargs)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert not str(caught.value).startswith("error")  # the CLI alone adds "error:"


def test_the_model_check_names_the_keys() -> None:
    model = load(None, ["model.n_head=4", "model.vocab_size=256"]).model
    with pytest.raises(LayoutError, match=r"^parallel\.tp=3 does not divide model\.n_head=4$"):
        Layout(tp=3).check(model)
    with pytest.raises(LayoutError, match=r"^seq_len=100 exceeds model\.block_size=64$"):
        Layout().check(model, seq_len=100)
    Layout(tp=2, sequence_parallel=True).check(model)


def test_as_dict_keeps_every_key_metrics_json_had() -> None:
    """metrics.json's `layout` may gain keys, never lose or rename one."""
    before = {"dp", "tp", "pp", "order", "schedule", "zero", "sequence_parallel", "recompute"}
    as_dict = Layout(dp=2).as_dict()
    assert before <= set(as_dict) and as_dict["world_size"] == 2
    # Every field but a schedule file's actions, which `schedule` names by the file's path.
    assert {f.name for f in dataclasses.fields(Layout)} - {"schedule_actions"} <= set(as_dict)


def test_the_config_builds_the_layout() -> None:
    config = load(None, ["parallel.dp=2", "parallel.pp=2", "train.microbatch_size=2"])
    assert config.layout == Layout(dp=2, pp=2, microbatch_size=2, microbatches=4)
    assert config.layout.label == "dp2-pp2-1f1b-m4"


# ---- the same line from every command ------------------------------------------------------
BAD_LAYOUTS = {
    "tp-heads": (["parallel.tp=3"], "error: parallel.tp=3 does not divide model.n_head=4"),
    "pp-layers": (
        ["parallel.pp=4"],
        "error: the pipeline has 4 stages, more than model.n_layer=2 (set "
        "parallel.pipeline_layout to leave a stage without layers)",
    ),
    "dp-batch": (["parallel.dp=3"], "error: parallel.dp=3 does not divide train.batch_size=8"),
    "virtual-needs-interleaved": (
        ["parallel.pp=2", "parallel.virtual_stages=2"],
        "error: parallel.virtual_stages=2 needs parallel.schedule=interleaved-1f1b, got 1f1b",
    ),
    "sequence-parallel": (
        ["parallel.tp=4", "parallel.sequence_parallel=true", "model.block_size=6"],
        "error: parallel.tp=4 does not divide model.block_size=6 (sequence parallel splits the "
        "sequence)",
    ),
}
COMMANDS = {
    "train": lambda config, out: ["train", config, "--out", out],
    "compare": lambda config, out: ["compare", config, "--out", out],
    "simulate": lambda config, out: ["simulate", config, "--hardware", "a100-dgx"],
    "tune": lambda config, out: ["tune", config, "--hardware", "a100-dgx", "--gpus", "8"],
}


@pytest.mark.parametrize("case", BAD_LAYOUTS, ids=str)
def test_every_command_refuses_a_bad_layout_with_the_same_line(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides, message = BAD_LAYOUTS[case]
    config = tmp_path / "config.yaml"
    config.write_text(TINY_YAML, encoding="utf-8")
    lines = {}
    for name, argv in COMMANDS.items():
        sets = [item for o in overrides for item in ("--set", o)]
        code = cli.main([*argv(str(config), str(tmp_path / name)), *sets])
        captured = capsys.readouterr()
        lines[name] = (code, captured.err)
    assert lines == dict.fromkeys(COMMANDS, (2, message + "\n"))


# ---- imports go one way -----------------------------------------------------------------------
def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def _importers(package: str, forbidden: tuple[str, ...], skip: str | None = None) -> list[str]:
    bad = []
    for path in sorted((REPO / package).rglob("*.py")):
        if skip and skip in path.relative_to(REPO).parts:
            continue
        for name in _imports(path):
            if name.split(".")[0] in forbidden or name.startswith(forbidden):
                bad.append(f"{path.relative_to(REPO)} imports {name}")
    return bad


def test_the_engine_imports_neither_mpi_nor_the_layers_above() -> None:
    assert _importers("civetta", ("mpi4py", "parallel", "launch")) == []


def test_the_runtime_imports_neither_the_cost_model_nor_launch() -> None:
    assert _importers("parallel", ("launch", "parallel.cost"), skip="cost") == []


def test_the_cost_model_does_not_import_launch_or_read_yaml() -> None:
    assert _importers("parallel/cost", ("launch", "yaml")) == []
