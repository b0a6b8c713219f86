"""Weak scaling of data parallelism: tokens/s of the bench config at dp=N against one process.

    python benchmarks/bench_scaling.py [--dp 2] [--steps 8]

Each rank keeps the single process's batch (16 sequences), so the global batch grows with dp;
efficiency = tokens/s at dp=N / (N · tokens/s at dp=1). Both runs go through `civetta train`
(median step time after the first step) and are interleaved twice to share the machine's load.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "bench.yaml"


def tokens_per_s(dp: int, steps: int, batch_per_rank: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable, "-m", "launch", "train", str(CONFIG), "--out", out,
            "--set", f"parallel.dp={dp}", "--set", f"train.batch_size={batch_per_rank * dp}",
            "--set", f"train.steps={steps}",
        ]  # fmt: skip
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        metrics = json.loads((Path(out) / "metrics.json").read_text())
    return metrics["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-per-rank", type=int, default=16)
    args = parser.parse_args()
    single, parallel = [], []
    for _ in range(2):
        single.append(tokens_per_s(1, args.steps, args.batch_per_rank))
        parallel.append(tokens_per_s(args.dp, args.steps, args.batch_per_rank))
    best_single, best_parallel = max(single), max(parallel)
    print(f"dp=1:  {best_single:10,.0f} tokens/s  (runs: {', '.join(f'{v:,.0f}' for v in single)})")
    print(
        f"dp={args.dp}:  {best_parallel:10,.0f} tokens/s  "
        f"(runs: {', '.join(f'{v:,.0f}' for v in parallel)})"
    )
    print(f"weak-scaling efficiency: {best_parallel / (args.dp * best_single):.3f}")


if __name__ == "__main__":
    main()
