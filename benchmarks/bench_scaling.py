"""Weak scaling of data parallelism: tokens/s of the bench config at dp=N against one process.

    python benchmarks/bench_scaling.py [--dp 2] [--steps 8]

Each rank keeps the single process's batch (16 sequences), so the global batch grows with dp;
efficiency = tokens/s at dp=N / (N · tokens/s at dp=1). Both runs go through `civetta train`
(median step time after the first step) and are interleaved twice to share the machine's load.

Weak scaling holds the work per core fixed: every rank, the single process included, runs one
thread (`--threads-per-rank`), so dp=N uses N cores where dp=1 uses one. (Comparing a process
with two BLAS threads against two one-thread ranks measures threading, not scaling.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "bench.yaml"


def thread_environment(threads: int) -> dict[str, str]:
    """This environment with `threads` threads for every pool a rank runs."""
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")
    return {**os.environ, **dict.fromkeys(names, str(threads))}


def tokens_per_s(dp: int, steps: int, batch_per_rank: int, threads: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable, "-m", "launch", "train", str(CONFIG), "--out", out,
            "--set", f"parallel.dp={dp}", "--set", f"train.batch_size={batch_per_rank * dp}",
            "--set", f"train.steps={steps}",
        ]  # fmt: skip
        env = thread_environment(threads)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
        metrics = json.loads((Path(out) / "metrics.json").read_text())
    return metrics["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-per-rank", type=int, default=16)
    parser.add_argument("--threads-per-rank", type=int, default=1)
    args = parser.parse_args()
    single, parallel = [], []
    for _ in range(2):
        single.append(tokens_per_s(1, args.steps, args.batch_per_rank, args.threads_per_rank))
        parallel.append(
            tokens_per_s(args.dp, args.steps, args.batch_per_rank, args.threads_per_rank)
        )
    best_single, best_parallel = max(single), max(parallel)
    print(f"dp=1:  {best_single:10,.0f} tokens/s  (runs: {', '.join(f'{v:,.0f}' for v in single)})")
    print(
        f"dp={args.dp}:  {best_parallel:10,.0f} tokens/s  "
        f"(runs: {', '.join(f'{v:,.0f}' for v in parallel)})"
    )
    print(f"threads per rank: {args.threads_per_rank} (dp=1 and every rank of dp={args.dp} alike)")
    print(f"weak-scaling efficiency: {best_parallel / (args.dp * best_single):.3f}")


if __name__ == "__main__":
    main()
