"""`include:`, `sweep:` and `civetta compare` end to end.

The parsing tests run in this process. Two compares of a tiny float64 GPT (3 steps) run real
`civetta train` subprocesses, one of them under mpiexec with 2 ranks: every layout must match
the single-process baseline to rounding, all four reports must hold the required columns, and a
layout that fails must be reported while the others still run.
"""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from launch import cli, report
from launch.compare import baseline_config, first_error_line, plan_runs, run_environment
from launch.config import ConfigError, load, load_experiment
from parallel.comm import launched_by_mpi

TINY = """\
model: {n_layer: 2, n_head: 2, n_embd: 16, block_size: 8}
data: {source: synthetic}
train: {steps: 3, batch_size: 4, eval_batches: 1, dtype: float64}
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---- include: -----------------------------------------------------------------------------------
def test_include_is_relative_to_the_including_file_and_its_keys_win(tmp_path: Path) -> None:
    write(tmp_path / "base" / "model.yaml", "model: {n_layer: 4, n_embd: 32}\n")
    write(tmp_path / "base" / "common.yaml", "include: model.yaml\n" + TINY)
    config = write(
        tmp_path / "exp" / "run.yaml",
        "include: ../base/common.yaml\nmodel: {n_layer: 1}\ntrain:\n",
    )
    loaded = load(config)
    # common.yaml's own model section overrides model.yaml's n_layer, run.yaml overrides both;
    # keys nobody overrides survive, and an empty `train:` keeps the included section.
    assert (loaded.model.n_layer, loaded.model.n_embd, loaded.model.n_head) == (1, 16, 2)
    assert loaded.train.steps == 3


def test_a_list_of_includes_merges_in_order(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", TINY + "parallel: {dp: 2}\n")
    write(tmp_path / "b.yaml", "parallel: {dp: 4, tp: 1}\ntrain: {batch_size: 8}\n")
    config = write(tmp_path / "c.yaml", "include: [a.yaml, b.yaml]\n")
    loaded = load(config, ["parallel.tp=2"])
    assert (loaded.parallel.dp, loaded.parallel.tp, loaded.train.batch_size) == (4, 2, 8)


def test_a_diamond_of_includes_is_not_a_cycle(tmp_path: Path) -> None:
    write(tmp_path / "root.yaml", TINY)
    write(tmp_path / "left.yaml", "include: root.yaml\n")
    write(tmp_path / "right.yaml", "include: root.yaml\n")
    config = write(tmp_path / "top.yaml", "include: [left.yaml, right.yaml]\n")
    assert load(config).model.n_layer == 2


# ---- sweep: ------------------------------------------------------------------------------------
def test_sweep_list_entries_take_dotted_or_nested_keys(tmp_path: Path) -> None:
    config = write(
        tmp_path / "s.yaml",
        TINY
        + "sweep:\n"
        + "  - {parallel.dp: 2}\n"
        + "  - parallel: {tp: 2, sequence_parallel: true}\n"
        + "  - {parallel: {pp: 2}, train.microbatch_size: 1, name: my-pipe}\n"
        + "  - {parallel.dp: 2, train.dtype: float32}\n",
    )
    base, layouts = load_experiment(config, ["train.steps=5"])
    assert base.world_size == 1 and base.train.steps == 5
    labels = [label for label, _ in layouts]
    assert labels == ["dp2", "tp2-sp", "my-pipe", "dp2-2"]
    configs = dict(layouts)
    assert configs["my-pipe"].microbatches == 4 and configs["my-pipe"].parallel.pp == 2
    assert configs["dp2-2"].train.dtype == "float32" and configs["dp2"].train.dtype == "float64"
    # --set changed the base; every entry inherits it.
    assert all(c.train.steps == 5 for _, c in layouts)
    # `civetta train` on the same file runs the base and leaves the sweep alone.
    assert load(config).world_size == 1


def test_sweep_grid_is_the_product_first_key_slowest(tmp_path: Path) -> None:
    config = write(
        tmp_path / "g.yaml",
        TINY + "sweep:\n  grid:\n    parallel.dp: [1, 2]\n    parallel: {tp: [1, 2]}\n",
    )
    _, layouts = load_experiment(config)
    sizes = [(c.parallel.dp, c.parallel.tp) for _, c in layouts]
    assert sizes == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert [label for label, _ in layouts] == ["single", "tp2", "dp2", "dp2-tp2"]


def test_no_sweep_gives_no_layouts(tmp_path: Path) -> None:
    base, layouts = load_experiment(write(tmp_path / "n.yaml", TINY))
    assert layouts == [] and base.model.n_layer == 2


def test_a_sweep_error_names_the_entry(tmp_path: Path) -> None:
    config = write(
        tmp_path / "e.yaml", TINY + "sweep:\n  - {parallel.tp: 2}\n  - {parallel.tp: 3}\n"
    )
    with pytest.raises(ConfigError, match=r"^sweep\[1\]: parallel\.tp=3 does not divide"):
        load_experiment(config)


def test_layout_labels_name_what_differs() -> None:
    cfg = load(None, ["model.n_layer=4", "parallel.pp=2", "parallel.schedule=zb-h1"])
    assert cfg.layout.label == "pp2-zb-h1-m1"
    cfg = load(None, ["parallel.dp=2", "parallel.tp=2", "parallel.sequence_parallel=true"])
    assert cfg.layout.label == "dp2-tp2-sp"


def test_the_baseline_is_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    config = write(
        tmp_path / "b.yaml",
        TINY
        + "sweep:\n  - {parallel.dp: 2, parallel.pp: 2, train.microbatch_size: 1}\n"
        + "  - {parallel.tp: 2, train.dtype: float32}\n",
    )
    base, layouts = load_experiment(config)
    single = baseline_config(layouts[0][1])
    assert (single.world_size, single.microbatches, single.train.batch_size) == (1, 1, 4)
    runs = plan_runs(base, layouts, tmp_path / "out")
    # One baseline per distinct set of non-parallel settings (here: two dtypes).
    assert [(r.label, r.role, r.baseline) for r in runs] == [
        ("baseline", "baseline", None),
        ("baseline-2", "baseline", None),
        ("dp2-pp2-1f1b-m2", "layout", "baseline"),
        ("tp2", "layout", "baseline-2"),
    ]


def test_a_fault_can_be_scoped_to_one_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIVETTA_COMPARE_FAULT", "tp2:rank=1,step=0")
    monkeypatch.setenv("PMI_RANK", "3")  # as if compare itself ran inside an MPI job
    assert run_environment("tp2")["CIVETTA_FAULT"] == "rank=1,step=0"
    other = run_environment("dp2")
    assert "CIVETTA_FAULT" not in other and "CIVETTA_COMPARE_FAULT" not in other
    assert "PMI_RANK" not in other and other["OMP_NUM_THREADS"]


def test_the_error_of_a_run_is_its_first_error_line() -> None:
    stderr = "noise\nerror: rank 1 failed: boom\nerror: later\n"
    assert first_error_line(stderr, 1) == "error: rank 1 failed: boom"
    assert first_error_line("Killed\n", -9) == "Killed"
    assert first_error_line("", 3) == "error: exit code 3"


def test_comm_per_step_counts_each_message_at_its_sender() -> None:
    metrics = {
        "steps": [{}, {}],
        "comm": {
            "per_rank": [
                {"ops": [{"op": "send", "axis": "pp", "bytes": 40}]},
                {"ops": [{"op": "recv", "axis": "pp", "bytes": 40}]},
            ]
        },
    }
    comm = report.comm_per_step(metrics)
    assert comm["pp"] == {"max": 20.0, "mean": 10.0}
    assert comm["dp"] == {"max": 0.0, "mean": 0.0}


# ---- civetta compare end to end -----------------------------------------------------------------
REQUIRED_CSV = {
    "label", "status", "dp", "tp", "pp", "schedule", "zero", "sequence_parallel", "recompute",
    "ranks", "final_loss", "max_abs_loss_diff", "step_time_median_s", "tokens_per_s",
    "bubble_fraction", "mem_params_bytes", "mem_grads_bytes", "mem_optimizer_bytes",
    "mem_activations_bytes", "comm_dp_bytes_per_step", "comm_tp_bytes_per_step",
    "comm_pp_bytes_per_step", "error",
}  # fmt: skip

needs_mpiexec_outside_mpi = pytest.mark.skipif(
    launched_by_mpi(), reason="mpi4py.MPI is loaded in this process: no nested mpiexec"
)


@needs_mpiexec_outside_mpi
def test_compare_writes_four_reports_and_every_layout_matches_the_baseline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(
        tmp_path / "cmp.yaml",
        TINY + "sweep:\n  - {parallel.dp: 2}\n  - {parallel.pp: 2, train.microbatch_size: 2}\n",
    )
    out = tmp_path / "out"
    code = cli.main(["compare", str(config), "--out", str(out), "--timeout", "120"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    # The terminal's headers are short so that its tables fit 80 columns (the legend under
    # each spells them out); the reports keep the full ones, checked below.
    for header in ("|Δloss|", "tokens/s", "params", "dp/step", "bubble"):
        assert header in printed
    table_lines = [line for line in printed.splitlines() if line[:1] in set("┏┃┡│└")]
    assert table_lines and max(map(len, table_lines)) <= 80

    summary = json.loads((out / "report.json").read_text())
    runs = {run["label"]: run for run in summary["runs"]}
    assert list(runs) == ["baseline", "dp2", "pp2-1f1b-m2"]
    assert summary["failed"] == 0
    for label in ("dp2", "pp2-1f1b-m2"):
        run = runs[label]
        assert run["status"] == "ok" and run["baseline"] == "baseline"
        assert run["max_abs_loss_diff"] <= 1e-10  # float64: the same losses up to rounding
        assert len(run["losses"]) == 3
        assert set(run["memory_peak_bytes"]) == {*report.MEMORY, "total"}
        assert set(run["comm_bytes_per_step"]) == {"dp", "tp", "pp", "cp", "ep", "total"}
    assert runs["dp2"]["ranks"] == 2 and runs["dp2"]["comm_bytes_per_step"]["dp"]["max"] > 0
    assert runs["pp2-1f1b-m2"]["bubble_fraction"] is not None
    assert runs["pp2-1f1b-m2"]["comm_bytes_per_step"]["pp"]["max"] > 0
    assert runs["dp2"]["bubble_fraction"] is None

    with (out / "report.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert set(rows[0]) >= REQUIRED_CSV
    assert [row["label"] for row in rows] == list(runs)
    assert float(rows[1]["max_abs_loss_diff"]) <= 1e-10

    markdown = (out / "report.md").read_text()
    assert "max \\|Δloss\\|" in markdown and "| pp2-1f1b-m2 |" in markdown
    html = (out / "report.html").read_text()
    assert "<style>" in html and "<script" not in html and "http" not in html.split("<svg")[0]
    svgs = [part.split("</svg>")[0] for part in html.split("<svg")[1:]]
    assert len(svgs) == 5  # loss, deviation, memory, bytes per axis, the pipeline timeline
    for svg in svgs:
        ET.fromstring("<svg" + svg + "</svg>")  # well-formed inline SVG
    # Each run's resolved config sits in its directory and trains as it stands.
    assert load(out / "dp2" / "config.yaml").parallel.dp == 2


@needs_mpiexec_outside_mpi
def test_a_failing_layout_is_reported_and_the_others_still_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(
        tmp_path / "cmp.yaml",
        TINY + "sweep:\n  - {parallel.tp: 2}\n  - {parallel.dp: 2}\n",
    )
    monkeypatch.setenv("CIVETTA_COMPARE_FAULT", "tp2:rank=1,step=1")
    out = tmp_path / "out"
    code = cli.main(["compare", str(config), "--out", str(out), "--timeout", "120"])
    printed = capsys.readouterr().out
    assert code == 1
    expected = "error: rank 1 failed: InjectedFaultError: injected fault on rank 1 at step 1"
    assert "tp2 failed" in printed and expected in printed

    summary = json.loads((out / "report.json").read_text())
    runs = {run["label"]: run for run in summary["runs"]}
    assert summary["failed"] == 1
    assert runs["tp2"]["status"] == "failed" and runs["tp2"]["error"].startswith(expected)
    assert runs["tp2"]["final_loss"] is None
    assert runs["dp2"]["status"] == "ok" and runs["dp2"]["max_abs_loss_diff"] <= 1e-10
    assert "Failed runs" in (out / "report.md").read_text()
    assert "tp2" in (out / "report.html").read_text()


@needs_mpiexec_outside_mpi
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="process listing needs /proc")
def test_a_run_past_its_timeout_is_failed_and_leaves_no_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path / "cmp.yaml", TINY + "sweep:\n  - {parallel.dp: 2}\n")
    out = tmp_path / "out"
    # Runs far longer than the timeout, which leaves the ranks time to start under mpiexec:
    # they must be stopped with it.
    argv = ["compare", str(config), "--out", str(out), "--timeout", "2.5"]
    assert cli.main([*argv, "--set", "train.steps=1000000"]) == 1
    capsys.readouterr()
    summary = json.loads((out / "report.json").read_text())
    assert [run["error"] for run in summary["runs"]] == ["error: timed out after 2.5 s"] * 2
    leftover = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(out) in text:
            leftover.append(text)
    assert leftover == []


def test_projection_columns_come_from_the_cost_model() -> None:
    from launch.compare import projection_of
    from launch.config import model_description
    from launch.profiles import load_profile
    from launch.simulate import workload_of
    from parallel.cost.projection import project

    config = load("configs/quickstart.yaml", ["parallel.dp=2", "parallel.tp=2"])
    profile = load_profile("a100-dgx")
    row = {"projection": projection_of(config, profile)}
    expected = project(model_description(config), config.layout, profile, work=workload_of(config))
    assert row["projection"]["step_time_s"] == expected.step_time_s
    assert row["projection"]["memory_total_bytes"] == expected.memory_per_gpu["total"]
    columns = [c for c in report.COLUMNS if c.group == "projection"]
    assert report.cell(columns[0], row) == "a100-dgx"
    assert all(report.cell(c, row) != "-" for c in columns)


def test_the_projection_table_shows_only_when_a_layout_was_projected() -> None:
    config = load("configs/quickstart.yaml")
    row = report.summarize("dp2", "layout", config.layout.as_dict(), None)
    titles = [title for title, _ in report.tables([row])]
    assert not any(title.startswith("Cost-model projection") for title in titles)
    row["projection"] = {"hardware": "a100-dgx", "step_time_s": 0.1}
    titles = [title for title, _ in report.tables([row])]
    assert any(title.startswith("Cost-model projection") for title in titles)
