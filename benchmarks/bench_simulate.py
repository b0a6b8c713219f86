"""How long `civetta simulate` takes for GPT-3 175B on 1536 and on 6144 A100s.

    python benchmarks/bench_simulate.py

The projection is analytic (nothing executes), so it should answer in well under a second.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

from rich.console import Console

from launch.simulate import simulate_command

GPT3 = str(Path(__file__).resolve().parent.parent / "configs" / "gpt3-175b.yaml")
LAYOUTS = {
    "tp8 pp12 dp16 (1536 GPUs)": [],
    "tp8 pp12 dp64 (6144 GPUs)": ["parallel.dp=64", "train.batch_size=3072"],
}


def main() -> None:
    for label, overrides in LAYOUTS.items():
        quiet = Console(file=io.StringIO())
        simulate_command(GPT3, "a100-dgx", overrides, None, None, quiet)  # warm caches
        times = []
        for _ in range(5):
            start = time.perf_counter()
            simulate_command(GPT3, "a100-dgx", overrides, None, None, Console(file=io.StringIO()))
            times.append(time.perf_counter() - start)
        print(
            f"{label:<28} best {min(times) * 1e3:7.1f} ms   median {sorted(times)[2] * 1e3:7.1f} ms"
        )


if __name__ == "__main__":
    main()
