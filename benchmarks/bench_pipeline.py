"""Measured pipeline bubble against each schedule's ideal, and peak activations per rank.

    python benchmarks/bench_pipeline.py [--pp 4] [--microbatches 8] [--steps 4]

Runs the bench config (configs/bench.yaml) with 8 layers instead of 4 (so that pp=4 with two
stages per rank has a block per stage) and an untied head, the same for every schedule,
through `civetta train` once per schedule (GPipe, 1F1B, interleaved 1F1B with 2 virtual
stages, ZB-H1, ZB-H2, ZB-V, DualPipeV) and prints, per schedule: the bubble measured on the
ranks (idle share of the pipeline phase, mean over ranks, median over steps after the first),
the median step time, the schedule's bubble replayed with unit action times (F=1, B=2, I=W=1)
for one step and in the steady state (`parallel.zero_bubble.steady_state_bubble`: steps
overlapping, the zero-bubble papers' measure), the peak in-flight (microbatch, stage) pairs and
the peak activation bytes per rank. With more ranks than cores, ranks also wait for a core,
which the measured bubble includes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from parallel.schedules import make_schedule, textbook_bubble, unit_time_bubble
from parallel.zero_bubble import steady_state_bubble

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "bench.yaml"
SCHEDULES = [
    ("gpipe", 1),
    ("1f1b", 1),
    ("interleaved-1f1b", 2),
    ("zb-h1", 1),
    ("zb-h2", 1),
    ("zb-v", 1),
    ("dualpipev", 1),
]


def run(pp: int, microbatches: int, steps: int, schedule: str, v: int) -> dict:
    batch = 16
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable, "-m", "launch", "train", str(CONFIG), "--out", out,
            "--set", f"parallel.pp={pp}", "--set", f"parallel.schedule={schedule}",
            "--set", f"parallel.virtual_stages={v}", "--set", f"train.steps={steps}",
            "--set", f"train.batch_size={batch}", "--set", "model.n_layer=8",
            "--set", f"train.microbatch_size={batch // microbatches}",
            "--set", "model.tie_embeddings=false",
        ]  # fmt: skip
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        return json.loads((Path(out) / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    pp, m = args.pp, args.microbatches
    textbook = textbook_bubble(pp, m)
    print(f"bench config with 8 layers, pp={pp}, m={m}; textbook (p-1)/(m+p-1) = {textbook:.3f}")
    header = (
        f"{'schedule':<22}{'measured':>9}{'step ms':>9}{'unit-time':>10}{'steady':>8}"
        f"{'in flight':>13}  activations peak per rank (MiB)"
    )
    print(header)
    for name, v in SCHEDULES:
        metrics = run(pp, m, args.steps, name, v)
        built = make_schedule(name, pp, m, v)
        ideal, steady = unit_time_bubble(built), steady_state_bubble(built)
        step_ms = 1e3 * statistics.median(s["time_s"] for s in metrics["steps"][1:])
        per_rank = metrics["pipeline"]["per_rank"]
        flight = " ".join(str(r["peak_in_flight"]) for r in per_rank)
        memory = " ".join(
            f"{r['activations_peak'] / 2**20:5.1f}" for r in metrics["memory"]["per_rank"]
        )
        label = f"{name} v={v}" if v > 1 else name
        bubble = metrics["pipeline"]["bubble_fraction"]
        print(
            f"{label:<22}{bubble:>9.3f}{step_ms:>9.0f}{ideal:>10.3f}{steady:>8.3f}"
            f"{flight:>13}  {memory}"
        )


if __name__ == "__main__":
    main()
