"""Training-step speed of the single-process GPT against this machine's sgemm rate.

    python benchmarks/bench_step.py [--steps 10] [--dtype float32]

Bench config: vocab 256, block 128, 4 layers, 4 heads, n_embd 256, batch 16, AdamW. Prints the
median time of forward, backward and optimizer, the model FLOPs per step (6·N·tokens plus
attention, `GPTConfig.flops_per_token`), the sgemm throughput measured in the same run
(interleaved with the steps, so both see the same machine load) and their ratio: the model FLOPs
utilisation against sgemm.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from civetta.allocator import keep_freed_memory
from civetta.data import load_dataset
from civetta.models.gpt import GPT, GPTConfig
from civetta.optim import AdamW

BENCH = GPTConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=256)
BATCH = 16


def sgemm_seconds(a: np.ndarray, b: np.ndarray, out: np.ndarray, repeats: int = 3) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        np.matmul(a, b, out=out)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = parser.parse_args()
    dtype = np.dtype(args.dtype)
    keep_freed_memory()  # as `civetta train` does

    model = GPT(BENCH, seed=0, dtype=dtype)
    optimizer = AdamW(model.params, lr=1e-3)
    data = load_dataset("stdlib", seed=0)
    n = 2048  # a square GEMM large enough to reach the BLAS peak
    a, b = (np.random.default_rng(i).standard_normal((n, n)).astype(dtype) for i in (0, 1))
    out = np.empty((n, n), dtype)

    phases: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}
    gemm: list[float] = []
    for step in range(args.steps + 2):  # two warm-up steps
        x, y = data.batch("train", 0, step, BATCH, BENCH.block_size)
        t0 = time.perf_counter()
        loss = model(x, y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        model.zero_grad()
        t3 = time.perf_counter()
        gemm.append(sgemm_seconds(a, b, out))
        if step >= 2:
            phases["forward"].append(t1 - t0)
            phases["backward"].append(t2 - t1)
            phases["optimizer"].append(t3 - t2)

    medians = {k: float(np.median(v)) for k, v in phases.items()}
    step_time = float(np.median(np.sum([phases[k] for k in phases], axis=0)))
    tokens = BATCH * BENCH.block_size
    model_flops = BENCH.flops_per_token() * tokens
    gemm_rate = 2 * n**3 / float(np.median(gemm[2:]))
    achieved = model_flops / step_time

    print(f"bench config: {BENCH}, batch {BATCH}, {args.dtype}, {BENCH.num_parameters():,} params")
    for name, value in medians.items():
        print(f"  {name:<10} {value * 1e3:8.1f} ms")
    print(f"  {'step':<10} {step_time * 1e3:8.1f} ms  ({tokens / step_time:,.0f} tokens/s)")
    print(f"model FLOPs per step      {model_flops / 1e9:8.2f} GFLOP")
    print(f"achieved                  {achieved / 1e9:8.1f} GFLOP/s")
    gemm_name = f"{'s' if dtype == np.float32 else 'd'}gemm {n}x{n}x{n}"
    print(f"{gemm_name:<25} {gemm_rate / 1e9:8.1f} GFLOP/s")
    print(f"MFU against gemm          {achieved / gemm_rate:8.3f}")


if __name__ == "__main__":
    main()
