"""Two tables: civetta's per-op overhead against bare numpy, and each fused op against the
composed reference it replaces.

Overhead: for each op, "civetta" times building the node and running `backward` with a given
upstream gradient into two leaves; "numpy" times the forward expression plus the numpy calls its
backward needs (for `a * b`: `a * b`, `g * b`, `g * a`; for `a @ b`: `a @ b`, `g @ b.T`,
`a.T @ g`). The ratio is the engine's overhead: Python bookkeeping for small arrays, ~1 for large
ones. Each figure is the median of many repeats measured in the same run.

Fused vs composed: DESIGN.md allows a fused fast path where a benchmark shows it matters; this
table is that benchmark. For each op in `civetta.fused` (and the axiom `matmul`), forward +
backward with a random upstream gradient into every input, in float32, at the bench model's sizes
(vocab 256, block 128, n_embd 256, 4 heads, batch 16: activations (16, 128, 256), MLP hidden
(16, 128, 1024), attention scores (16, 4, 128, 128), logits (16, 128, 256)), against the
reference its test compares it with (`civetta.functional`, or the axioms its docstring names).
The Llama ops run at a small Llama's sizes (`LLAMA_*` below: activations (16, 128, 256), SwiGLU
hidden (16, 128, 688), q (16, 4, 128, 64) for rope, grouped-query attention with 4 query heads
over 2 key/value heads).
Composed and fused runs alternate; each figure is the median. `matmul_reference` materialises a
B×M×K×N product, and its backward two more of that size (g·b and g·a); a size whose measured
peak would pass 1 GiB is not run, and the row prints the temporary and the peak instead.

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
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from civetta import Tensor, functional, fused
from civetta import axioms as ax
from civetta.allocator import keep_freed_memory
from civetta.models.gpt import GPTConfig

BENCH = GPTConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=256)  # bench.yaml
BATCH = 16
# A small Llama at the bench model's width: head size 64, SwiGLU hidden ≈ 8/3 · 256 rounded to a
# multiple of 16, half as many key/value heads as query heads.
LLAMA_FFN_HIDDEN, LLAMA_KV_HEADS, LLAMA_ROPE_THETA = 688, 2, 10000.0
MATMUL_PEAK_LIMIT = 1 << 30  # bytes: matmul_reference is not run where its peak would pass this


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


# ---- fused vs composed -------------------------------------------------------------------------
@dataclass(frozen=True)
class FusedCase:
    op: str
    shape: str
    composed: Callable[..., Tensor]
    fused: Callable[..., Tensor]
    inputs: tuple[np.ndarray, ...]  # every one a leaf that requires grad
    rounds: int


def linear_reference(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    return ax.add(ax.matmul(x, ax.transpose(w, (1, 0))), b)


def masked_softmax_reference(mask: np.ndarray) -> Callable[[Tensor], Tensor]:
    def reference(x: Tensor) -> Tensor:
        return functional.softmax(ax.where(mask, x, Tensor(np.array(-np.inf, x.dtype))), axis=-1)

    return reference


def fused_cases(rng: np.random.Generator) -> list[FusedCase]:
    B, T, C, V, nh = BATCH, BENCH.block_size, BENCH.n_embd, BENCH.vocab_size, BENCH.n_head
    hidden, hs = 4 * C, C // nh

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32)

    causal = functional.causal_mask(T, T)
    targets = rng.integers(0, V, size=(B, T))
    ffn, nkv = LLAMA_FFN_HIDDEN, LLAMA_KV_HEADS
    cos, sin = functional.rope_tables(np.arange(T), hs, LLAMA_ROPE_THETA, np.float32)
    return [
        FusedCase(
            "linear (c_fc)",
            f"({B},{T},{C})·({hidden},{C})ᵀ",
            linear_reference,
            fused.linear,
            (normal(B, T, C), normal(hidden, C), normal(hidden)),
            51,
        ),
        FusedCase(
            "gelu", f"({B},{T},{hidden})", functional.gelu, fused.gelu, (normal(B, T, hidden),), 31
        ),
        FusedCase(
            "normalize",
            f"({B},{T},{C})",
            lambda x: functional.layer_norm(x, None, None),
            fused.normalize,
            (normal(B, T, C),),
            51,
        ),
        FusedCase(
            "layer_norm",
            f"({B},{T},{C})",
            functional.layer_norm,
            fused.layer_norm,
            (normal(B, T, C), normal(C), normal(C)),
            51,
        ),
        FusedCase(
            "softmax (causal)",
            f"({B},{nh},{T},{T})",
            masked_softmax_reference(causal),
            lambda x: fused.softmax(x, causal),
            (normal(B, nh, T, T),),
            31,
        ),
        FusedCase(
            "attention (causal)",
            f"q,k,v ({B},{nh},{T},{hs})",
            functional.scaled_dot_product_attention,
            fused.scaled_dot_product_attention,
            (normal(B, nh, T, hs), normal(B, nh, T, hs), normal(B, nh, T, hs)),
            31,
        ),
        FusedCase(
            "rms_norm",
            f"({B},{T},{C})",
            functional.rms_norm,
            fused.rms_norm,
            (normal(B, T, C), normal(C)),
            51,
        ),
        FusedCase(
            "rms_normalize",
            f"({B},{T},{C})",
            lambda x: functional.rms_norm(x, None),
            fused.rms_normalize,
            (normal(B, T, C),),
            51,
        ),
        FusedCase(
            "swiglu",
            f"({B},{T},{ffn}) x2",
            functional.swiglu,
            fused.swiglu,
            (normal(B, T, ffn), normal(B, T, ffn)),
            31,
        ),
        FusedCase(
            "rope",
            f"q ({B},{nh},{T},{hs})",
            lambda x: functional.rope(x, cos, sin),
            lambda x: fused.rope(x, cos, sin),
            (normal(B, nh, T, hs),),
            31,
        ),
        FusedCase(
            "attention (GQA)",
            f"q ({B},{nh},{T},{hs}) kv {nkv}h",
            functional.scaled_dot_product_attention,
            fused.scaled_dot_product_attention,
            (normal(B, nh, T, hs), normal(B, nkv, T, hs), normal(B, nkv, T, hs)),
            31,
        ),
        FusedCase(
            "cross_entropy",
            f"({B},{T},{V})",
            lambda z: functional.cross_entropy(z, targets),
            lambda z: fused.cross_entropy(z, targets),
            (normal(B, T, V),),
            51,
        ),
    ]


def forward_backward(
    op: Callable[..., Tensor], inputs: tuple[np.ndarray, ...], rng: np.random.Generator
) -> Callable[[], None]:
    """One call = build `op` on fresh leaves and backpropagate a fixed random upstream gradient."""
    leaves = [Tensor(a, requires_grad=True) for a in inputs]
    g = rng.standard_normal(op(*leaves).shape).astype(np.float32)

    def run() -> None:
        for leaf in leaves:
            leaf.grad = None  # no accumulation; the previous grads are freed here, on both sides
        op(*leaves).backward(g)

    return run


def interleaved_medians(
    first: Callable[[], None], second: Callable[[], None], rounds: int, warmup: int = 2
) -> tuple[float, float]:
    """Median seconds of each, alternating single runs (ABBA order) so drift hits both."""
    for _ in range(warmup):
        first()
        second()
    samples: tuple[list[float], list[float]] = ([], [])
    for i in range(rounds):
        for j in (0, 1) if i % 2 == 0 else (1, 0):
            start = time.perf_counter()
            (first, second)[j]()
            samples[j].append(time.perf_counter() - start)
    return statistics.median(samples[0]), statistics.median(samples[1])


def peak_bytes(run: Callable[[], None]) -> int:
    """Peak of numpy allocations during `run` (numpy reports its buffers to tracemalloc)."""
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def matmul_rows(rng: np.random.Generator) -> list[tuple[str, str, float | None, float, str]]:
    """`ax.matmul` against `functional.matmul_reference` for (n, n) @ (n, n), n = 64 then 512.

    The reference's peak memory is measured at n = 64 as a multiple of its (n, n, n) temporary
    (about 3: the product, then g·b and g·a in the backward) and scaled to n = 512.
    """
    rows = []
    peak_per_temporary = 0.0
    for n, rounds in ((64, 41), (512, 15)):
        inputs = tuple(rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
        temporary = n**3 * np.dtype(np.float32).itemsize
        fast = forward_backward(ax.matmul, inputs, rng)
        shape = f"({n},{n})@({n},{n})"
        if not peak_per_temporary:
            reference = forward_backward(functional.matmul_reference, inputs, rng)
            peak_per_temporary = peak_bytes(reference) / temporary
        peak = peak_per_temporary * temporary
        if peak > MATMUL_PEAK_LIMIT:
            note = (
                f"reference not run: {n}³ temporary {temporary / 2**30:.2f} GiB,"
                f" peak fwd+bwd ≈{peak / 2**30:.2f} GiB"
            )
            rows.append(("matmul", shape, None, median_seconds(fast, rounds, warmup=2), note))
            continue
        composed_s, fused_s = interleaved_medians(reference, fast, rounds)
        note = f"{n}³ temporary {temporary / 2**20:.0f} MiB, peak fwd+bwd {peak / 2**20:.0f} MiB"
        rows.append(("matmul", shape, composed_s, fused_s, note))
    return rows


def print_fused_table() -> None:
    rng = np.random.default_rng(0)
    print()
    print("fused vs composed reference: forward + backward, float32, median ms")
    print(f"{'op':<20}{'shape':<26}{'composed ms':>12}{'fused ms':>10}{'speed-up':>10}")
    for case in fused_cases(rng):
        composed = forward_backward(case.composed, case.inputs, rng)
        fast = forward_backward(case.fused, case.inputs, rng)
        composed_s, fused_s = interleaved_medians(composed, fast, case.rounds)
        print(
            f"{case.op:<20}{case.shape:<26}{composed_s * 1e3:>12.3f}{fused_s * 1e3:>10.3f}"
            f"{composed_s / fused_s:>9.2f}x"
        )
    for op, shape, composed_s, fused_s, note in matmul_rows(rng):
        if composed_s is None:
            print(f"{op:<20}{shape:<26}{'—':>12}{fused_s * 1e3:>10.3f}{'—':>10}  {note}")
        else:
            print(
                f"{op:<20}{shape:<26}{composed_s * 1e3:>12.3f}{fused_s * 1e3:>10.3f}"
                f"{composed_s / fused_s:>9.2f}x  {note}"
            )


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
    print_fused_table()


if __name__ == "__main__":
    main()
