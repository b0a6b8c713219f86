"""Every table that compare, tune and simulate print fits an 80-column terminal, whole: no line
longer than 80 characters, no cell cut to "…", and every cell that was put in comes out, in its
row and in order, across the parts a wide table is split into."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from civetta.models.gpt import GPTConfig
from launch import compare, report, simulate, tables, tune
from launch.config import load
from launch.profiles import load_profile
from parallel.cost.tuning import tune as search
from parallel.layout import Layout

REPO = Path(__file__).resolve().parent.parent
WIDTH = 80


def _console(width: int = WIDTH) -> Console:
    return Console(file=io.StringIO(), width=width, color_system=None)


def _text(console: Console) -> str:
    return console.file.getvalue()  # type: ignore[attr-defined]


def _parts(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Each rendered table as (headers, body rows), each row its stripped cells."""
    found: list[tuple[list[str], list[list[str]]]] = []
    for line in text.splitlines():
        if line.startswith("┏"):
            found.append(([], []))
        elif line.startswith("┃"):
            found[-1][0].extend(cell.strip() for cell in line.strip("┃").split("┃"))
        elif line.startswith("│"):
            found[-1][1].append([cell.strip() for cell in line.strip("│").split("│")])
    return found


def _fits(text: str, width: int = WIDTH) -> None:
    too_long = [line for line in text.splitlines() if len(line) > width]
    assert too_long == [], "\n".join(too_long)
    assert "…" not in text


def _joined(text: str, lead: int) -> dict[str, list[str]]:
    """Row name → its cells across every part, the `lead` repeated columns given once."""
    rows: dict[str, list[str]] = {}
    for _, body in _parts(text):
        for cells in body:
            key = " ".join(cells[:lead])
            rows.setdefault(key, []).extend(cells[lead:])
    return rows


# ---- compare ------------------------------------------------------------------------------------
def _metrics(layout: Layout, ranks: int) -> dict:
    memory = {
        "params": 123_456_789, "grads": 123_456_789, "optimizer": 246_913_578,
        "activations_peak": 3_456_789, "params_gathered_peak": 1_234_567 * (layout.zero == 3),
    }  # fmt: skip
    ops = [{"op": "all_reduce", "axis": a, "bytes": 12_345_678} for a in ("dp", "tp", "pp")]
    return {
        "steps": [{"loss": 4.1234 + 0.1 * i} for i in range(3)],
        "final_loss": 4.3234,
        "val_loss": 4.33,
        "step_time_median_s": 0.01234,
        "tokens_per_s": 1_234_567.8,
        "memory": {"per_rank": [memory] * ranks},
        "comm": {"per_rank": [{"ops": ops}] * ranks},
        "pipeline": {"bubble_fraction": 0.1234, "per_rank": []},
    }


LAYOUTS = [
    ("baseline", "baseline", Layout()),
    ("dp4-zero3", "layout", Layout(dp=4, zero=3)),
    ("tp2-sp", "layout", Layout(tp=2, sequence_parallel=True)),
    ("pp4-1f1b-m8", "layout", Layout(pp=4, microbatches=8)),
    ("dp2-pp2-1f1b-m4", "layout", Layout(dp=2, pp=2, microbatches=4)),
    (
        "pp2-interleaved-1f1b-v2-m4",
        "layout",
        Layout(pp=2, schedule="interleaved-1f1b", virtual_stages=2, microbatches=4),
    ),
    (
        "dp2-tp2-sp-zero1-rc-selective",
        "layout",
        Layout(dp=2, tp=2, sequence_parallel=True, zero=1, recompute="selective"),
    ),
    ("tp4", "layout", Layout(tp=4)),  # fails
]
PROJECTION = {
    "hardware": "h100-dgx", "step_time_s": 12.3456, "tokens_per_s": 12_345_678.0,
    "tflops_per_gpu": 348.3, "mfu": 0.4734, "bubble_fraction": 0.1234,
    "memory_total_bytes": 73.5 * 2**30, "fits": True, "breakdown_s": {},
}  # fmt: skip


def _rows(projection: bool = True) -> list[dict]:
    rows = []
    for label, role, layout in LAYOUTS:
        failed = label == "tp4"
        row = report.summarize(
            label,
            role,
            {**layout.as_dict(), "dtype": "float64"},
            None if failed else _metrics(layout, layout.world_size),
            baseline=None if role == "baseline" else "baseline",
            reference=[4.1234 + 0.1 * i + 1e-15 for i in range(3)],
        )
        if failed:
            row["error"] = "error: rank 1 failed: InjectedFaultError"
        if projection:
            row["projection"] = dict(PROJECTION, fits=not failed)
        rows.append(row)
    return rows


@pytest.mark.parametrize("projection", [True, False])
def test_every_compare_table_fits_80_columns_with_every_cell_whole(projection: bool) -> None:
    rows = _rows(projection)
    console = _console()
    compare.print_tables(console, rows)
    text = _text(console)
    _fits(text)
    shown = report.tables(rows)
    assert len(shown) == (3 if projection else 2)
    # Across all parts of all tables, each row shows exactly the cells the tables hold.
    expected = {
        row["label"]: [report.cell(c, row) for _, columns in shown for c in columns[1:]]
        for row in rows
    }
    assert _joined(text, lead=1) == expected
    assert "tp4 failed: error: rank 1 failed" in text
    # Every header is shown once per table part, the label's first; the legend spells out
    # the short ones.
    for headers, _ in _parts(text):
        assert headers[0] == "layout"
    assert "|Δloss| = max over steps of |loss − baseline loss|" in text


def test_a_wide_terminal_shows_each_compare_table_whole() -> None:
    rows = _rows()
    console = _console(250)
    compare.print_tables(console, rows)
    text = _text(console)
    assert len(_parts(text)) == len(report.tables(rows)) and "(1/" not in text


def test_a_name_longer_than_the_terminal_wraps_and_is_never_cut() -> None:
    rows = _rows(projection=False)
    rows[1]["label"] = "a-very-long-layout-name-" * 5
    console = _console()
    compare.print_tables(console, rows)
    _fits(_text(console))


def test_the_reports_keep_every_column_and_header() -> None:
    """The terminal's short headers are the terminal's only: the reports keep the full ones."""
    rows = _rows()
    md = report.markdown({"config": "c.yaml", "command": "civetta", "wall_s": 1.0, "runs": rows})
    for column in report.COLUMNS:
        if column.key == "comm_cp_bytes_per_step":  # shown once a layout uses cp
            assert report._md(column.header) not in md
        elif column.in_tables and column.key in compare.SHORT_HEADERS:
            assert report._md(column.header) in md


def test_output_that_is_not_a_terminal_is_80_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    console = tables.cli_console()
    assert not console.is_terminal and console.width == WIDTH


# ---- tune ---------------------------------------------------------------------------------------
def test_the_tune_table_fits_80_columns_with_every_cell_whole() -> None:
    model = GPTConfig(vocab_size=51200, block_size=1024, n_layer=24, n_head=16, n_embd=2048)
    result = search(model, load_profile("a100-dgx"), 16, 32, Layout())
    # The widest cells shown whatever the ranking: "interleaved-1f1b v=6", "selective".
    wide = [r for r in result.ranked if r.layout.virtual_stages > 1]
    assert wide
    result.ranked = wide[:5] + [r for r in result.ranked if r not in wide][:5]
    console = _console()
    tune.render(console, "model.yaml", "a100-dgx", 16, 32, "bf16", result, 10, 8)
    text = _text(console)
    _fits(text)
    expected = [tune._row(i, r) for i, r in enumerate(result.ranked[:10], start=1)]
    joined = _joined(text, lead=2)
    assert list(joined.values()) == [cells[2:] for cells in expected]
    assert list(joined) == [" ".join(cells[:2]) for cells in expected]
    assert "Top 10 layouts" in text and "mb×m = microbatch size" in text


# ---- simulate -----------------------------------------------------------------------------------
def test_the_simulate_tables_fit_80_columns_with_every_cell_whole() -> None:
    config = load(REPO / "configs" / "gpt3-175b.yaml")
    profile = load_profile("a100-dgx")
    pr = simulate.simulate(config, profile)
    console = _console()
    simulate.render(console, "gpt3-175b.yaml", config, profile, pr, 300 * 10**9)
    text = _text(console)
    _fits(text)
    (time_headers, time_rows), (memory_headers, memory_rows) = _parts(text)
    assert time_headers == ["part", "time", "share"] and memory_headers == ["category", "bytes"]
    keys = ("compute", "optimizer", "tp_exposed", "pp_exposed", "dp_exposed", "bubble")
    assert [cells[1:] for cells in time_rows[:-1]] == [
        [simulate._seconds(pr.breakdown_s[k]), f"{pr.breakdown_s[k] / pr.step_time_s:.1%}"]
        for k in keys
    ]
    assert time_rows[-1] == ["step", simulate._seconds(pr.step_time_s), "100%"]
    assert memory_rows == [[k, simulate._gib(pr.memory_per_gpu[k])] for k in simulate.MEMORY]
