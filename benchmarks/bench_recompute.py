"""Activation recomputation on the bench model: peak activations, step time, FLOPs.

    python benchmarks/bench_recompute.py [--steps 4] [--runs 2]

Runs configs/bench.yaml on one process with parallel.recompute none, selective and full
(interleaved, `--runs` rounds, the faster round kept) and prints, from each metrics.json, the
peak bytes the graph keeps for backward (the arrays ops save, each buffer once; the engine's
activation meter), the median step time, and the model and hardware FLOPs per step (hardware
FLOPs count the recomputed forward work again).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "bench.yaml"
MODES = ("none", "selective", "full")


def run(mode: str, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable, "-m", "launch", "train", str(CONFIG), "--out", out,
            "--set", f"parallel.recompute={mode}", "--set", f"train.steps={steps}",
        ]  # fmt: skip
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        return json.loads((Path(out) / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    best: dict[str, dict] = {}
    for _ in range(args.runs):
        for mode in MODES:
            metrics = run(mode, args.steps)
            if mode not in best or metrics["step_time_median_s"] < best[mode]["step_time_median_s"]:
                best[mode] = metrics
    print(f"bench config, one process, float32, {args.steps} steps")
    print(
        f"{'recompute':<11}{'activations MiB':>16}{'step ms':>9}{'model GFLOP':>13}{'hw GFLOP':>10}"
    )
    for mode, metrics in best.items():
        activations = metrics["memory"]["per_rank"][0]["activations_peak"] / 2**20
        flops = metrics["flops"]
        print(
            f"{mode:<11}{activations:>16.1f}{metrics['step_time_median_s'] * 1e3:>9.1f}"
            f"{flops['model_per_step'] / 1e9:>13.2f}{flops['hardware_per_step'] / 1e9:>10.2f}"
        )


if __name__ == "__main__":
    main()
