"""The `civetta` command line.

    civetta train CONFIG.yaml [--set key=value ...] [--out DIR] [--mpiexec PATH]
    civetta compare CONFIG.yaml [--set key=value ...] [--out DIR] [--mpiexec PATH] [--timeout S]
    civetta simulate CONFIG.yaml --hardware a100-dgx [--set ...] [--tokens N] [--json OUT]
    civetta tune CONFIG.yaml --hardware a100-dgx --gpus N|N,M|A-B [--batch B] [--set ...]
        [--objective throughput|cost|time] [--tokens N] [--budget 200kgpuh|1.5Musd]
    civetta calibrate [--out configs/hardware/local.yaml] [--quick]
    civetta fit configs/calibration/a100-dgx.yaml [--write]
    civetta export RUN_DIR --out model.npz
    civetta export RUN_DIR --format hf --out DIR      (config.json and model.safetensors)
    civetta schedule --pp 4 --microbatches 8 --schedule 1f1b [--virtual-stages 2]

A config error is one line on stderr and exit code 2, checked before any MPI process starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from civetta.data import DataError, load_dataset
from launch import checkpoint
from launch.config import ConfigError, ExperimentConfig, load
from launch.launcher import LauncherError
from launch.memory_check import MemoryCheckError, check_memory
from parallel.schedules import ScheduleError


class UsageError(ValueError):
    """A bad command-line argument; one line for the user."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="civetta",
        description="A distributed-training simulator for parallelism strategies.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = commands.add_parser(
        "train", help="run one experiment (under mpiexec when the layout needs several ranks)"
    )
    train.add_argument("config", help="experiment YAML (see configs/)")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set parallel.dp=2 (repeatable)",
    )
    train.add_argument("--out", default=None, help="output directory (default: runs/<config>)")
    train.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue from a checkpoint: a run's output directory or a checkpoint directory",
    )
    train.add_argument(
        "--mpiexec",
        default=None,
        help="MPI launcher to use (default: $CIVETTA_MPIEXEC, else the one installed with civetta)",
    )
    compare = commands.add_parser(
        "compare",
        help="run the single-process baseline and every layout of the config's sweep; report",
    )
    compare.add_argument(
        "config", help="experiment YAML with a sweep: section (without one: the config itself)"
    )
    compare.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the base config (sweep entries override it in turn)",
    )
    compare.add_argument(
        "--out", default=None, help="report and run directories (default: runs/<config>)"
    )
    compare.add_argument("--mpiexec", default=None, help="MPI launcher for multi-rank layouts")
    compare.add_argument(
        "--hardware",
        default=None,
        help="also project every layout onto this profile (configs/hardware/: a100-dgx, ...)",
    )
    compare.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="fail a run that takes longer than this (default: no limit)",
    )
    schedule = commands.add_parser(
        "schedule", help="draw a pipeline schedule per rank in the terminal, with its bubble"
    )
    schedule.add_argument("--pp", type=int, default=4, help="pipeline ranks (default 4)")
    schedule.add_argument("--microbatches", type=int, default=8, help="per step (default 8)")
    schedule.add_argument(
        "--schedule",
        default="1f1b",
        help="gpipe | 1f1b | interleaved-1f1b | zb-h1 | zb-h2 | zb-v | dualpipev (default 1f1b)",
    )
    schedule.add_argument("--virtual-stages", type=int, default=1, help="for interleaved-1f1b")
    schedule.add_argument("--save", default=None, help="write the schedule to a .csv or .yaml")
    schedule.add_argument("--load", default=None, help="read a schedule from a .csv or .yaml")
    schedule.add_argument(
        "--save-trace",
        default=None,
        metavar="FILE",
        help="write the unit-time replay as Chrome trace JSON (open it in ui.perfetto.dev)",
    )
    calibrate = commands.add_parser(
        "calibrate", help="measure this machine and write the `local` hardware profile"
    )
    calibrate.add_argument("--out", default="configs/hardware/local.yaml", help="profile to write")
    calibrate.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    calibrate.add_argument("--mpiexec", default=None, help="MPI launcher for the collectives")
    fit_parser = commands.add_parser(
        "fit", help="fit a hardware profile's free numbers to published measurements"
    )
    fit_parser.add_argument("spec", help="calibration spec (configs/calibration/*.yaml)")
    fit_parser.add_argument(
        "--write", action="store_true", help="write the fitted numbers into the profile file"
    )
    tune = commands.add_parser(
        "tune", help="rank the feasible layouts of a model on N GPUs by projected throughput"
    )
    tune.add_argument("config", help="experiment YAML (the model and the training settings)")
    tune.add_argument("--hardware", default="a100-dgx", help="a profile in configs/hardware/")
    tune.add_argument(
        "--gpus",
        required=True,
        help="GPUs to lay out: a count (1024), a list (512,1024,2048) or a doubling range "
        "(256-4096 = 256, 512, ..., 4096)",
    )
    tune.add_argument("--batch", type=int, default=None, help="global batch (default: config's)")
    tune.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fix a choice (e.g. parallel.tp=8) while the rest is searched",
    )
    tune.add_argument("--top", type=int, default=10, help="layouts to show (default 10)")
    tune.add_argument(
        "--moe-imbalance",
        type=float,
        default=1.0,
        help="a MoE's busiest expert-parallel rank gets F × the mean load (default 1: balanced)",
    )
    tune.add_argument(
        "--objective",
        default=None,
        help="over several GPU counts, rank by throughput (tokens/s per GPU, the default), "
        "cost (GPU-hours, dollars) or time (wall-clock for --tokens)",
    )
    tune.add_argument(
        "--tokens",
        default=None,
        metavar="N",
        help="the run to cost: 300e9, 300B, 1.5T or compute-optimal (the default whenever "
        "--objective, --budget or several counts need one)",
    )
    tune.add_argument(
        "--budget",
        default=None,
        help="drop layouts whose run costs more: 200000gpuh or 200kgpuh (GPU-hours), "
        "1.5Musd or '$1.5M' (dollars)",
    )
    tune.add_argument("--json", dest="json_out", default=None, help="write the ranking")
    export = commands.add_parser(
        "export",
        help="write a checkpoint's full weights: one .npz with civetta's names, or a Hugging "
        "Face checkpoint that transformers loads",
    )
    export.add_argument("checkpoint", help="a run's output directory or a checkpoint directory")
    export.add_argument(
        "--format",
        choices=("npz", "hf"),
        default="npz",
        help="npz: one .npz file (default); hf: a directory with config.json and "
        "model.safetensors (GPT2LMHeadModel or LlamaForCausalLM)",
    )
    export.add_argument("--out", required=True, help="the .npz file, or the hf directory, to write")
    simulate = commands.add_parser(
        "simulate", help="project an experiment onto a GPU cluster (analytic, nothing runs)"
    )
    simulate.add_argument("config", help="experiment YAML (see configs/)")
    simulate.add_argument(
        "--hardware",
        default="a100-dgx",
        help="a profile in configs/hardware/ (a100-dgx, h100-dgx) or a path to one",
    )
    simulate.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE"
    )
    simulate.add_argument(
        "--tokens",
        default=None,
        metavar="N",
        help="training tokens to cost: 300000000000, 300e9, 300B, 1.5T, or compute-optimal "
        "(20 per parameter, active ones for a MoE)",
    )
    simulate.add_argument(
        "--moe-imbalance",
        type=float,
        default=1.0,
        help="a MoE's busiest expert-parallel rank gets F × the mean load (default 1: balanced)",
    )
    simulate.add_argument("--json", dest="json_out", default=None, help="write the projection")
    return parser


def cmd_export(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.format == "hf":
        count = checkpoint.export_hf(Path(args.checkpoint), out, warn=warn)
        print(f"wrote config.json and {count} tensors to {out}")
        return 0
    if out.suffix != ".npz":
        raise UsageError(f"--out expected a path ending in .npz, got {args.out!r}")
    count = checkpoint.export(Path(args.checkpoint), out, warn=warn)
    print(f"wrote {count} tensors to {out}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from launch.simulate import simulate_command

    return simulate_command(
        args.config,
        args.hardware,
        args.overrides,
        args.tokens,
        args.json_out,
        moe_imbalance=args.moe_imbalance,
    )


def cmd_schedule(args: argparse.Namespace) -> int:
    from launch.gantt import schedule_command

    for flag in ("pp", "microbatches", "virtual_stages"):
        value = getattr(args, flag)
        if value < 1:
            name = flag.replace("_", "-")
            raise UsageError(f"--{name} expected a positive integer, got {value}")
    return schedule_command(
        args.pp,
        args.microbatches,
        args.schedule,
        args.virtual_stages,
        args.save,
        args.load,
        save_trace=args.save_trace,
    )


def default_out_dir(config_path: str) -> Path:
    return Path("runs") / Path(config_path).stem


def cmd_train(args: argparse.Namespace, argv: list[str]) -> int:
    from launch import launcher, worker

    config: ExperimentConfig = load(args.config, args.overrides)
    out_dir = Path(args.out) if args.out else default_out_dir(args.config)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {str(out_dir)!r} exists and is not a directory")
    # Problems every rank would hit are reported once, here, before any rank starts.
    load_dataset(config.data.source, config.data.seed, block_size=config.model.block_size)
    resume = None
    if args.resume is not None:
        # Every rank of the job finds the same checkpoint; the launching process alone warns.
        resume = checkpoint.find(Path(args.resume), None if launcher.inside_mpi_job() else warn)
        checkpoint.check_resumable(resume, config)
    if config.train.init_from is not None:  # the config's model, every tensor there in shape
        checkpoint.check_init_from(Path(config.train.init_from), config)
    if not launcher.inside_mpi_job():  # every rank will run here: will they fit?
        check_memory(config)
    if config.world_size > 1 and not launcher.inside_mpi_job():
        job = launcher.relaunch(config.world_size, argv, args.mpiexec)
        if job.exit_code not in (0, 2):
            message = worker.explain_failure(
                out_dir, config.world_size, job.exit_code, job.bad_pids
            )
            if message:
                print(message, file=sys.stderr)
        return job.exit_code
    return worker.train(config, out_dir, resume)


def cmd_compare(args: argparse.Namespace) -> int:
    from launch.compare import compare_command

    out_dir = Path(args.out) if args.out else default_out_dir(args.config)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {str(out_dir)!r} exists and is not a directory")
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError(f"--timeout expected a positive number, got {args.timeout:g}")
    return compare_command(
        args.config, args.overrides, out_dir, args.mpiexec, args.timeout, args.hardware
    )


def warn(message: str) -> None:
    """Print a bare warning message as one line on stderr."""
    print(f"warning: {message}", file=sys.stderr)


def fail(exc: Exception) -> int:
    """Print a user's error as its one line and return exit code 2. Exceptions carry the bare
    message; "error: " is added here, and only here."""
    print(f"error: {exc}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "train":
            return cmd_train(args, argv)
        if args.command == "schedule":
            return cmd_schedule(args)
        if args.command == "compare":
            return cmd_compare(args)
        if args.command == "simulate":
            return cmd_simulate(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "calibrate":
            from launch.calibrate import CalibrationError, calibrate_command

            try:
                return calibrate_command(args.out, args.quick, mpiexec=args.mpiexec)
            except CalibrationError as exc:
                return fail(exc)
        if args.command == "fit":
            from launch.fit import fit_command

            return fit_command(args.spec, args.write)
        if args.command == "tune":
            from launch.tune import tune_command

            return tune_command(
                args.config,
                args.hardware,
                args.gpus,
                args.batch,
                args.overrides,
                args.top,
                args.json_out,
                None,
                args.moe_imbalance,
                args.objective,
                args.tokens,
                args.budget,
            )
    except (
        ConfigError,
        UsageError,
        DataError,
        ScheduleError,
        LauncherError,
        MemoryCheckError,
        checkpoint.CheckpointError,
    ) as exc:
        return fail(exc)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
