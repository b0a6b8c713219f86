"""The comparison report: one row per run, drawn from its metrics.json, written four ways.

A row is a plain JSON-able dict (see `summarize`). What the tables show is a list of `Column`s,
each reading one value from a row; the terminal table, `report.md`, `report.csv` and
`report.html` are all drawn from that list, so a new figure (the cost model's projection, say)
is one more `Column` in `COLUMNS` and one more key in the row. `report.json` holds whole rows.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from launch import plots

AXES = ("dp", "tp", "pp", "cp", "ep")
# Axes shown only once some layout of the report uses them.
OPTIONAL_AXES = ("cp", "ep")
# "gathered" is ZeRO-3's peak of full parameters gathered for a layer's forward or backward.
MEMORY = ("params", "grads", "optimizer", "activations", "gathered")
MB = 1e6


# ---- a row per run --------------------------------------------------------------------------
def comm_per_step(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Bytes per step on each axis, as the max and the mean over ranks.

    A rank's figure is what it passed to collectives plus what it sent; a `recv` is left out,
    so every point-to-point message counts once, at its sender. Totals are over the training
    steps (the validation pass is not in the ledger), divided by their number.
    """
    steps = max(len(metrics["steps"]), 1)
    per_rank = []
    for rank in metrics["comm"]["per_rank"]:
        totals: dict[str, int] = dict.fromkeys(AXES, 0)
        for op in rank["ops"]:
            if op["op"] != "recv" and op["axis"] in totals:
                totals[op["axis"]] += op["bytes"]
        totals["total"] = sum(totals.values())
        per_rank.append(totals)
    return {
        axis: {
            "max": max((r[axis] for r in per_rank), default=0) / steps,
            "mean": float(np.mean([r[axis] for r in per_rank])) / steps if per_rank else 0.0,
        }
        for axis in (*AXES, "total")
    }


def memory_categories(rank: dict[str, Any]) -> dict[str, int]:
    """One rank's metrics.json memory entry by report category."""
    return {
        "params": rank["params"],
        "grads": rank["grads"],
        "optimizer": rank["optimizer"],
        "activations": rank["activations_peak"],
        "gathered": rank.get("params_gathered_peak", 0),  # absent before ZeRO-3 existed
    }


def memory_peak(metrics: dict[str, Any]) -> dict[str, int]:
    """Bytes by category, each the max over ranks; `total` is the largest rank's sum."""
    ranks = [memory_categories(r) for r in metrics["memory"]["per_rank"]]
    peak = {c: max((r[c] for r in ranks), default=0) for c in MEMORY}
    peak["total"] = max((sum(r.values()) for r in ranks), default=0)
    return peak


def max_abs_diff(losses: list[float], reference: list[float] | None) -> float | None:
    """The equivalence figure: the largest |loss − baseline loss| over all steps."""
    if reference is None or len(reference) != len(losses) or not losses:
        return None
    return float(np.max(np.abs(np.asarray(losses) - np.asarray(reference))))


def summarize(
    label: str,
    role: str,
    layout: dict[str, Any],
    metrics: dict[str, Any] | None,
    baseline: str | None = None,
    reference: list[float] | None = None,
) -> dict[str, Any]:
    """A report row; the measured fields are None when the run produced no metrics."""
    row: dict[str, Any] = {
        "label": label,
        "role": role,
        "baseline": baseline,
        "status": "ok" if metrics is not None else "failed",
        "error": None,
        "layout": layout,
        "ranks": layout["world_size"],
        "losses": None,
        "final_loss": None,
        "val_loss": None,
        "max_abs_loss_diff": None,
        "step_time_median_s": None,
        "tokens_per_s": None,
        "bubble_fraction": None,
        "memory_peak_bytes": None,
        "memory_per_rank": None,
        "comm_bytes_per_step": None,
        "pipeline_timelines": None,
        # The cost model's projection onto `civetta compare --hardware PROFILE`, when given.
        "projection": None,
        # A mixture-of-experts model's routing over the run (metrics.json's `moe`).
        "moe": None,
    }
    if metrics is None:
        return row
    losses = [s["loss"] for s in metrics["steps"]]
    row.update(
        losses=losses,
        final_loss=metrics["final_loss"],
        val_loss=metrics["val_loss"],
        max_abs_loss_diff=max_abs_diff(losses, reference) if role == "layout" else None,
        step_time_median_s=metrics["step_time_median_s"],
        tokens_per_s=metrics["tokens_per_s"],
        memory_peak_bytes=memory_peak(metrics),
        memory_per_rank=metrics["memory"]["per_rank"],
        comm_bytes_per_step=comm_per_step(metrics),
        moe=metrics.get("moe"),
    )
    if layout["pp"] > 1:  # without a pipeline there is no bubble to speak of
        pipeline = metrics["pipeline"]
        row["bubble_fraction"] = pipeline["bubble_fraction"]
        row["pipeline_timelines"] = [
            {"rank": r["rank"], "timeline": r["timeline"], "window_s": r["window_s"]}
            for r in pipeline["per_rank"]
        ]
    return row


# ---- columns ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    key: str  # the CSV header
    header: str  # the table header
    group: str  # id | layout | loss | speed | memory | comm | projection
    value: Callable[[dict[str, Any]], Any]
    fmt: Callable[[Any], str] = str
    in_tables: bool = True  # False: CSV (and JSON) only


def _get(*path: str) -> Callable[[dict[str, Any]], Any]:
    def read(row: dict[str, Any]) -> Any:
        value: Any = row
        for key in path:
            if value is None:
                return None
            value = value[key]
        return value

    return read


def _fixed(digits: int) -> Callable[[Any], str]:
    return lambda v: f"{v:.{digits}f}"


def _significant(value: float) -> str:
    """Three significant digits: 141 TFLOP/s on a GPU, 0.0132 on a CPU core."""
    return f"{value:.3g}"


def _mb(value: float) -> str:
    return "0" if value == 0 else f"{value / MB:.3f}"


COLUMNS: list[Column] = [
    Column("label", "layout", "id", _get("label")),
    Column("status", "status", "id", _get("status")),
    Column("role", "role", "id", _get("role"), in_tables=False),
    Column("baseline", "baseline", "id", _get("baseline"), in_tables=False),
    Column("dp", "dp", "layout", _get("layout", "dp")),
    Column("tp", "tp", "layout", _get("layout", "tp")),
    Column("pp", "pp", "layout", _get("layout", "pp")),
    Column("ep", "ep", "layout", lambda r: r["layout"].get("ep", 1)),
    Column(
        "schedule",
        "schedule",
        "layout",
        lambda r: r["layout"]["schedule"] if r["layout"]["pp"] > 1 else None,
    ),
    Column("virtual_stages", "v", "layout", _get("layout", "virtual_stages"), in_tables=False),
    Column("microbatches", "mb", "layout", _get("layout", "microbatches")),
    Column("zero", "ZeRO", "layout", _get("layout", "zero")),
    Column(
        "sequence_parallel",
        "SP",
        "layout",
        _get("layout", "sequence_parallel"),
        lambda v: "yes" if v else "no",
    ),
    Column("recompute", "recompute", "layout", _get("layout", "recompute")),
    Column("dtype", "dtype", "layout", _get("layout", "dtype"), in_tables=False),
    Column("ranks", "ranks", "layout", _get("ranks")),
    Column("final_loss", "final loss", "loss", _get("final_loss"), _fixed(4)),
    Column("val_loss", "val loss", "loss", _get("val_loss"), _fixed(4), in_tables=False),
    Column("max_abs_loss_diff", "max |Δloss|", "loss", _get("max_abs_loss_diff"), "{:.1e}".format),
    Column(
        "step_time_median_s",
        "step ms",
        "speed",
        _get("step_time_median_s"),
        lambda v: f"{v * 1e3:.1f}",
    ),
    Column("tokens_per_s", "tokens/s", "speed", _get("tokens_per_s"), "{:,.0f}".format),
    Column("bubble_fraction", "bubble", "speed", _get("bubble_fraction"), _fixed(3)),
    *[
        Column(f"mem_{c}_bytes", f"{short} MB", "memory", _get("memory_peak_bytes", c), _mb)
        for c, short in zip(
            (*MEMORY, "total"),
            ("params", "grads", "optim", "activ", "gather", "total"),
            strict=True,
        )
    ],
    *[
        Column(
            f"comm_{axis}_bytes_per_step",
            f"{axis} MB/step",
            "comm",
            _get("comm_bytes_per_step", axis, "max"),
            _mb,
        )
        for axis in (*AXES, "total")
    ],
    Column(
        "moe_dropped_fraction",
        "dropped",
        "moe",
        _get("moe", "dropped_fraction"),
        lambda v: f"{v:.2%}",
    ),
    Column("moe_max_imbalance", "max/mean", "moe", _get("moe", "max_imbalance"), _fixed(3)),
    Column(
        "moe_aux_loss",
        "aux loss",
        "moe",
        lambda r: _mean_aux(r["moe"]) if r.get("moe") else None,
        _fixed(4),
    ),
    Column("proj_hardware", "hardware", "projection", _get("projection", "hardware")),
    Column(
        "proj_step_ms",
        "proj. step ms",
        "projection",
        _get("projection", "step_time_s"),
        lambda v: f"{v * 1e3:.3f}",
    ),
    Column(
        "proj_tokens_per_s",
        "proj. tokens/s",
        "projection",
        _get("projection", "tokens_per_s"),
        lambda v: f"{v:,.0f}",
    ),
    Column(
        "proj_tflops",
        "TFLOP/s/GPU",
        "projection",
        _get("projection", "tflops_per_gpu"),
        _significant,
    ),
    Column("proj_mfu", "MFU", "projection", _get("projection", "mfu"), lambda v: f"{v:.1%}"),
    Column(
        "proj_bubble",
        "proj. bubble",
        "projection",
        _get("projection", "bubble_fraction"),
        _fixed(3),
    ),
    Column(
        "proj_memory",
        "GiB/GPU",
        "projection",
        _get("projection", "memory_total_bytes"),
        lambda v: f"{v / 2**30:.3f}",
    ),
    Column(
        "proj_fits",
        "fits",
        "projection",
        _get("projection", "fits"),
        lambda v: "yes" if v else "no",
    ),
    Column("wall_s", "wall s", "id", _get("wall_s"), _fixed(1), in_tables=False),
    Column("error", "error", "id", _get("error"), in_tables=False),
]

# The tables the terminal, Markdown and HTML show: (title, groups). The label column leads each;
# a table whose groups have no columns yet is left out.
TABLES = [
    ("Layouts: equivalence and speed", ("layout", "loss", "speed")),
    (
        "Peak memory per rank (MB, max over ranks) and communication per step (MB, max over ranks)",
        ("memory", "comm"),
    ),
    (
        "Mixture of experts: routed slots over the run, every rank (dropped share, the busiest "
        "expert over the mean, the load-balancing term)",
        ("moe",),
    ),
    (
        "Cost-model projection (the same step on the chosen hardware, one GPU per rank)",
        ("projection",),
    ),
]


def _mean_aux(moe: dict[str, Any]) -> float | None:
    """The mean over layers of each layer's mean load-balancing term (None without one)."""
    values = [row["aux_loss"] for row in moe["layers"] if row["aux_loss"] is not None]
    return float(np.mean(values)) if values else None


def cell(column: Column, row: dict[str, Any]) -> str:
    """The column's text for a row; '-' when there is no value (a failed run, no pipeline)."""
    value = column.value(row)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return column.fmt(value)


def tables(rows: list[dict[str, Any]]) -> list[tuple[str, list[Column]]]:
    """The (title, columns) of each table that has something to show for `rows`: the first
    leads with the label and status, the others with the label only."""
    shown = []
    # The context- and expert-parallel axes are shown once some layout uses them.
    unused = {
        axis for axis in OPTIONAL_AXES if all(r.get("layout", {}).get(axis, 1) == 1 for r in rows)
    }
    hidden = {f"comm_{axis}_bytes_per_step" for axis in unused} | (unused & {"ep"})
    for title, groups in TABLES:
        columns = [c for c in COLUMNS if c.group in groups and c.in_tables]
        columns = [c for c in columns if c.key not in hidden]
        if any(c.value(row) is not None for c in columns for row in rows):
            lead = [c for c in COLUMNS if c.group == "id" and c.in_tables]
            shown.append((title, (lead if not shown else lead[:1]) + columns))
    return shown


# ---- the prose around the tables ------------------------------------------------------------
NOTES = [
    "max |Δloss| is the largest difference between a layout's loss and the single-process "
    "baseline's (same global batch, same seed) over all steps; in float64 it is rounding only.",
    "step ms is the median step time after the first step; tokens/s is the global batch's "
    "tokens over that median.",
    "bubble is the mean over ranks of each rank's idle share of its pipeline phase (pipelined "
    "layouts only).",
    "Memory is the bytes held per rank, each category the max over ranks; total is the largest "
    "rank's sum. activations is the peak of graph activations measured by the engine; gathered "
    "is ZeRO-3's peak of full parameters gathered for one layer at a time.",
    "Communication is the bytes a rank passes to collectives or sends (a message counts once, "
    "at its sender), summed over ops on each axis, totals over the training steps (not the "
    "validation pass) divided by their number; the max over ranks (report.json also has the "
    "mean).",
    "With more ranks than cores, ranks take turns on a core: step times and pipeline timelines "
    "then include the time a rank waits for one.",
    "Mixture of experts: slots routed to each expert before capacity, over every rank's tokens "
    "and the training steps; dropped is the share a per-rank capacity dropped (before the "
    "all-to-all, so it depends on how the batch is split over ranks), max/mean the busiest "
    "expert of the worst layer over the mean, aux loss the mean unweighted load-balancing term "
    "E·Σ f·P (1 when balanced).",
]


def highlights(rows: list[dict[str, Any]]) -> list[str]:
    """A few one-line findings over the sweep's layouts that ran."""
    done = [r for r in rows if r["role"] == "layout" and r["status"] == "ok"]
    lines = []
    if done:
        fast = max(done, key=lambda r: r["tokens_per_s"] or 0)
        lines.append(f"Fastest: {fast['label']} at {fast['tokens_per_s']:,.0f} tokens/s.")
        lean = min(done, key=lambda r: r["memory_peak_bytes"]["total"])
        lines.append(
            f"Least memory per rank: {lean['label']} "
            f"({lean['memory_peak_bytes']['total'] / MB:.2f} MB on its largest rank)."
        )
        quiet = min(done, key=lambda r: r["comm_bytes_per_step"]["total"]["max"])
        lines.append(
            f"Least communication: {quiet['label']} "
            f"({quiet['comm_bytes_per_step']['total']['max'] / MB:.3f} MB per step per rank)."
        )
        diffs = [r["max_abs_loss_diff"] for r in done if r["max_abs_loss_diff"] is not None]
        if diffs:
            lines.append(
                f"Equivalence: the loss of every layout that ran is within {max(diffs):.1e} of "
                "the single-process baseline's at every step."
            )
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines.append(f"Failed: {', '.join(r['label'] for r in failed)}.")
    return lines


# ---- writers ----------------------------------------------------------------------------------
def write_reports(out_dir: Path, report: dict[str, Any]) -> list[Path]:
    """report.json, report.csv, report.md and report.html under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = report["runs"]
    paths = [out_dir / f"report.{ext}" for ext in ("json", "csv", "md", "html")]
    payload = {
        **report,
        "columns": [{"key": c.key, "header": c.header, "group": c.group} for c in COLUMNS],
    }
    paths[0].write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    with paths[1].open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([c.key for c in COLUMNS])
        for row in rows:
            writer.writerow(["" if (v := c.value(row)) is None else v for c in COLUMNS])
    paths[2].write_text(markdown(report), encoding="utf-8")
    paths[3].write_text(html_page(report), encoding="utf-8")
    return paths


def _errors(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(r["label"], r["error"] or "failed") for r in rows if r["status"] == "failed"]


def _md(text: str) -> str:
    return text.replace("|", "\\|")  # a bare | would end the table cell


def markdown(report: dict[str, Any]) -> str:
    rows = report["runs"]
    lines = [f"# civetta compare: {report['config']}", ""]
    lines.append(f"Command: `{report['command']}`  ")
    lines.append(
        f"{len(rows)} runs in {report['wall_s']:.0f} s; each run's directory is beside this file."
    )
    lines.append("")
    lines += [f"- {line}" for line in highlights(rows)]
    for title, columns in tables(rows):
        lines += ["", f"## {title}", ""]
        lines.append("| " + " | ".join(_md(c.header) for c in columns) + " |")
        lines.append("|" + "|".join("---" if c.group == "id" else "--:" for c in columns) + "|")
        for row in rows:
            lines.append("| " + " | ".join(_md(cell(c, row)) for c in columns) + " |")
    errors = _errors(rows)
    if errors:
        lines += ["", "## Failed runs", ""]
        lines += [f"- **{label}**: `{error}`" for label, error in errors]
    lines += ["", "## Notes", ""] + [f"- {note}" for note in NOTES]
    return "\n".join(lines) + "\n"


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { padding: 3px 8px; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; } td.id, th.id { text-align: left; }
tr.failed td { color: #b00; } code { background: #f6f6f6; padding: 0 3px; }
figure { margin: 1em 0; } .note { color: #555; font-size: 0.9em; }
"""


def html_page(report: dict[str, Any]) -> str:
    rows = report["runs"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>civetta compare: {escape(report['config'])}</title><style>{CSS}</style>",
        "</head><body>",
        f"<h1>civetta compare: {escape(report['config'])}</h1>",
        f"<p class='note'>Command: <code>{escape(report['command'])}</code>; "
        f"{len(rows)} runs in {report['wall_s']:.0f} s.</p>",
        "<ul>" + "".join(f"<li>{escape(line)}</li>" for line in highlights(rows)) + "</ul>",
    ]
    for title, columns in tables(rows):
        parts.append(f"<h2>{escape(title)}</h2><table><tr>")
        parts += [f"<th class='{c.group}'>{escape(c.header)}</th>" for c in columns]
        parts.append("</tr>")
        for row in rows:
            parts.append(f"<tr class='{row['status']}'>")
            parts += [f"<td class='{c.group}'>{escape(cell(c, row))}</td>" for c in columns]
            parts.append("</tr>")
        parts.append("</table>")
    errors = _errors(rows)
    if errors:
        parts.append("<h2>Failed runs</h2><ul>")
        parts += [f"<li><b>{escape(k)}</b>: <code>{escape(e)}</code></li>" for k, e in errors]
        parts.append("</ul>")
    parts.append("<h2>Plots</h2>")
    parts += [f"<figure>{svg}</figure>" for svg in figures(rows)]
    parts.append("<h2>Notes</h2><ul class='note'>")
    parts += [f"<li>{escape(note)}</li>" for note in NOTES]
    parts.append("</ul></body></html>")
    return "\n".join(parts) + "\n"


def figures(rows: list[dict[str, Any]]) -> list[str]:
    """The report's plots as inline SVG: loss curves, deviation from the baseline, stacked
    memory per rank, bytes per axis, the pipeline timeline of each pipelined layout and, with
    projections (`compare --hardware`), projected against measured step time."""
    done = [r for r in rows if r["status"] == "ok"]
    if not done:
        return []
    svgs = [
        plots.line_chart(
            [(r["label"], list(range(len(r["losses"]))), r["losses"]) for r in done],
            "Training loss per step",
            "step",
            "loss",
        )
    ]
    by_label = {r["label"]: r for r in done}
    deviations = []
    for r in done:
        reference = by_label.get(r["baseline"] or "")
        if r["role"] == "layout" and reference and len(reference["losses"]) == len(r["losses"]):
            diff = np.abs(np.asarray(r["losses"]) - np.asarray(reference["losses"]))
            deviations.append((r["label"], list(range(len(diff))), diff.tolist()))
    if deviations:
        svgs.append(
            plots.line_chart(
                deviations,
                "|loss − baseline loss| per step (log scale; exact zeros on the floor)",
                "step",
                "|Δloss|",
                log_y=True,
            )
        )
    memory_groups = [
        (
            r["label"],
            [(f"r{m['rank']}", memory_categories(m)) for m in r["memory_per_rank"]],
        )
        for r in done
        if r.get("memory_per_rank")
    ]
    svgs.append(
        plots.stacked_bars(memory_groups, MEMORY, "Memory per rank by category", "MB", scale=MB)
    )
    comm_groups = [
        (r["label"], [("", {axis: r["comm_bytes_per_step"][axis]["max"] for axis in AXES})])
        for r in done
    ]
    svgs.append(
        plots.stacked_bars(
            comm_groups, AXES, "Bytes per step by axis (max over ranks)", "MB/step", scale=MB
        )
    )
    for r in done:
        if not r["pipeline_timelines"]:
            continue
        timelines = r["pipeline_timelines"]
        svgs.append(
            plots.gantt(
                [
                    (f"rank {t['rank']}", [(a, s, e) for a, s, e in t["timeline"]])
                    for t in timelines
                ],
                f"Pipeline timeline of {r['label']} (last step)",
                window=max(t["window_s"] for t in timelines),
            )
        )
    routed = [r for r in done if r.get("moe")]
    if routed:
        svgs.append(
            plots.line_chart(
                [
                    (r["label"], list(range(len(r["moe"]["layers"]))),
                     [row["imbalance"] for row in r["moe"]["layers"]])
                    for r in routed
                ],
                "Expert load per MoE layer: busiest expert's slots over the mean",
                "layer",
                "max/mean",
            )
        )  # fmt: skip
        svgs.append(
            plots.line_chart(
                [
                    (r["label"], list(range(len(r["moe"]["layers"]))),
                     [row["dropped_fraction"] for row in r["moe"]["layers"]])
                    for r in routed
                ],
                "Slots dropped by capacity per MoE layer (share of the routed slots)",
                "layer",
                "dropped",
            )
        )  # fmt: skip
    projected = [
        (r["label"], r["step_time_median_s"], r["projection"]["step_time_s"])
        for r in done
        if r.get("projection") and r["projection"].get("step_time_s") and r["step_time_median_s"]
    ]
    if projected:
        hardware = next(r["projection"].get("hardware") for r in done if r.get("projection"))
        svgs.append(
            plots.projected_vs_measured(
                projected, f"Projected step time on {hardware} against measured, per layout"
            )
        )
    return svgs
