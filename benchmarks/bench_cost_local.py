"""Predicted against measured step time of the quickstart layouts on this machine.

    python benchmarks/bench_cost_local.py [--profile PROFILE.yaml] [--steps 30]

First `civetta calibrate` measures this machine into a fresh `local` profile (about a minute),
because a shared machine's speed drifts by 10-15% over hours: a profile written earlier predicts
the machine as it was then. `--profile` skips that and projects onto a given profile.

Two sets of layouts, each trained for a few steps and projected onto that profile:
- configs/quickstart.yaml on 1 and 2 ranks (single process, dp=2, tp=2, pp=2 with 1F1B over 4
  microbatches) and on 4 ranks (dp=2 × tp=2), through `civetta train` and the cost model with
  civetta's own executor behaviour (`parallel.cost.projection.CIVETTA_EXECUTOR`: the gradient
  all-reduce waits for the last backward);
- the sweep of configs/compare-quickstart.yaml (the README's main command: float64, 4 layers,
  every layout on 4 ranks), through `civetta compare --hardware PROFILE`, whose report has both
  the measured median step and the projected one.

With more ranks than cores the ranks share them, which the profile's `oversubscribed` section
models (measured by `civetta calibrate`). Prints predicted, measured median and best step (the
first steps, which pay for warm-up, are left out) and predicted / median; the issue's target is
a ratio within 25% of 1. Wall-clock time depends on what else the machine runs, hence a
benchmark, not a test; the load average is printed beside the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from launch.config import load, model_description
from launch.profiles import load_profile
from launch.simulate import workload_of
from parallel.cost.hardware import HardwareProfile
from parallel.cost.projection import CIVETTA_EXECUTOR, project

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "configs" / "quickstart.yaml"
LAYOUTS = {
    "single": [],
    "dp=2": ["parallel.dp=2"],
    "tp=2": ["parallel.tp=2"],
    "pp=2 1f1b m=4": ["parallel.pp=2", "parallel.schedule=1f1b", "train.microbatch_size=4"],
    "dp=2 × tp=2": ["parallel.dp=2", "parallel.tp=2"],
}
COMPARE = REPO / "configs" / "compare-quickstart.yaml"


def run(overrides: list[str], steps: int) -> list[float]:
    """Step times of one `civetta train` run of the quickstart with `overrides`."""
    with tempfile.TemporaryDirectory() as out:
        sets = [f"train.steps={steps}", "train.warmup_steps=0", "train.eval_batches=1"]
        command = [sys.executable, "-m", "launch", "train", str(QUICKSTART), "--out", out]
        for item in sets + overrides:
            command += ["--set", item]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=600)
        metrics = json.loads((Path(out) / "metrics.json").read_text())
    return [s["time_s"] for s in metrics["steps"]][1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="project onto this profile instead of calibrating")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        if args.profile is None:
            args.profile = str(Path(scratch) / "local.yaml")
            print("calibrating this machine (civetta calibrate) ...", flush=True)
            command = [sys.executable, "-m", "launch", "calibrate", "--out", args.profile]
            subprocess.run(command, check=True, capture_output=True, timeout=900)
        profile = load_profile(args.profile)
        compare(profile, args.profile, args.steps)


def compare(profile: HardwareProfile, path: str, steps: int) -> None:
    cores = os.cpu_count() or 1
    print(f"profile {path}; {cores} cores; load average {os.getloadavg()[0]:.2f}")
    print(f"{'layout':<34}{'predicted':>11}{'median':>11}{'best':>11}{'pred/median':>13}")
    ratios = []
    for label, overrides in LAYOUTS.items():
        config = load(str(QUICKSTART), [*overrides, "train.warmup_steps=0"])
        predicted = project(
            model_description(config), config.layout, profile, CIVETTA_EXECUTOR, workload_of(config)
        ).step_time_s
        times = run(overrides, steps)
        ratios.append(predicted / float(np.median(times)))
        row(f"quickstart {label}", predicted, float(np.median(times)), min(times))
    for label, predicted, median in compare_quickstart(path):
        ratios.append(predicted / median)
        row(f"compare-quickstart {label}", predicted, median, None)
    worst = max(ratios, key=lambda r: abs(r - 1))
    within = sum(abs(r - 1) <= 0.25 for r in ratios)
    print(f"{within} of {len(ratios)} layouts within 25%; worst pred/median {worst:.2f}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


def row(label: str, predicted: float, median: float, best: float | None) -> None:
    best_text = f"{best * 1e3:>9.2f}ms" if best is not None else f"{'-':>11}"
    print(
        f"{label:<34}{predicted * 1e3:>9.2f}ms{median * 1e3:>9.2f}ms{best_text}"
        f"{predicted / median:>13.2f}"
    )


def compare_quickstart(profile_path: str) -> list[tuple[str, float, float]]:
    """(label, projected, measured median step) of every layout of the compare-quickstart
    sweep, from the report of `civetta compare --hardware`."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "launch", "compare", str(COMPARE), "--out", out]
        command += ["--hardware", profile_path]
        subprocess.run(command, check=True, capture_output=True, timeout=1800)
        rows = json.loads((Path(out) / "report.json").read_text())["runs"]
    return [
        (r["label"], r["projection"]["step_time_s"], r["step_time_median_s"])
        for r in rows
        if r["status"] == "ok"
    ]


if __name__ == "__main__":
    main()
