"""`civetta calibrate [--out configs/hardware/local.yaml] [--quick]`: a hardware profile of this
machine, measured.

One core is one "GPU" (civetta runs one single-threaded rank per core) and this machine is one
node. Two measurements run in processes of their own, so they see what a rank sees:

- compute: `python -m launch.calibrate --measure compute` with one BLAS thread, one copy per
  core at once (a rank shares the caches and the memory bus with the ranks on the other cores):
  sgemm and dgemm over sizes, memory bandwidth, and forward/backward of small GPTs through
  civetta's engine;
- communication: `mpiexec -n 2 python -m mpi4py -m launch.calibrate --measure comm`: latency and
  bandwidth of all-reduce, all-gather, reduce-scatter and point-to-point through `parallel.comm`.

The fits (`parallel.cost.calibration`) become a profile in the schema of `launch.profiles`,
validated by it, and written as YAML with the measurements in its header comment. Timings are
the best of many repetitions; a busy machine still makes them pessimistic, so the load average
is checked and recorded.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.console import Console
from rich.table import Table

from civetta.allocator import keep_freed_memory
from civetta.models.gpt import GPTConfig
from launch.launcher import find_mpiexec, kill_tree, rank_environment
from launch.profiles import profile_from_dict
from parallel.cost import calibration as cal
from parallel.mesh import Mesh

DEFAULT_OUT = Path("configs") / "hardware" / "local.yaml"
COMM_RANKS = 2
MAX_COPIES = 8  # compute measurements at once (each holds a few hundred MB)
# Twice as many ranks as cores are started to measure oversubscription, on machines this small
# (where running more ranks than cores is how a layout fits at all).
MAX_OVERSUBSCRIBED_CORES = 8
# One BLAS thread per process, as `launch.launcher.rank_environment` gives every rank.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class CalibrationError(RuntimeError):
    """A measurement that could not run; one line for the user."""


# ---- the measuring processes --------------------------------------------------------------------
def measure_compute(quick: bool) -> dict[str, Any]:
    """GEMMs, bandwidth and civetta's engine on this process (started with one BLAS thread)."""
    keep_freed_memory()  # as `civetta train` does, so the engine is timed as it trains
    bandwidth = cal.measure_bandwidth((64 if quick else 256) << 20)
    gemms = {
        dtype: [dataclasses.asdict(s) for s in cal.measure_gemms(cal.gemm_shapes(quick), dtype)]
        for dtype in ("float32", "float64")
    }
    engine = [
        {
            "config": dataclasses.asdict(s.config),
            "batch": s.batch,
            "forward_s": s.forward_s,
            "backward_s": s.backward_s,
        }
        for s in cal.measure_engine(cal.engine_models(quick), repeats=5 if quick else 12)
    ]
    optimizer = [
        dataclasses.asdict(s)
        for s in cal.measure_optimizer(cal.optimizer_shapes(quick), repeats=5 if quick else 12)
    ]
    chunks = {str(g): t for g, t in cal.measure_chunks(repeats=5 if quick else 10).items()}
    return {
        "bandwidth": bandwidth,
        "gemms": gemms,
        "engine": engine,
        "optimizer": optimizer,
        "chunks": chunks,
    }


def measure_comm(quick: bool) -> dict[str, Any] | None:
    """Collectives over every rank of this MPI job; rank 0 returns them (None elsewhere)."""
    import resource

    from mpi4py import MPI  # only in the ranks mpiexec starts

    world = MPI.COMM_WORLD.Get_size()
    mesh = Mesh(dp=world)
    group = mesh.group("dp")
    sizes = cal.message_sizes(quick)
    samples = cal.measure_collectives(group, sizes, repeats=6 if quick else 20)
    # What one rank holds before it allocates a model: interpreter, numpy, MPI buffers.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    if mesh.rank != 0:
        return None
    return {
        "ranks": world,
        "samples": samples,
        "rank_rss_bytes": rss,
        "mpi": " ".join(MPI.Get_library_version().split()[:3]),
    }


def measure_oversubscribed(quick: bool) -> dict[str, Any] | None:
    """Compute chunks and all-reduces in turn on every rank of this (oversubscribed) job;
    rank 0 returns them."""
    from mpi4py import MPI

    keep_freed_memory()  # as `civetta train` does, and as the chunks were timed alone
    mesh = Mesh(dp=MPI.COMM_WORLD.Get_size())
    loops = cal.measure_loops(mesh.group("dp"), iterations=20 if quick else 40)
    return {"ranks": mesh.world_size, "loops": loops} if mesh.rank == 0 else None


MEASUREMENTS = {
    "compute": measure_compute,
    "comm": measure_comm,
    "oversubscribed": measure_oversubscribed,
}


def _worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.calibrate")
    parser.add_argument("--measure", choices=list(MEASUREMENTS), required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    result = MEASUREMENTS[args.measure](args.quick)
    if result is not None:
        print(json.dumps(result), flush=True)
    return 0


def _json_from(stdout: str, what: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise CalibrationError(f"the {what} measurement printed no result")


def _run(command: list[str], env: dict[str, str], what: str, timeout: float) -> dict[str, Any]:
    # Its own session, so that a hang ends mpiexec and its ranks, not mpiexec alone.
    job = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = job.communicate(timeout=timeout)
    except BaseException as exc:
        kill_tree(job)
        job.communicate()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise CalibrationError(f"the {what} measurement took over {timeout:.0f} s") from None
        raise
    if job.returncode != 0:
        last = (stderr.strip().splitlines() or ["no output"])[-1]
        raise CalibrationError(f"the {what} measurement failed (exit {job.returncode}): {last}")
    return _json_from(stdout, what)


def run_compute(quick: bool, copies: int = 1) -> dict[str, Any]:
    """The compute measurement, in `copies` processes at once (one per core): a rank of a
    multi-rank layout shares the caches and the memory bus with the others, so it is measured
    while they are busy too. The first copy's result is kept."""
    env = {**os.environ, **ONE_THREAD}
    command = [sys.executable, "-m", "launch.calibrate", "--measure", "compute"]
    command += ["--quick"] if quick else []
    jobs = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(copies)
    ]
    results = []
    for job in jobs:
        try:
            stdout, stderr = job.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            for other in jobs:
                other.kill()
            raise CalibrationError("the compute measurement took over 900 s") from None
        if job.returncode != 0:
            last = (stderr.strip().splitlines() or ["no output"])[-1]
            raise CalibrationError(
                f"the compute measurement failed (exit {job.returncode}): {last}"
            )
        results.append(_json_from(stdout, "compute"))
    return results[0]


def run_comm(quick: bool, mpiexec: str | None = None) -> dict[str, Any]:
    return _run_ranks("comm", COMM_RANKS, quick, mpiexec)


def run_oversubscribed(quick: bool, ranks: int, mpiexec: str | None = None) -> dict[str, Any]:
    return _run_ranks("oversubscribed", ranks, quick, mpiexec)


def _run_ranks(what: str, ranks: int, quick: bool, mpiexec: str | None) -> dict[str, Any]:
    command = [find_mpiexec(mpiexec), "-n", str(ranks), sys.executable, "-m", "mpi4py"]
    command += ["-m", "launch.calibrate", "--measure", what] + (["--quick"] if quick else [])
    env = {**rank_environment(), **ONE_THREAD}
    return _run(command, env, f"{what} communication", 600)


# ---- from measurements to a profile -------------------------------------------------------------
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _round(value: float, digits: int = 3) -> float:
    """`digits` significant digits: the measurements are not more precise than that."""
    if abs(value) < 1e-6:
        return 0.0
    return float(f"{value:.{digits}g}")


def build_profile(
    compute: dict[str, Any],
    comm: dict[str, Any],
    cores: int,
    memory_bytes: int,
    oversubscribed: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(profile mapping in the schema of `launch.profiles`, fit report for the header).
    Without `oversubscribed` measurements the profile has no `oversubscribed` section."""
    bandwidth = compute["bandwidth"]
    memory_gbs = max(bandwidth["copy_gbs"], bandwidth["add_gbs"])
    efficiency = min(1.0, bandwidth["add_gbs"] / memory_gbs)
    hbm = memory_gbs * efficiency * 1e9
    gemms = {
        dtype: [cal.GemmSample(**row) for row in rows] for dtype, rows in compute["gemms"].items()
    }
    fit32 = cal.fit_gemm(gemms["float32"], hbm)
    fit64 = cal.fit_gemm(gemms["float64"], hbm, overhead_s=fit32.overhead_s)
    # No datasheet peak for a core under numpy: the best sgemm measured stands for it, and the
    # shared efficiency then gives each dtype its fitted asymptotic rate.
    peak32 = max(fit32.rate_flops, max(s.flops_per_s for s in gemms["float32"]))
    gemm_efficiency = fit32.rate_flops / peak32
    peak64 = fit64.rate_flops / gemm_efficiency
    tflops32, tflops64 = _round(peak32 / 1e12, 4), _round(peak64 / 1e12, 4)

    link = cal.fit_link(
        {op: [tuple(row) for row in rows] for op, rows in comm["samples"].items()}, comm["ranks"]
    )
    per_op = {
        op: cal.fit_link({op: [tuple(row) for row in rows]}, comm["ranks"])
        for op, rows in comm["samples"].items()
    }
    per_gpu_gib = memory_bytes / cores / 2**30
    reserved_gib = min(comm["rank_rss_bytes"] / 2**30, per_gpu_gib / 2)
    link_entry = {
        "name": f"MPI shared memory ({comm['mpi']})",
        "bandwidth_gbs": _round(link.bytes_per_s / 1e9),
        "latency_us": _round(link.latency_s * 1e6),
        "efficiency": 1.0,  # measured through the library: nothing left to discount
    }
    raw: dict[str, Any] = {
        "name": "local",
        "source": (
            f"civetta calibrate on {_cpu_name()}: one core = one GPU, this machine = one node; "
            "measured, see the header comment. Machine-specific: re-run civetta calibrate."
        ),
        "device": {
            "name": f"1 core of {_cpu_name()} (numpy, one BLAS thread)",
            # bf16/fp16 are emulated on float32 arrays: they run at float32's rate.
            "peak_tflops": {
                "float32": tflops32,
                "float64": tflops64,
                "bf16": tflops32,
                "fp16": tflops32,
            },
            "memory_gib": _round(per_gpu_gib),
            "memory_reserved_gib": _round(reserved_gib),
            "memory_bandwidth_gbs": _round(memory_gbs),
            "memory_efficiency": _round(efficiency),
            "gemm_max_efficiency": _round(min(1.0, gemm_efficiency)),
            "kernel_overhead_us": _round(fit32.overhead_s * 1e6),
            "elementwise_traffic": 1.0,  # fitted below
            "layer_overhead_us": 0.0,
            "backward_elementwise_ratio": 2.0,
        },
        "intra_node": link_entry,
        # One machine has no network; a projection onto more ranks than cores puts them on
        # further "nodes" joined by the same shared memory.
        "inter_node": {**link_entry, "name": "none: one machine (a copy of intra_node)"},
        "gpus_per_node": cores,
        "price_per_gpu_hour": 0.0,
    }
    profile = profile_from_dict(raw, origin="calibration")
    engine = [
        cal.EngineSample(
            GPTConfig(**row["config"]), row["batch"], row["forward_s"], row["backward_s"]
        )
        for row in compute["engine"]
    ]
    elementwise = cal.fit_elementwise(engine, profile)
    raw["device"]["elementwise_traffic"] = _round(elementwise.traffic)
    raw["device"]["layer_overhead_us"] = _round(elementwise.layer_overhead_s * 1e6)
    raw["device"]["backward_elementwise_ratio"] = _round(elementwise.backward_ratio)
    steps = [cal.OptimizerSample(**row) for row in compute["optimizer"]]
    optimizer = cal.fit_optimizer(steps, profile)
    raw["device"]["optimizer_traffic"] = _round(optimizer.traffic)
    raw["device"]["optimizer_overhead_us"] = _round(optimizer.overhead_s * 1e6)
    over_fit = None
    if oversubscribed is not None:
        loops = [tuple(row) for row in oversubscribed["loops"]]
        chunks = {int(g): t for g, t in compute["chunks"].items()}
        over_fit = cal.fit_oversubscription(loops, chunks, oversubscribed["ranks"], cores, link)
        raw["oversubscribed"] = {
            "ranks": oversubscribed["ranks"],
            "compute_stretch": _round(over_fit.compute_stretch),
            "latency_us": _round(over_fit.latency_s * 1e6),
            "bandwidth_gbs": _round(over_fit.bytes_per_s / 1e9),
        }
    profile_from_dict(raw, origin="calibration")  # the written file must load
    report = {
        "bandwidth": bandwidth,
        "gemm": {"float32": fit32, "float64": fit64},
        "best_gflops": {d: max(s.flops_per_s for s in rows) / 1e9 for d, rows in gemms.items()},
        "elementwise": elementwise,
        "link": link,
        "per_op": per_op,
        # The largest message of each collective, beyond the fitted range: (bytes, seconds).
        "largest": {op: max(rows) for op, rows in comm["samples"].items()},
        "engine_samples": len(engine),
        "oversubscribed": over_fit,
        "oversubscribed_ranks": oversubscribed["ranks"] if oversubscribed else 0,
        "optimizer": optimizer,
        "optimizer_samples": len(steps),
        "gemm_samples": {d: len(rows) for d, rows in gemms.items()},
    }
    return raw, report


def header(report: dict[str, Any], quick: bool, load: tuple[float, float, float]) -> str:
    """The YAML header comment: when, how and on what the profile was measured, and the fits."""
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    f32, f64 = report["gemm"]["float32"], report["gemm"]["float64"]
    ew, link, opt = report["elementwise"], report["link"], report["optimizer"]
    lines = [
        "This machine as a hardware profile: one core = one GPU, the machine = one node.",
        f"Written by `civetta calibrate{' --quick' if quick else ''}` on {when}",
        f"({_cpu_name()}, {os.cpu_count()} cores, numpy {np.__version__}, Python "
        f"{platform.python_version()}); load average at the start {load[0]:.2f}, {load[1]:.2f}, "
        f"{load[2]:.2f}.",
        "MACHINE-SPECIFIC: re-run `civetta calibrate` on your machine before trusting "
        "projections onto it.",
        "",
        "Measured (best of repeated timings unless noted, one BLAS thread, "
        f"{report.get('copies', 1)} core(s) measuring at once):",
        f"- sgemm over {report['gemm_samples']['float32']} shapes: best "
        f"{report['best_gflops']['float32']:.1f} GFLOP/s; fit rate {f32.rate_flops / 1e9:.1f} "
        f"GFLOP/s + {f32.overhead_s * 1e6:.2f} us per call (rms log error "
        f"{f32.rms_log_error:.2f}, worst {f32.max_error:.0%})",
        f"- dgemm: best {report['best_gflops']['float64']:.1f} GFLOP/s; fit rate "
        f"{f64.rate_flops / 1e9:.1f} GFLOP/s (same overhead; worst {f64.max_error:.0%})",
        f"- memory: copy {report['bandwidth']['copy_gbs']:.1f} GB/s, add "
        f"{report['bandwidth']['add_gbs']:.1f} GB/s (bytes read + written)",
        f"- civetta's engine, forward and backward of {report['engine_samples']} small GPTs "
        "(median passes): "
        f"elementwise traffic {ew.traffic:.2f}, {ew.layer_overhead_s * 1e6:.0f} us per layer, "
        f"backward/forward {ew.backward_ratio:.2f} (worst step error {ew.max_error:.0%})",
        f"- the optimizer step (norm, clipping, AdamW) over {report['optimizer_samples']} "
        f"tensor sets: traffic {opt.traffic:.2f}x a fused optimizer's, "
        f"{opt.overhead_s * 1e6:.1f} us per tensor (worst {opt.max_error:.0%})",
        f"- MPI, {COMM_RANKS} ranks, all collectives together: latency "
        f"{link.latency_s * 1e6:.2f} us, {link.bytes_per_s / 1e9:.2f} GB/s "
        f"(worst {link.max_error:.0%}); each alone:",
    ]
    for op, fit in report["per_op"].items():
        lines.append(
            f"    {op}: {fit.latency_s * 1e6:.2f} us, {fit.bytes_per_s / 1e9:.2f} GB/s "
            f"(worst {fit.max_error:.0%})"
        )
    fitted = cal.FIT_MAX_BYTES
    largest = report.get("largest", {})
    size = max((b for b, _ in largest.values()), default=0)
    note = f"  fitted on messages up to {fitted >> 20} MiB"
    if size > fitted:  # measured beyond the caches, shown, not fitted
        times = ", ".join(f"{op} {t * 1e3:.2f} ms" for op, (_, t) in largest.items())
        note += f"; at {size >> 20} MiB (beyond the caches): {times}"
    lines.append(note)
    over = report.get("oversubscribed")
    if over is not None:
        lines.append(
            f"- {report['oversubscribed_ranks']} ranks on {os.cpu_count()} cores, compute chunks "
            f"and all-reduces in turn: compute stretched {over.compute_stretch:.2f}x beyond its "
            f"share of a core; latency {over.latency_s * 1e6:.1f} us, "
            f"{over.bytes_per_s / 1e9:.2f} GB/s (means of loops; worst {over.max_error:.0%})"
        )
    lines += [
        "peak_tflops is the best GEMM rate measured on one core (no datasheet peak), so MFU on",
        "this profile is relative to it; bf16/fp16 are emulated on float32 arrays.",
    ]
    return "".join(f"# {line}".rstrip() + "\n" for line in lines)


def write_profile(path: Path, raw: dict[str, Any], comment: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump(raw, sort_keys=False, width=100, allow_unicode=True)
    path.write_text(comment + body, encoding="utf-8")


def render(console: Console, raw: dict[str, Any], out: Path) -> None:
    d, link = raw["device"], raw["intra_node"]
    table = Table(title=f"local profile → {out}", title_justify="left")
    table.add_column("measured")
    table.add_column("value", justify="right")
    rows = [
        ("GEMM peak float32 / float64", f"{d['peak_tflops']['float32'] * 1e3:.1f} / "
         f"{d['peak_tflops']['float64'] * 1e3:.1f} GFLOP/s"),
        ("GEMM efficiency at size, overhead", f"{d['gemm_max_efficiency']:.2f}, "
         f"{d['kernel_overhead_us']:g} µs"),
        ("memory bandwidth (× efficiency)", f"{d['memory_bandwidth_gbs']:g} GB/s × "
         f"{d['memory_efficiency']:g}"),
        ("engine: elementwise traffic", f"{d['elementwise_traffic']:g} bytes per activation byte"),
        ("engine: overhead per layer", f"{d['layer_overhead_us']:g} µs forward"),
        ("engine: backward / forward", f"{d['backward_elementwise_ratio']:g}"),
        ("optimizer: traffic, per tensor", f"{d['optimizer_traffic']:g}×, "
         f"{d['optimizer_overhead_us']:g} µs"),
        ("MPI latency, bandwidth", f"{link['latency_us']:g} µs, {link['bandwidth_gbs']:g} GB/s"),
        ("GPUs (cores) per node", str(raw["gpus_per_node"])),
        ("memory per GPU", f"{d['memory_gib']:g} GiB ({d['memory_reserved_gib']:g} reserved)"),
    ]  # fmt: skip
    if "oversubscribed" in raw:
        o = raw["oversubscribed"]
        rows.append(
            (
                f"{o['ranks']} ranks: stretch, latency, bandwidth",
                f"{o['compute_stretch']:g}×, {o['latency_us']:g} µs, {o['bandwidth_gbs']:g} GB/s",
            )
        )
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


def calibrate_command(
    out: str | Path = DEFAULT_OUT,
    quick: bool = False,
    console: Any = None,
    mpiexec: str | None = None,
) -> int:
    """Measure this machine, fit, write the `local` profile to `out`; exit code.

    `mpiexec`: the MPI launcher for the communication measurement (default as `civetta
    train`). Errors raise, for the CLI to print as one line with exit code 2: a measurement
    that fails or an `--out` that is a directory (`CalibrationError`), no mpiexec
    (`LauncherError`).
    """
    console = console or Console()
    out = Path(out)
    if out.is_dir():
        raise CalibrationError(f"--out {str(out)!r} is a directory")
    load = os.getloadavg()
    cores = os.cpu_count() or 1
    if load[0] > 0.5 * cores:
        console.print(
            f"[yellow]warning: load average {load[0]:.1f} on {cores} cores: other processes "
            "will make the timings pessimistic[/yellow]"
        )
    # Every core measures at once: in a run each core holds a rank, all of them busy.
    copies = min(cores, MAX_COPIES)
    with console.status(f"measuring GEMMs, memory bandwidth and the engine ({copies} cores)"):
        compute = run_compute(quick, copies)
    with console.status(f"measuring MPI collectives on {COMM_RANKS} ranks..."):
        comm = run_comm(quick, mpiexec)
    oversubscribed = None
    if cores <= MAX_OVERSUBSCRIBED_CORES:
        ranks = 2 * cores
        with console.status(f"measuring {ranks} ranks on {cores} cores..."):
            oversubscribed = run_oversubscribed(quick, ranks, mpiexec)
    raw, report = build_profile(compute, comm, cores, _memory_bytes(), oversubscribed)
    report["copies"] = copies
    write_profile(out, raw, header(report, quick, load))
    render(console, raw, out)
    console.print(f"wrote {out}; project onto it with --hardware {out}")
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
