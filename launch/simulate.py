"""`civetta simulate CONFIG --hardware PROFILE [--set ...] [--tokens N] [--json OUT]`.

Projects one training step of an experiment onto a hardware profile with the analytic cost model
(`parallel.cost.projection`); nothing is executed. Prints a report (step time and its breakdown,
TFLOP/s per GPU, MFU and HFU, memory per GPU by category, bytes per axis; for --tokens the run's
days, GPU-hours, dollars and energy, N a count or compute-optimal: `parallel.cost.run_cost`)
and optionally writes JSON.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from civetta.models.llama import LlamaConfig
from launch import tables
from launch.config import ConfigError, ExperimentConfig, load, model_description
from launch.profiles import bare, load_profile
from parallel.cost.coverage import calibration_gaps
from parallel.cost.framework import Framework, FrameworkError, default_framework, framework_from
from parallel.cost.hardware import CostModelError, HardwareProfile
from parallel.cost.projection import CostOptions, Projection, Workload, project
from parallel.cost.run_cost import (
    COMPUTE_OPTIMAL,
    ENERGY_LEGEND,
    RunCost,
    compute_optimal_note,
    parse_tokens,
    resolve_tokens,
    run_cost,
)

GIB = 2**30
MEMORY = ("params", "grads", "optimizer", "activations", "gathered", "reserve", "total")

CONVENTIONS = (
    "Conventions: analytic projection, nothing executed. Memory in binary units (GiB = 2^30 "
    "bytes), traffic in decimal units (GB = 10^9 bytes), per GPU. TFLOP/s per GPU and MFU "
    "count model FLOPs (forward + backward: matmuls, attention over the full s×s matrix); HFU "
    "also counts recomputation; both against "
    "the dense peak of train.dtype. Bubble = idle pipeline time as a fraction of the whole step "
    "(not of the compute time). Bytes per axis follow civetta's ledger: the buffer each rank "
    "passes (all-reduce input, all-gather shard, reduce-scatter input, sent messages), per step, "
    "for the busiest GPU of each axis, the log's loss averaging excluded."
)


def workload_of(config: ExperimentConfig, moe_imbalance: float = 1.0) -> Workload:
    """What the step computes beside its layout, from the config (and the routing assumption
    of a mixture of experts, `--moe-imbalance`)."""
    return Workload(
        dtype=config.train.dtype, optimizer=config.train.optimizer, moe_imbalance=moe_imbalance
    )


def framework_of(config: ExperimentConfig, profile: HardwareProfile) -> Framework:
    """The software the projection assumes: the config's preset (default: civetta's executor
    on the `local` profile, `generic` elsewhere), what the profile's calibration says of that
    preset on this cluster (`frameworks:`), then the config's own `framework.<key>`s."""
    chosen = config.framework
    try:
        base = framework_from(chosen.preset, {}, default_framework(profile.name))
        calibrated = profile.frameworks.get(base.name, {})
        if calibrated:
            base = dataclasses.replace(framework_from(base.name, calibrated, base), name=base.name)
        return framework_from(None, chosen.overrides(), base)
    except FrameworkError as exc:
        raise ConfigError(str(exc)) from None


def simulate(
    config: ExperimentConfig,
    profile: HardwareProfile,
    options: CostOptions | None = None,
    moe_imbalance: float = 1.0,
) -> Projection:
    options = options or framework_of(config, profile)
    try:
        work = workload_of(config, moe_imbalance)
        return project(model_description(config), config.layout, profile, options, work)
    except CostModelError as exc:
        raise ConfigError(bare(exc)) from None


def routing_assumption(config: ExperimentConfig, moe_imbalance: float) -> str:
    """The line that states how a mixture of experts was assumed to route."""
    if config.parallel.ep == 1 or moe_imbalance == 1.0:
        return (
            "routing: balanced (every expert gets the mean of the slots); --moe-imbalance F "
            "sends the busiest expert-parallel rank F times the mean"
        )
    return (
        f"routing: the busiest expert-parallel rank gets {moe_imbalance:g} × the mean of the "
        "slots (--moe-imbalance), and the step waits for it; model FLOPs are the balanced total"
    )


def report_dict(
    config: ExperimentConfig,
    profile: HardwareProfile,
    projection: Projection,
    tokens: int | None,
) -> dict[str, Any]:
    """What --json writes: the projection, the conventions, and the training cost for --tokens."""
    out: dict[str, Any] = projection.as_dict()
    out["hardware"] = profile.name
    out["framework"] = dataclasses.asdict(framework_of(config, profile))
    out["framework"].pop("replay")
    out["price_per_gpu_hour"] = profile.price_per_gpu_hour
    out["gpus_per_node"] = profile.gpus_per_node
    out["per_billion_tokens"] = projection.training(10**9, profile)
    out["training"] = projection.training(tokens, profile) if tokens else None
    out["conventions"] = CONVENTIONS
    out["layout"] = config.layout.as_dict()
    out["config"] = config.to_dict()
    return out


# ---- the report ---------------------------------------------------------------------------------
def _seconds(value: float) -> str:
    if value >= 1:
        return f"{value:.3f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.2f} ms"
    return f"{value * 1e6:.1f} µs"


def _duration(seconds: float) -> str:
    days = seconds / 86400
    return f"{days:.1f} days" if days >= 1 else f"{seconds / 3600:.2f} hours"


def _gib(nbytes: float) -> str:
    """Memory, binary units."""
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB / 10 else f"{nbytes / 2**20:.2f} MiB"


def _traffic(nbytes: float) -> str:
    """Bytes on links, decimal units."""
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"


def _count(n: float) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


FAMILY_NAMES = {"gpt": "GPT", "llama": "Llama"}


def _days(seconds: float) -> str:
    """Days, and hours too when under one."""
    days = seconds / 86400
    return f"{days:,.1f} days" if days >= 1 else f"{days:.3f} days ({_duration(seconds)})"


def _energy(run: RunCost) -> str:
    if run.energy_kwh is None:
        return "unknown (the profile gives no board_power_w and pue)"
    return f"{run.energy_kwh:,.0f} kWh (GPU boards at {run.board_power_w:g} W, PUE {run.pue:g})"


def render_training(
    console: Console,
    profile: HardwareProfile,
    pr: Projection,
    tokens: int | None,
    note: str = "",
) -> None:
    """The cost of 10^9 tokens, and of the whole run when --tokens is given (`note`: how
    compute-optimal was counted)."""
    price = profile.price_per_gpu_hour
    per_b = run_cost(pr, 10**9, profile)
    console.print(
        f"per 10^9 tokens: {per_b.gpu_hours:,.1f} GPU-hours, ${per_b.cost:,.0f} "
        f"at ${price:.2f} per GPU-hour (the profile's assumed price)"
    )
    if not tokens:
        return
    run = run_cost(pr, tokens, profile)
    console.print(
        f"[bold]training on {tokens:,} tokens[/bold]: {run.steps:,} step{'s' * (run.steps > 1)} of "
        f"{pr.tokens_per_step:,} tokens"
    )
    if note:
        console.print(f"  ({note})")
    rows = [
        ("wall-clock", f"{_days(run.wall_time_s)} on {run.gpus} GPUs"),
        ("GPU-hours", f"{run.gpu_hours:,.0f}"),
        ("cost", f"[bold]${run.cost:,.0f}[/bold] at ${price:.2f} per GPU-hour"),
        ("energy", _energy(run)),
    ]
    for label, value in rows:
        console.print(f"  {label:<11}{value}")
    if run.energy_kwh is not None:
        console.print(f"[dim]{ENERGY_LEGEND}[/dim]")


def render(
    console: Console,
    config_path: str,
    config: ExperimentConfig,
    profile: HardwareProfile,
    pr: Projection,
    tokens: int | None,
    tokens_note: str = "",
) -> None:
    model, p = config.model, config.parallel
    description = model_description(config)
    params = description.num_parameters()
    nodes = -(-pr.world_size // profile.gpus_per_node)
    console.print(
        f"[bold]civetta simulate[/bold] {config_path} on [bold]{profile.name}[/bold] "
        f"({profile.device.name}, {profile.gpus_per_node} per node)"
    )
    heads = f"{model.n_head} heads"
    active = ""
    if isinstance(description, LlamaConfig) and description.moe is not None:
        moe = description.moe
        heads += f" ({model.n_kv_head} key/value), {moe.experts} experts × {moe.ffn_hidden}"
        heads += f" (top {moe.top_k})"
        active = f" ({_count(description.active_parameters())} active)"
    elif model.kind == "llama":
        heads += f" ({model.n_kv_head} key/value), MLP {model.ffn_hidden}"
    console.print(
        f"{FAMILY_NAMES[model.kind]} {_count(params)} parameters{active}: {model.n_layer} layers, "
        f"hidden {model.n_embd}, {heads}, sequence {model.block_size}, vocabulary "
        f"{model.vocab_size}; {config.train.dtype}, {config.train.optimizer}"
    )
    sp = ", sequence parallel" if p.sequence_parallel else ""
    sp += f", experts over ep={p.ep}" if p.ep > 1 else ""
    pipe = f", {p.schedule}" + (f" v={p.virtual_stages}" if p.virtual_stages > 1 else "")
    console.print(
        f"layout dp={p.dp} × tp={p.tp} × pp={p.pp}"
        + (f" × cp={p.cp} ({p.cp_comm})" if p.cp > 1 else "")
        + f" = {pr.world_size} GPUs on {nodes} nodes "
        f"(order {p.order}); batch {config.train.batch_size} = {p.dp} × "
        f"{config.microbatches} microbatches × {config.microbatch_size}{pipe if p.pp > 1 else ''}"
        f"; ZeRO {p.zero}, recompute {p.recompute}{sp}"
    )
    for axis, link in pr.links.items():
        console.print(f"  {axis} groups: {link}")
    framework = framework_of(config, profile)
    console.print(f"framework {framework.describe()}")
    gaps = calibration_gaps(profile, config.layout, framework.name, config.train.dtype)
    if gaps:
        console.print(
            f"[yellow]outside what {profile.name}'s calibration covers (extrapolated): "
            f"{', '.join(gaps)}[/yellow]"
        )

    labels = {
        "compute": "compute (GEMMs + elementwise)",
        "optimizer": "optimizer step",
        "tp_exposed": "tensor-parallel comm (exposed)",
        "cp_exposed": "context-parallel comm (exposed)",
        "ep_exposed": "expert-parallel all-to-all (exposed)",
        "pp_exposed": "pipeline p2p (exposed)",
        "dp_exposed": "data-parallel comm (exposed)",
        "bubble": "pipeline bubble",
    }
    if config.parallel.cp == 1:
        del labels["cp_exposed"]
    if config.parallel.ep == 1:
        del labels["ep_exposed"]
    parts = [
        [label, _seconds(pr.breakdown_s[key]), f"{pr.breakdown_s[key] / pr.step_time_s:.1%}"]
        for key, label in labels.items()
    ]
    parts.append(["[bold]step[/bold]", f"[bold]{_seconds(pr.step_time_s)}[/bold]", "100%"])
    fields = [tables.Field("part", justify="left"), tables.Field("time"), tables.Field("share")]
    tables.print_table(console, "Step time", fields, parts)

    console.print(
        f"throughput {pr.tokens_per_s:,.0f} tokens/s; model {pr.tflops_per_gpu:.3g} TFLOP/s per "
        f"GPU, MFU {pr.mfu:.1%}; with recomputation {pr.hardware_tflops_per_gpu:.3g} TFLOP/s, "
        f"HFU {pr.hfu:.1%}; bubble {pr.bubble_fraction:.1%} of the step"
    )
    if pr.pipeline_model == "replay":
        console.print(
            f"pipeline: the {p.schedule} schedule replayed event by event with each stage's "
            "compute and each message's p2p time"
        )
    elif pr.pipeline_model == "closed form":
        console.print("pipeline: closed-form bubble (the schedule is too long to replay quickly)")

    memory = [[key, _gib(pr.memory_per_gpu[key])] for key in MEMORY]
    fields = [tables.Field("category", justify="left"), tables.Field("bytes")]
    tables.print_table(console, "Memory per GPU", fields, memory)
    margin = pr.memory_capacity_bytes - pr.memory_per_gpu["total"]
    verdict = "[green]fits[/green]" if pr.fits else "[red]does not fit[/red]"
    by = f"{_gib(margin)} to spare" if pr.fits else f"{_gib(-margin)} over"
    console.print(
        f"{verdict} (busiest pipeline stage), {by}: {_gib(pr.memory_per_gpu['total'])} of "
        f"{_gib(pr.memory_capacity_bytes)} usable "
        f"({profile.device.memory_gib:g} GiB minus {profile.device.memory_reserved_gib:g} reserved)"
    )
    axes = ("tp", "pp", "dp", *(("cp",) if config.parallel.cp > 1 else ()))
    axes += ("ep",) if config.parallel.ep > 1 else ()
    comm = ", ".join(f"{axis} {_traffic(pr.comm_bytes[axis])}" for axis in axes)
    console.print(f"bytes per GPU per step: {comm}")

    render_training(console, profile, pr, tokens, tokens_note)
    console.print(f"[dim]{CONVENTIONS}[/dim]")


def _parsed_tokens(value: int | str) -> int | str:
    try:
        return parse_tokens(value)
    except CostModelError as exc:
        raise ConfigError(bare(exc)) from None


def simulate_command(
    config_path: str,
    hardware: str,
    overrides: Sequence[str] = (),
    tokens: int | str | None = None,
    json_out: str | Path | None = None,
    console: Console | None = None,
    moe_imbalance: float = 1.0,
) -> int:
    """Project CONFIG onto the hardware profile, print the report, write JSON; exit code.
    `tokens`: a count (300e9, 300B, 1.5T as `parse_tokens` reads them) or compute-optimal.

    Bad configs, profiles or arguments raise ConfigError (one line) for the CLI to print.
    """
    console = console or tables.cli_console()
    wanted = None if tokens is None else _parsed_tokens(tokens)
    config = load(config_path, list(overrides))
    try:
        profile = load_profile(hardware)
    except CostModelError as exc:
        raise ConfigError(bare(exc)) from None
    projection = simulate(config, profile, moe_imbalance=moe_imbalance)
    tokens, note = None, ""
    if wanted is not None:
        description = model_description(config)
        tokens = resolve_tokens(wanted, description)
        note = compute_optimal_note(description) if wanted == COMPUTE_OPTIMAL else ""
    render(console, str(config_path), config, profile, projection, tokens, note)
    if config.model.moe is not None:
        console.print(routing_assumption(config, moe_imbalance))
    if json_out is not None:
        out = Path(json_out)
        if out.is_dir():
            raise ConfigError(f"--json {str(out)!r} is a directory")
        out.parent.mkdir(parents=True, exist_ok=True)
        data = report_dict(config, profile, projection, tokens)
        out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        console.print(f"wrote {out}")
    return 0
