"""`civetta tune MODEL.yaml --hardware PROFILE --gpus N [--batch B] [--set ...] [--top K]
[--objective throughput|cost|time] [--tokens T] [--budget B] [--json OUT]`: the best ways to
split one model over N GPUs, by the cost model.

`--gpus` is one count (1024), a list (512,1024,2048) or a doubling range (256-4096: 256, 512,
..., 4096, each count twice the one before, up to the end), or a list of those. Over several
counts `--objective` says what wins: throughput (tokens/s per GPU, the default), cost
(GPU-hours, hence dollars at the profile's price) or time (wall-clock days for `--tokens`,
default compute-optimal). `--budget` drops the layouts whose run costs more: 200000gpuh or
200kgpuh (GPU-hours), 1.5Musd or '$1.5M' (dollars; quote the $ from the shell).

The model, dtype, optimizer, sequence length and bucket size come from the experiment config;
its `parallel:` section is ignored (that is what the tuner chooses), except what the command
line sets: `--set parallel.tp=8` or `--set parallel.zero=1` holds that choice fixed and searches
the rest (likewise dp, pp, schedule, virtual_stages, recompute, sequence_parallel, order and
train.microbatch_size). The search and the explanation are `parallel.cost.tuning`; this module
loads, renders and writes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from launch import tables
from launch.config import ConfigError, ExperimentConfig, load, model_description
from launch.fit import calibration_gaps
from launch.profiles import bare, load_profile
from launch.simulate import framework_of, workload_of
from parallel.cost.hardware import CostModelError, HardwareProfile
from parallel.cost.run_cost import (
    COMPUTE_OPTIMAL,
    Budget,
    compute_optimal_note,
    parse_budget,
    parse_tokens,
    resolve_tokens,
)
from parallel.cost.tuning import OBJECTIVES, Ranked, SearchSpace, TuneResult, tune, tune_counts

GIB = 2**30

CONVENTIONS = (
    "Conventions: analytic projections, nothing executed; ranked by tokens per second (the "
    "same global batch for every layout). TFLOP/s per GPU and MFU count model FLOPs against "
    "the dense peak of train.dtype; memory is the busiest GPU's, GiB = 2^30 bytes; bubble = idle "
    "pipeline time over the step. The best layouts are replayed with the actual schedule, the "
    "rest ranked with the closed-form bubble."
)


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} expected a positive integer, got {value!r}")
    return value


GPUS_EXPECTED = "a positive integer, a list (512,1024) or a doubling range (256-4096)"


def parse_gpus(value: int | str | Sequence[int]) -> tuple[int, ...]:
    """--gpus as GPU counts, once each in the order given: 1024; 512,1024,2048; 256-4096 (256
    doubled while it stays within 4096: 256, 512, 1024, 2048, 4096); items may mix."""
    if isinstance(value, int) or (isinstance(value, Sequence) and not isinstance(value, str)):
        counts = [value] if isinstance(value, int) else list(value)
        return tuple(dict.fromkeys(_positive("--gpus", n) for n in counts))
    counts = []
    for item in str(value).split(","):
        first, dash, last = item.strip().partition("-")
        if not (first.isdigit() and (not dash or last.isdigit())):
            raise ConfigError(f"--gpus expected {GPUS_EXPECTED}, got {value!r}")
        low, high = int(first), int(last or first)
        if low < 1 or high < low:
            raise ConfigError(
                f"--gpus expected {GPUS_EXPECTED} of positive counts, low to high, got {value!r}"
            )
        while low <= high:
            counts.append(low)
            low *= 2
    return tuple(dict.fromkeys(counts))


def search_space(
    config: ExperimentConfig, overrides: list[str], moe_imbalance: float = 1.0
) -> SearchSpace:
    """The tuner's space, with every parallel choice the command line sets held fixed (and,
    under a routing imbalance F, no ep below F: the busiest rank cannot take more than all)."""
    keys = {item.split("=", 1)[0].strip() for item in overrides}
    p = config.parallel
    fixed: dict[str, Any] = {}
    for key in ("dp", "tp", "pp", "virtual_stages", "cp", "ep"):
        if f"parallel.{key}" in keys:
            fixed[key] = getattr(p, key)
    if "parallel.tp" in keys:
        fixed["max_tp"] = p.tp  # asked for: allowed even across nodes
    choices = {
        "parallel.schedule": ("schedules", p.schedule),
        "parallel.cp_comm": ("cp_comms", p.cp_comm),
        "parallel.zero": ("zero_stages", p.zero),
        "parallel.recompute": ("recompute", p.recompute),
        "parallel.sequence_parallel": ("sequence_parallel", p.sequence_parallel),
    }
    for key, (name, value) in choices.items():
        if key in keys:
            fixed[name] = (value,)
    if "parallel.order" in keys:
        fixed["order"] = p.order
    if "train.microbatch_size" in keys:
        fixed["microbatch_size"] = config.train.microbatch_size
    fixed["min_ep"] = moe_imbalance
    return SearchSpace(**fixed)


def _step(seconds: float) -> str:
    return f"{seconds:.2f}" if seconds >= 1 else f"{seconds:.3g}"


# The table's columns: the rank and the mesh lead every part when the table is split to fit
# the console; the legend under it spells out the short headers.
FIELDS = [
    tables.Field("#"),
    tables.Field("dp×tp×pp"),
    tables.Field("mb×m", "layout"),
    tables.Field("schedule", "layout", "left"),
    tables.Field("ZeRO", "layout"),
    tables.Field("recompute", "layout", "left"),
    tables.Field("SP", "layout"),
    *(tables.Field(h, "projection") for h in ("step s", "tokens/s", "TFLOP/s", "MFU", "bubble")),
    tables.Field("GiB", "projection"),
]
LEGEND = (
    "mb×m = microbatch size × microbatches per step",
    "SP = sequence parallelism",
    "TFLOP/s and GiB (2^30 bytes) per GPU",
)
# With a run to cost: the GPUs lead every part too, then the run's days, GPU-hours and
# dollars (what the objective ranks), then the layout and its step.
RUN_FIELDS = [
    FIELDS[0],
    tables.Field("GPUs"),
    FIELDS[1],
    *(tables.Field(h, "run") for h in ("days", "GPU-hours", "$")),
    *FIELDS[2:],
]


def _run_row(rank: int, r: Ranked) -> list[str]:
    row = _row(rank, r)
    run = r.run
    assert run is not None
    days = f"{run.days:,.1f}" if run.days >= 10 else f"{run.days:.3g}"
    cells = [days, f"{run.gpu_hours:,.0f}", f"{run.cost:,.0f}"]
    return [row[0], str(run.gpus), row[1], *cells, *row[2:]]


def conventions(result: TuneResult) -> str:
    """The conventions line, saying what this search ranked by and what a run counts."""
    if result.tokens is None:
        return CONVENTIONS
    ranked = {
        "throughput": "tokens per second per GPU",
        "cost": "the run's GPU-hours (dollars at the profile's one price)",
        "time": "the run's wall-clock time",
    }[result.objective]
    run = (
        f"Days, GPU-hours and $ are for {result.tokens:,} tokens at the projected step (no "
        "evaluation, checkpoints or restarts), $ at the profile's assumed price per GPU-hour."
    )
    head = "ranked by tokens per second (the same global batch for every layout)."
    return CONVENTIONS.replace(head, f"ranked by {ranked}. {run}")


def coverage_lines(
    shown: Sequence[Ranked], profile: HardwareProfile, framework: str, dtype: str
) -> list[str]:
    """Which shown layouts lie outside every calibration of the profile (`civetta fit`'s
    coverage), and in what: their projection extrapolates the fitted numbers."""
    if not profile.calibration:
        return [
            f"[yellow]{profile.name} has no calibration: every projection is uncalibrated[/yellow]"
        ]
    lines = []
    for rank, r in enumerate(shown, start=1):
        gaps = calibration_gaps(profile, r.layout, framework, dtype)
        if gaps:
            lines.append(f"  #{rank}: {', '.join(gaps)}")
    if not lines:
        return [f"every layout shown is within what {profile.name}'s calibration covers"]
    head = f"[yellow]outside what {profile.name}'s calibration covers (extrapolated):[/yellow]"
    return [head, *lines]


def _row(rank: int, r: Ranked) -> list[str]:
    lay, pr = r.layout, r.projection
    schedule = "-" if lay.pp == 1 else lay.schedule
    if lay.virtual_stages > 1:
        schedule += f" v={lay.virtual_stages}"
    return [
        str(rank),
        f"{lay.dp}×{lay.tp}×{lay.pp}"
        + (f" cp{lay.cp} {lay.cp_comm}" if lay.cp > 1 else "")
        + (f" ep{lay.ep}" if lay.ep > 1 else ""),
        f"{lay.microbatch_size}×{lay.microbatches}",
        schedule,
        str(lay.zero),
        lay.recompute,
        "on" if lay.sequence_parallel else "",
        _step(pr.step_time_s),
        f"{pr.tokens_per_s:,.0f}",
        f"{pr.tflops_per_gpu:.3g}",
        f"{pr.mfu:.1%}",
        f"{pr.bubble_fraction:.1%}",
        f"{pr.memory_per_gpu['total'] / GIB:.1f}",
    ]


def _where(gpus: int | Sequence[int], profile_name: str, gpus_per_node: int) -> str:
    """'1024 × a100-dgx (128 nodes of 8)', or '512, 1024 GPUs of a100-dgx (8 per node)'."""
    if isinstance(gpus, int):
        nodes = -(-gpus // gpus_per_node)
        return f"{gpus} × [bold]{profile_name}[/bold] ({nodes} nodes of {gpus_per_node})"
    counts = ", ".join(map(str, gpus))
    return f"{counts} GPUs of [bold]{profile_name}[/bold] ({gpus_per_node} per node)"


def render(
    console: Console,
    config_path: str,
    profile_name: str,
    gpus: int | Sequence[int],
    batch: int,
    dtype: str,
    result: TuneResult,
    top: int,
    gpus_per_node: int,
    note: str = "",
) -> None:
    console.print(
        f"[bold]civetta tune[/bold] {config_path} on {_where(gpus, profile_name, gpus_per_node)}"
        f", batch {batch} sequences, {dtype}"
    )
    console.print(
        f"{result.enumerated:,} layouts enumerated, {result.fitting:,} fit in memory (each "
        f"with its least recomputation), the best {result.replays or result.replayed} replayed "
        "with their schedule"
    )
    if not result.ranked:
        for line in result.explanation:
            console.print(f"[red]{line}[/red]")
        return
    shown = result.ranked[:top]
    if result.tokens is None:
        rows = [_row(i, r) for i, r in enumerate(shown, start=1)]
        fields, lead = FIELDS, 2
    else:
        rows = [_run_row(i, r) for i, r in enumerate(shown, start=1)]
        fields, lead = RUN_FIELDS, 3
        budget = f" within {result.budget.describe()}" if result.budget else ""
        console.print(f"ranked by {result.objective}{budget}, for {result.tokens:,} tokens")
        if note:
            console.print(f"({note})")
    tables.print_table(console, f"Top {len(rows)} layouts", fields, rows, lead=lead, legend=LEGEND)
    for line in result.explanation:
        console.print(line)
    console.print(f"[dim]{conventions(result)}[/dim]")


def tune_command(
    config_path: str,
    hardware: str,
    gpus: int | str | Sequence[int],
    batch: int | None = None,
    overrides: Sequence[str] = (),
    top: int = 10,
    json_out: str | Path | None = None,
    console: Console | None = None,
    moe_imbalance: float = 1.0,
    objective: str | None = None,
    tokens: int | str | None = None,
    budget: str | None = None,
) -> int:
    """Search the layouts of CONFIG's model on `gpus` GPUs of `hardware` (one count or several,
    `parse_gpus`); print the best `top` and why the first wins; write them to `json_out`.
    With an objective, tokens, a budget or several counts, each layout's run is costed
    (tokens default: compute-optimal). Bad arguments raise ConfigError."""
    console = console or tables.cli_console()
    counts = parse_gpus(gpus)
    _positive("--top", top)
    if objective is not None and objective not in OBJECTIVES:
        raise ConfigError(
            f"--objective expected one of {' | '.join(OBJECTIVES)}, got {objective!r}"
        )
    try:
        wanted = None if tokens is None else parse_tokens(tokens)
        cap = None if budget is None else parse_budget(budget)
    except CostModelError as exc:
        raise ConfigError(bare(exc)) from None
    first = counts[0]  # the one count of a plain search
    costed = len(counts) > 1 or any(x is not None for x in (objective, wanted, cap))
    config = load(config_path, list(overrides))
    batch = _positive("--batch", config.train.batch_size if batch is None else batch)
    try:
        profile = load_profile(hardware)
        model = model_description(config)
        # What the tuner does not choose comes from the config: dtype, optimizer, buckets.
        work = workload_of(config, moe_imbalance)
        framework = framework_of(config, profile)
        space = search_space(config, list(overrides), moe_imbalance)
        note, run_tokens = "", None
        if costed:
            wanted = COMPUTE_OPTIMAL if wanted is None else wanted
            run_tokens = resolve_tokens(wanted, model)
            note = compute_optimal_note(model) if wanted == COMPUTE_OPTIMAL else ""
            result = tune_counts(
                model, profile, counts, batch, config.layout, space, framework, work=work,
                objective=objective or "throughput", tokens=run_tokens, budget=cap,
            )  # fmt: skip
        else:
            result = tune(model, profile, first, batch, config.layout, space, framework, work=work)
    except CostModelError as exc:
        raise ConfigError(bare(exc)) from None
    shown_gpus: int | tuple[int, ...] = counts[0] if len(counts) == 1 else counts
    render(
        console,
        str(config_path),
        profile.name,
        shown_gpus,
        batch,
        work.dtype,
        result,
        top,
        profile.gpus_per_node,
        note,
    )
    console.print(f"framework {framework.describe()}")
    for line in coverage_lines(result.ranked[:top], profile, framework.name, work.dtype):
        console.print(line)
    if json_out is not None:
        write_json(Path(json_out), profile.name, shown_gpus, batch, result, top, cap)
        console.print(f"wrote {json_out}")
    return 0


def write_json(
    out: Path,
    hardware: str,
    gpus: int | tuple[int, ...],
    batch: int,
    result: TuneResult,
    top: int,
    budget: Budget | None,
) -> None:
    """The ranking as JSON: `gpus` is the count, or the list of counts searched; each layout
    carries its `run` (days, GPU-hours, dollars, kWh) when the search costed one."""
    if out.is_dir():
        raise ConfigError(f"--json {str(out)!r} is a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "hardware": hardware,
        "gpus": gpus if isinstance(gpus, int) else list(gpus),
        "batch": batch,
        "enumerated": result.enumerated,
        "fitting": result.fitting,
        "replayed": result.replayed,
        "explanation": result.explanation,
        "layouts": [_entry(r) for r in result.ranked[:top]],
        "conventions": conventions(result),
    }
    if result.tokens is not None:
        data["objective"] = result.objective
        data["tokens"] = result.tokens
        data["budget"] = None if budget is None else {"amount": budget.amount, "unit": budget.unit}
        data["over_budget"] = result.over_budget
    out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _entry(r: Ranked) -> dict[str, Any]:
    entry: dict[str, Any] = {"layout": r.layout.as_dict(), "projection": r.projection.as_dict()}
    if r.run is not None:
        entry["gpus"] = r.run.gpus
        entry["run"] = r.run.as_dict()
    return entry
