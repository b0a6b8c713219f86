"""ZeRO stages 0–3 at dp=4: model-state memory per rank, step time and dp traffic per step.

    python benchmarks/bench_memory.py [--dp 4] [--steps 4] [--runs 2] [--dtype bf16]

Runs the bench config (configs/bench.yaml) through `civetta train` once per ZeRO stage (the
stages interleaved, `--runs` rounds, the faster round kept per stage) and prints, from each
metrics.json: bytes per rank (the largest rank) of parameters, gradients, optimizer state, peak
activations and ZeRO-3's largest gathered working set; the model-state total; the median step
time after the first step; and the ring wire bytes one dp rank sends per training step. It also
checks that every rank's measured model-state bytes equal the closed forms beside them.
`--dtype bf16` shows mixed precision: 2 + 2 + 12 bytes per parameter, the 12 (float32 masters
and Adam moments) sharded from stage 1.

With more ranks than cores the step time includes waiting for a core; the ratios between the
stages are what the run measures, not the absolute times.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from launch.config import load
from launch.trainer import model_description

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "bench.yaml"
CATEGORIES = ("params", "grads", "optimizer", "activations_peak", "params_gathered_peak")
MiB = 2**20


def run(dp: int, zero: int, steps: int, dtype: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable, "-m", "launch", "train", str(CONFIG), "--out", out,
            "--set", f"parallel.dp={dp}", "--set", f"parallel.zero={zero}",
            "--set", f"train.steps={steps}", "--set", f"train.dtype={dtype}",
        ]  # fmt: skip
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        return json.loads((Path(out) / "metrics.json").read_text())


def dp_wire_bytes_per_step(metrics: dict) -> float:
    """Ring wire bytes on the dp axis during training steps (the loss report and the final
    validation pass run in phase "other"), the largest rank's."""
    steps = len(metrics["steps"])
    per_rank = [
        sum(
            op.get("wire_bytes", op["bytes"])
            for op in rank["ops"]
            if op["axis"] == "dp" and op["phase"] != "other"
        )
        for rank in metrics["comm"]["per_rank"]
    ]
    return max(per_rank) / steps


def summarize(metrics: dict) -> dict:
    ranks = metrics["memory"]["per_rank"]
    for rank in ranks:
        closed = rank["closed_form"]
        measured = {key: rank[key] for key in closed}
        assert measured == closed, (rank["rank"], measured, closed)
    row = {c: max(r.get(c, 0) for r in ranks) for c in CATEGORIES}
    row["model_state"] = max(r["params"] + r["grads"] + r["optimizer"] for r in ranks)
    row["step_s"] = metrics["step_time_median_s"]
    row["wire"] = dp_wire_bytes_per_step(metrics)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dp", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bf16", "fp16"])
    args = parser.parse_args()
    rows: dict[int, dict] = {}
    for _ in range(args.runs):
        for zero in range(4):
            row = summarize(run(args.dp, zero, args.steps, args.dtype))
            if zero not in rows or row["step_s"] < rows[zero]["step_s"]:
                rows[zero] = row
    print(
        f"bench config, dp={args.dp}, {args.dtype} AdamW, {args.steps} steps; MiB per rank "
        "(largest rank); measured == closed form on every rank"
    )
    header = (
        f"{'zero':>4}{'params':>9}{'grads':>9}{'optim':>9}{'model st':>10}{'activ pk':>10}"
        f"{'gathered':>10}{'step s':>9}{'dp wire MiB/step':>18}{'x DP':>7}"
    )
    print(header)
    base_wire = rows[0]["wire"]
    for zero, r in rows.items():
        print(
            f"{zero:>4}{r['params'] / MiB:>9.2f}{r['grads'] / MiB:>9.2f}"
            f"{r['optimizer'] / MiB:>9.2f}{r['model_state'] / MiB:>10.2f}"
            f"{r['activations_peak'] / MiB:>10.2f}{r['params_gathered_peak'] / MiB:>10.2f}"
            f"{r['step_s']:>9.3f}{r['wire'] / MiB:>18.2f}{r['wire'] / base_wire:>7.3f}"
        )
    model = model_description(load(CONFIG))
    if model.tie_embeddings:  # the table serves the lookup and the head: gathered by both
        psi, table = model.num_parameters(), model.vocab_size * model.n_embd
        print(f"ZeRO-3 on a tied model: expected 1.5·(Ψ + V·C)/Ψ = {1.5 * (psi + table) / psi:.3f}")


if __name__ == "__main__":
    main()
