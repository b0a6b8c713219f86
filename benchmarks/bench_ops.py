"""Per-op overhead of civetta's forward + backward against the bare numpy calls doing the same math.

For each op, "civetta" times building the node and running `backward` with a given upstream
gradient into two leaves; "numpy" times the forward expression plus the numpy calls its backward
needs (for `a * b`: `a * b`, `g * b`, `g * a`; for `a @ b`: `a @ b`, `g @ b.T`, `a.T @ g`). The
ratio is the engine's overhead: Python bookkeeping for small arrays, ~1 for large ones. Each
figure is the median of many repeats measured in the same run.

On glibc, the benchmark first pins malloc's mmap and trim thresholds. By default glibc adapts the
mmap threshold as blocks are freed and trims the heap top, so whether a 4 MB array comes back
from the heap or from fresh pages (a page fault per 4 KiB) depends on the order of frees; that
swung the (1024, 1024) figures between 1x and 7x from run to run, measuring the allocator rather
than the engine.

Run: python benchmarks/bench_ops.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np

from civetta import Tensor
from civetta.allocator import keep_freed_memory


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def bench_pair(
    name: str,
    shape_a: tuple[int, ...],
    shape_b: tuple[int, ...],
    civetta_op: Callable[[Tensor, Tensor], Tensor],
    numpy_math: Callable[[np.ndarray, np.ndarray, np.ndarray], object],
    repeats: int,
) -> tuple[str, float, float]:
    rng = np.random.default_rng(0)
    a_data = rng.standard_normal(shape_a, dtype=np.float32)
    b_data = rng.standard_normal(shape_b, dtype=np.float32)
    a = Tensor(a_data, requires_grad=True)
    b = Tensor(b_data, requires_grad=True)
    g = rng.standard_normal(civetta_op(a, b).shape, dtype=np.float32)

    def through_civetta() -> None:
        a.grad = b.grad = None  # fresh leaves each time, no accumulation
        civetta_op(a, b).backward(g)

    held: list[object] = []

    def bare_numpy() -> None:
        # Keep the results until the next call, as the leaves keep .grad: the same allocation
        # pattern, so large arrays pay the same page faults on both sides.
        held.clear()
        held.append(numpy_math(a_data, b_data, g))

    # Interleave the two measurements in rounds so drift (clock, cache, thermals) hits both.
    civ, ref = [], []
    rounds = 5
    for _ in range(rounds):
        civ.append(median_seconds(through_civetta, max(repeats // rounds, 3)))
        ref.append(median_seconds(bare_numpy, max(repeats // rounds, 3)))
    return name, statistics.median(civ), statistics.median(ref)


def mul_math(a: np.ndarray, b: np.ndarray, g: np.ndarray) -> object:
    return a * b, g * b, g * a


def matmul_math(a: np.ndarray, b: np.ndarray, g: np.ndarray) -> object:
    return a @ b, g @ b.T, a.T @ g


def main() -> None:
    cases = [
        ("mul (64,)", (64,), (64,), lambda a, b: a * b, mul_math, 20_000),
        ("mul (256,)", (256,), (256,), lambda a, b: a * b, mul_math, 20_000),
        ("mul (1024,1024)", (1024, 1024), (1024, 1024), lambda a, b: a * b, mul_math, 100),
        ("matmul 512x512", (512, 512), (512, 512), lambda a, b: a @ b, matmul_math, 50),
    ]
    pinned = keep_freed_memory()
    print(f"malloc thresholds pinned: {'yes' if pinned else 'no (not glibc)'}")
    print(f"{'op':<18}{'civetta µs':>12}{'numpy µs':>12}{'ratio':>8}")
    for name, sa, sb, op, math, repeats in cases:
        label, civ, ref = bench_pair(name, sa, sb, op, math, repeats)
        print(f"{label:<18}{civ * 1e6:>12.1f}{ref * 1e6:>12.1f}{civ / ref:>8.2f}")


if __name__ == "__main__":
    main()
