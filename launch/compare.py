"""`civetta compare CONFIG`: the single-process baseline and every layout of the sweep, one report.

Each run is its own `python -m launch train RUN/config.yaml --out RUN` subprocess, so a
multi-rank layout gets its own mpiexec and a layout that crashes or aborts cannot take the
others down: it is reported as failed, with its one-line error, and the rest still run. Runs go
one at a time, so no layout's timings are disturbed by another's. The baseline is the layout's
config with dp = tp = pp = 1 (same global batch, seed and data), run once per distinct set of
non-parallel settings.

`CIVETTA_COMPARE_FAULT="LABEL:rank=R,step=S[,kind=...]"` sets `CIVETTA_FAULT` (see
launch/faults.py) for the run named LABEL only; the tests use it to fail one layout.
"""

from __future__ import annotations

import copy
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from civetta.data import load_dataset
from launch import launcher, report, tables
from launch.config import (
    ConfigError,
    ExperimentConfig,
    ParallelConfig,
    from_dict,
    load_experiment,
    model_description,
)
from launch.profiles import bare, load_profile
from launch.simulate import framework_of, workload_of
from parallel.cost.hardware import CostModelError, HardwareProfile
from parallel.cost.projection import project

FAULT_ENV = "CIVETTA_COMPARE_FAULT"
# Variables an MPI launcher sets in its ranks: a run started from inside an MPI job must not
# believe it is one of that job's ranks.
MPI_ENV_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "MPI_LOCALNRANKS", "MPI_LOCALRANKID", "HYDRA_")


@dataclass
class Run:
    label: str
    role: str  # "baseline" | "layout"
    config: ExperimentConfig
    run_dir: Path
    baseline: str | None = None  # the label of the baseline run this layout is held against
    status: str = "pending"
    error: str | None = None
    wall_s: float = 0.0
    metrics: dict[str, Any] | None = None


def baseline_config(config: ExperimentConfig) -> ExperimentConfig:
    """`config` on one process: dp = tp = pp = 1, no ZeRO, SP or recompute, one microbatch.
    The global batch, seed, data and model stay, so every step sees the same sequences."""
    single = copy.deepcopy(config)
    single.parallel = ParallelConfig(bucket_mb=config.parallel.bucket_mb)
    single.train.microbatch_size = None
    return from_dict(single.to_dict(), origin="the baseline")  # re-checked like any config


def plan_runs(
    base: ExperimentConfig, layouts: list[tuple[str, ExperimentConfig]], out_dir: Path
) -> list[Run]:
    """Baselines first, then the layouts. Without a sweep the base config is the one layout."""
    if not layouts:
        layouts = [(base.layout.label, base)]
    baselines: dict[str, Run] = {}
    runs = []
    for label, config in layouts:
        single = baseline_config(config)
        key = yaml.safe_dump(single.to_dict(), sort_keys=True)
        if key not in baselines:
            name = "baseline" if not baselines else f"baseline-{len(baselines) + 1}"
            baselines[key] = Run(name, "baseline", single, out_dir / name)
        runs.append(Run(label, "layout", config, out_dir / label, baseline=baselines[key].label))
    return [*baselines.values(), *runs]


def run_environment(label: str) -> dict[str, str]:
    """The run's environment: one BLAS thread per process unless the user set it, as every rank
    of a multi-rank layout gets, so the baseline is not timed with threads the layouts lack
    (measured: multi-threaded BLAS on these small matrices is also 6x slower on 2 cores)."""
    env = launcher.rank_environment()
    env = {k: v for k, v in env.items() if not k.startswith(MPI_ENV_PREFIXES)}
    scoped = env.pop(FAULT_ENV, "")
    target, _, spec = scoped.partition(":")
    if scoped and target == label:
        env["CIVETTA_FAULT"] = spec
    return env


def first_error_line(stderr: str, code: int) -> str:
    """The run's one-line error: its first `error:` line, else its last line, else the code."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("error:"):
            return line
    return lines[-1] if lines else f"error: exit code {code}"


def execute(run: Run, mpiexec: str | None, timeout_s: float | None = None) -> None:
    """Run one config through `civetta train` in a subprocess; fill status, error, metrics.

    The run gets its own process group, so a timeout (or Ctrl-C here) ends its mpiexec and
    every rank with it, not just the `civetta train` at the top.
    """
    run.run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run.run_dir / "config.yaml"
    config_path.write_text(
        f"# {run.label}: written by civetta compare\n"
        + yaml.safe_dump(run.config.to_dict(), sort_keys=False),
        encoding="utf-8",
    )
    metrics_path = run.run_dir / "metrics.json"
    metrics_path.unlink(missing_ok=True)  # a stale file must not pass for this run's result
    command = [sys.executable, "-m", "launch", "train", str(config_path)]
    command += ["--out", str(run.run_dir)]
    if mpiexec:
        command += ["--mpiexec", mpiexec]
    started = time.perf_counter()
    timed_out = False
    with (run.run_dir / "train.log").open("w", encoding="utf-8") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.PIPE,
            text=True,
            env=run_environment(run.label),
            start_new_session=True,
        )
        try:
            _, stderr = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            launcher.kill_tree(process)
            _, stderr = process.communicate()
        except BaseException:
            launcher.kill_tree(process)
            process.wait()
            raise
        log.write(stderr)
    run.wall_s = time.perf_counter() - started
    if timed_out:
        run.status, run.error = "failed", f"error: timed out after {timeout_s:g} s"
        return
    if process.returncode != 0:
        run.status, run.error = "failed", first_error_line(stderr, process.returncode)
        return
    try:
        run.metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        run.status = "ok"
    except (OSError, ValueError) as exc:
        run.status, run.error = "failed", f"error: no readable metrics.json ({exc})"


def projection_of(config: ExperimentConfig, profile: HardwareProfile) -> dict[str, Any]:
    """The cost model's view of a layout on `profile` (nothing executed)."""
    # On this machine's own profile the projection is of civetta's executor (`framework_of`).
    framework = framework_of(config, profile)
    work = workload_of(config)
    projected = project(model_description(config), config.layout, profile, framework, work)
    return {
        "hardware": profile.name,
        "step_time_s": projected.step_time_s,
        "tokens_per_s": projected.tokens_per_s,
        "tflops_per_gpu": projected.tflops_per_gpu,
        "mfu": projected.mfu,
        "bubble_fraction": projected.bubble_fraction,
        "memory_total_bytes": projected.memory_per_gpu["total"],
        "fits": projected.fits,
        "breakdown_s": projected.breakdown_s,
    }


def rows_of(runs: list[Run], profile: HardwareProfile | None = None) -> list[dict[str, Any]]:
    losses = {
        r.label: [s["loss"] for s in r.metrics["steps"]] for r in runs if r.metrics is not None
    }
    rows = []
    for run in runs:
        row = report.summarize(
            run.label,
            run.role,
            {**run.config.layout.as_dict(), "dtype": run.config.train.dtype},
            run.metrics,
            baseline=run.baseline,
            reference=losses.get(run.baseline or ""),
        )
        row.update(error=run.error, wall_s=run.wall_s, run_dir=str(run.run_dir))
        if profile is not None:
            row["projection"] = projection_of(run.config, profile)
        rows.append(row)
    return rows


# Shorter headers for the terminal, whose tables must fit 80 columns; the legend under a table
# says what those it shows stand for. The reports keep the full headers.
SHORT_HEADERS = {
    "final_loss": ("loss", "loss = final loss"),
    "max_abs_loss_diff": ("|Δloss|", "|Δloss| = max over steps of |loss − baseline loss|"),
    "mem_params_bytes": ("params", None),
    "mem_grads_bytes": ("grads", None),
    "mem_optimizer_bytes": ("optim", "optim = optimizer state"),
    "mem_activations_bytes": ("activ", "activ = peak activations"),
    "mem_gathered_bytes": ("gather", "gather = ZeRO-3's gathered parameters"),
    "mem_total_bytes": ("total", None),
    **{
        f"comm_{axis}_bytes_per_step": (f"{axis}/step", "X/step = MB per step on axis X")
        for axis in ("dp", "tp", "pp", "cp")
    },
    "comm_total_bytes_per_step": ("all/step", "all/step = MB per step on all axes"),
    "proj_step_ms": ("step ms", None),
    "proj_tokens_per_s": ("tokens/s", None),
    "proj_tflops": ("TFLOP/s", "TFLOP/s = per GPU"),
    "proj_bubble": ("bubble", None),
    "proj_memory": ("GiB", "GiB = per GPU, 2^30 bytes"),
}


def print_tables(console: Console, rows: list[dict[str, Any]]) -> None:
    """The report's tables, each split into as many parts as the console's width needs."""
    styles = ["red" if row["status"] == "failed" else None for row in rows]
    for title, columns in report.tables(rows):
        fields, legend = [], []
        for column in columns:
            header, meaning = SHORT_HEADERS.get(column.key, (column.header, None))
            justify = "left" if column.group == "id" else "right"
            fields.append(tables.Field(header, column.group, justify))
            if meaning is not None and meaning not in legend:
                legend.append(meaning)
        cells = [[report.cell(c, row) for c in columns] for row in rows]
        tables.print_table(console, title, fields, cells, styles=styles, legend=legend)
    for row in rows:
        if row["status"] == "failed":
            console.print(
                f"[red]{escape(row['label'])} failed[/]: {escape(row['error'] or '')}",
                highlight=False,
                soft_wrap=True,  # an error line stays one line, to read or grep whole
            )


def compare_command(
    config_path: str,
    overrides: list[str],
    out_dir: Path,
    mpiexec: str | None = None,
    timeout_s: float | None = None,
    hardware: str | None = None,
) -> int:
    """Run the baseline and every layout, print the tables, write the four reports.

    Returns 0 when every run succeeded, 1 when any failed (`timeout_s` bounds each run).
    Config and data errors raise before anything runs; so does a missing MPI launcher.
    """
    base, layouts = load_experiment(config_path, overrides)
    profile = None
    if hardware is not None:
        try:
            profile = load_profile(hardware)
        except CostModelError as exc:
            raise ConfigError(bare(exc)) from None
    runs = plan_runs(base, layouts, out_dir)
    # A bad data source would fail every run alike: one line and exit 2 before any starts.
    sources = {(r.config.data.source, r.config.data.seed, r.config.model.block_size) for r in runs}
    for source, seed, block_size in sources:
        load_dataset(source, seed, block_size=block_size)
    if any(run.config.world_size > 1 for run in runs):
        # Checked once, here: otherwise every multi-rank layout would fail the same way.
        mpiexec = launcher.find_mpiexec(mpiexec)
    console = tables.cli_console()
    started = time.perf_counter()
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    with progress:
        task = progress.add_task("compare", total=len(runs))
        for run in runs:
            ranks = run.config.world_size
            progress.update(task, description=f"{run.label} ({ranks} rank{'s' * (ranks > 1)})")
            execute(run, mpiexec, timeout_s)
            if run.status == "ok":
                assert run.metrics is not None
                line = (
                    f"[green]ok[/] {escape(run.label)}: loss {run.metrics['final_loss']:.4f}, "
                    f"{run.metrics['tokens_per_s'] or 0:,.0f} tokens/s ({run.wall_s:.1f} s)"
                )
            else:
                line = f"[red]failed[/] {escape(run.label)}: {escape(run.error or '')}"
            progress.console.print(line, highlight=False, soft_wrap=True)
            progress.advance(task)
        progress.update(task, description="done")
    rows = rows_of(runs, profile)
    command = ["civetta", "compare", config_path]
    for text in overrides:
        command += ["--set", text]
    summary = {
        "config": str(config_path),
        "command": shlex.join(command),
        "wall_s": time.perf_counter() - started,
        "failed": sum(row["status"] == "failed" for row in rows),
        "runs": rows,
    }
    paths = report.write_reports(out_dir, summary)
    print_tables(console, rows)
    for line in report.highlights(rows):
        console.print(line, highlight=False)
    console.print(f"wrote {', '.join(str(p) for p in paths)}", highlight=False, soft_wrap=True)
    return 1 if summary["failed"] else 0
