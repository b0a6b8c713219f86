"""Training-step speed of the single-process GPT and Llama against this machine's sgemm rate.

    python benchmarks/bench_step.py [--steps 10] [--dtype float32] [--model gpt|llama|both]

Bench configs: the GPT of configs/bench.yaml (vocab 256, block 128, 4 layers, 4 heads, n_embd
256) and the Llama of configs/models/llama-small.yaml (the same sizes, 2 key/value heads, SwiGLU
width 688), batch 16, AdamW. Prints the median time of forward, backward and optimizer, the
model FLOPs per step (`flops_per_token`: 6·N·tokens plus attention), the sgemm throughput
measured in the same run (interleaved with the steps, so both see the same machine load) and
their ratio: the model FLOPs utilisation against sgemm. With `both` the two models' steps
alternate, so their ratio is measured under the same load.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from civetta.allocator import keep_freed_memory
from civetta.data import load_dataset
from civetta.models import GPT, GPTConfig, Llama, LlamaConfig
from civetta.nn import Model
from civetta.optim import AdamW

BENCH = GPTConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=256)
LLAMA = LlamaConfig(
    vocab_size=256, block_size=128, n_layer=4, n_head=4, n_kv_head=2, n_embd=256, ffn_hidden=688
)
BATCH = 16


def sgemm_seconds(a: np.ndarray, b: np.ndarray, out: np.ndarray, repeats: int = 3) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        np.matmul(a, b, out=out)
    return (time.perf_counter() - start) / repeats


def timed_step(model: Model, optimizer: AdamW, x: np.ndarray, y: np.ndarray) -> list[float]:
    """Seconds of forward, backward and optimizer for one step."""
    t0 = time.perf_counter()
    loss = model(x, y)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    optimizer.step()
    model.zero_grad()
    t3 = time.perf_counter()
    return [t1 - t0, t2 - t1, t3 - t2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--model", default="both", choices=["gpt", "llama", "both"])
    args = parser.parse_args()
    dtype = np.dtype(args.dtype)
    keep_freed_memory()  # as `civetta train` does

    configs = {"gpt": BENCH, "llama": LLAMA}
    chosen = list(configs) if args.model == "both" else [args.model]
    builders = {"gpt": GPT, "llama": Llama}
    models = {name: builders[name](configs[name], seed=0, dtype=dtype) for name in chosen}
    optimizers = {name: AdamW(m.params, lr=1e-3) for name, m in models.items()}
    data = load_dataset("stdlib", seed=0)
    n = 2048  # a square GEMM large enough to reach the BLAS peak
    a, b = (np.random.default_rng(i).standard_normal((n, n)).astype(dtype) for i in (0, 1))
    out = np.empty((n, n), dtype)

    phases = {name: [] for name in chosen}  # per step: [forward, backward, optimizer]
    gemm: list[float] = []
    for step in range(args.steps + 2):  # two warm-up steps
        x, y = data.batch("train", 0, step, BATCH, BENCH.block_size)
        for name in chosen:  # alternating: both models see the same machine load
            times = timed_step(models[name], optimizers[name], x, y)
            if step >= 2:
                phases[name].append(times)
        gemm.append(sgemm_seconds(a, b, out))
    gemm_rate = 2 * n**3 / float(np.median(gemm[2:]))
    tokens = BATCH * BENCH.block_size
    steps = {}
    for name in chosen:
        config, table = configs[name], np.array(phases[name])
        step_time = float(np.median(table.sum(axis=1)))
        steps[name] = step_time
        model_flops = config.flops_per_token() * tokens
        achieved = model_flops / step_time
        print(f"{name}: {config}, batch {BATCH}, {args.dtype}, {config.num_parameters():,} params")
        for label, value in zip(
            ("forward", "backward", "optimizer"), np.median(table, axis=0), strict=True
        ):
            print(f"  {label:<10} {value * 1e3:8.1f} ms")
        print(f"  {'step':<10} {step_time * 1e3:8.1f} ms  ({tokens / step_time:,.0f} tokens/s)")
        print(f"  model FLOPs per step    {model_flops / 1e9:8.2f} GFLOP")
        print(f"  achieved                {achieved / 1e9:8.1f} GFLOP/s")
        print(f"  MFU against gemm        {achieved / gemm_rate:8.3f}")
    gemm_name = f"{'s' if dtype == np.float32 else 'd'}gemm {n}x{n}x{n}"
    print(f"{gemm_name:<25} {gemm_rate / 1e9:8.1f} GFLOP/s")
    if len(steps) == 2:
        print(f"llama step / gpt step     {steps['llama'] / steps['gpt']:8.2f}")


if __name__ == "__main__":
    main()
