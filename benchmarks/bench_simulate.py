"""How long `civetta simulate` and `civetta tune` take for GPT-3 175B and Llama 3.1 405B.

    python benchmarks/bench_simulate.py

The projection runs the model's own pieces data-free once each (`parallel.cost.trace`) and
prices what they record. "cold" clears every trace first, as a fresh `civetta` process starts;
"warm" reuses them. The targets: simulate under 1 s and tune on 1024 GPUs under 10 s, cold, on
a 2-core machine.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

from rich.console import Console

from launch.simulate import simulate_command
from launch.tune import tune_command
from parallel.cost import stages, trace

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
GPT3 = str(CONFIGS / "gpt3-175b.yaml")
LLAMA405 = str(CONFIGS / "llama3.1-405b.yaml")
LAYOUTS = {  # label: (config, hardware, overrides)
    "GPT-3 tp8 pp12 dp16 (1536 GPUs)": (GPT3, "a100-dgx", []),
    "GPT-3 tp8 pp12 dp64 (6144 GPUs)": (
        GPT3,
        "a100-dgx",
        ["parallel.dp=64", "train.batch_size=3072"],
    ),
    "Llama 405B tp8 pp18 dp64 (9216 GPUs)": (LLAMA405, "h100-dgx", []),
}


def cold() -> None:
    trace.trace.cache_clear()
    stages._staged.cache_clear()
    stages._first_of.clear()


def quiet() -> Console:
    return Console(file=io.StringIO())


def timed(run: object, repeats: int, clear: bool) -> list[float]:
    times = []
    for _ in range(repeats):
        if clear:
            cold()
        start = time.perf_counter()
        run()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return sorted(times)


def main() -> None:
    for label, (config, hardware, overrides) in LAYOUTS.items():

        def simulate(config=config, hardware=hardware, overrides=overrides) -> None:
            simulate_command(config, hardware, overrides, None, None, quiet())

        for mode, clear in (("cold", True), ("warm", False)):
            times = timed(simulate, 5, clear)
            print(
                f"simulate {label:<37} {mode}: best {times[0] * 1e3:7.1f} ms   "
                f"median {times[2] * 1e3:7.1f} ms"
            )

    def tune() -> None:
        tune_command(GPT3, "a100-dgx", 1024, console=quiet())

    times = timed(tune, 3, True)
    print(f"tune GPT-3 --gpus 1024 cold: best {times[0]:.2f} s   median {times[1]:.2f} s")

    def tune_llama() -> None:
        tune_command(LLAMA405, "h100-dgx", 8192, console=quiet())

    times = timed(tune_llama, 3, True)
    print(f"tune Llama 405B --gpus 8192 cold: best {times[0]:.2f} s   median {times[1]:.2f} s")
    print(f"traces of distinct pieces: {trace.trace.cache_info().currsize}")


if __name__ == "__main__":
    main()
