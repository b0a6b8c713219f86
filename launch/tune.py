"""`civetta tune MODEL.yaml --hardware PROFILE --gpus N [--batch B] [--set ...] [--top K]
[--json OUT]`: the best ways to split one model over N GPUs, by the cost model.

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
from launch.profiles import bare, load_profile
from launch.simulate import workload_of
from parallel.cost.hardware import CostModelError
from parallel.cost.tuning import Ranked, SearchSpace, TuneResult, tune

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


def render(
    console: Console,
    config_path: str,
    profile_name: str,
    gpus: int,
    batch: int,
    dtype: str,
    result: TuneResult,
    top: int,
    gpus_per_node: int,
) -> None:
    nodes = -(-gpus // gpus_per_node)
    console.print(
        f"[bold]civetta tune[/bold] {config_path} on {gpus} × [bold]{profile_name}[/bold] "
        f"({nodes} nodes of {gpus_per_node}), batch {batch} sequences, {dtype}"
    )
    console.print(
        f"{result.enumerated:,} layouts enumerated, {result.fitting:,} fit in memory (each "
        f"with its least recomputation), the best {result.replayed} replayed with their "
        "schedule"
    )
    if not result.ranked:
        for line in result.explanation:
            console.print(f"[red]{line}[/red]")
        return
    rows = [_row(i, r) for i, r in enumerate(result.ranked[:top], start=1)]
    title = f"Top {len(rows)} layouts"
    tables.print_table(console, title, FIELDS, rows, lead=2, legend=LEGEND)
    for line in result.explanation:
        console.print(line)
    console.print(f"[dim]{CONVENTIONS}[/dim]")


def tune_command(
    config_path: str,
    hardware: str,
    gpus: int,
    batch: int | None = None,
    overrides: Sequence[str] = (),
    top: int = 10,
    json_out: str | Path | None = None,
    console: Console | None = None,
    moe_imbalance: float = 1.0,
) -> int:
    """Search the layouts of CONFIG's model on `gpus` GPUs of `hardware`; print the best `top`
    and why the first wins; write them to `json_out`. Bad arguments raise ConfigError."""
    console = console or tables.cli_console()
    _positive("--gpus", gpus)
    _positive("--top", top)
    config = load(config_path, list(overrides))
    batch = _positive("--batch", config.train.batch_size if batch is None else batch)
    try:
        profile = load_profile(hardware)
        model = model_description(config)
        # What the tuner does not choose comes from the config: dtype, optimizer, buckets.
        work = workload_of(config, moe_imbalance)
        space = search_space(config, list(overrides), moe_imbalance)
        result = tune(model, profile, gpus, batch, config.layout, space, work=work)
    except CostModelError as exc:
        raise ConfigError(bare(exc)) from None
    render(
        console,
        str(config_path),
        profile.name,
        gpus,
        batch,
        work.dtype,
        result,
        top,
        profile.gpus_per_node,
    )
    if json_out is not None:
        out = Path(json_out)
        if out.is_dir():
            raise ConfigError(f"--json {str(out)!r} is a directory")
        out.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "hardware": profile.name,
            "gpus": gpus,
            "batch": batch,
            "enumerated": result.enumerated,
            "fitting": result.fitting,
            "replayed": result.replayed,
            "explanation": result.explanation,
            "layouts": [
                {"layout": r.layout.as_dict(), "projection": r.projection.as_dict()}
                for r in result.ranked[:top]
            ],
            "conventions": CONVENTIONS,
        }
        out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        console.print(f"wrote {out}")
    return 0
