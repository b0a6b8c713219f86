"""civetta's elementwise and row kernels at the bench GPT's shapes, against PyTorch eager.

    python benchmarks/bench_kernels.py [--repeats 15] [--threads N] [--clock wall|cpu]

For each fused op (forward and backward of one node, float32): civetta on whole arrays (one
numpy pass per operation, `threads.BLOCK` set past the array size), civetta blocked on one
thread, blocked on `--threads` threads (when above 1), and the PyTorch eager op on the same
data and thread count. The variants run alternately, one call each in turn, and the median of
`--repeats` rounds is printed, so all see the same machine load. With numexpr or numba
installed, a GELU forward written in each is timed too (the candidates for a compiled kernel).
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from civetta import fused, threads
from civetta.functional import causal_mask
from civetta.tensor import Tensor

B, T, C, H, V = 16, 128, 256, 4, 256  # the bench GPT, batch 16
rng = np.random.default_rng(0)
# Wall time, or with `--clock cpu` this process's CPU time (all its threads'), which leaves out
# the time a shared machine gives the cores to other jobs.
clock = time.perf_counter


def array(*shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def civetta_cases() -> dict[str, Callable[[], Any]]:
    """Forward and backward of each op, one call."""
    hidden, x, w, b = array(B, T, 4 * C), array(B, T, C), array(C), array(C)
    scores, mask = array(B, H, T, T), causal_mask(T, T)
    logits, targets = array(B, T, V), rng.integers(0, V, size=(B, T))

    def run(op: Callable[..., Tensor], *args: Any) -> Callable[[], Any]:
        leaves = [Tensor(a, requires_grad=True) if isinstance(a, np.ndarray) else a for a in args]

        def once() -> None:
            out = op(*leaves)
            out.backward(np.ones_like(out.data))

        return once

    return {
        "gelu (B,T,4C)": run(fused.gelu, hidden),
        "layer_norm (B,T,C)": run(fused.layer_norm, x, w, b),
        "softmax causal (B,H,T,T)": lambda: _masked(scores, mask),
        "cross_entropy (B·T,V)": lambda: _loss(logits, targets),
    }


def _masked(scores: np.ndarray, mask: np.ndarray) -> None:
    leaf = Tensor(scores, requires_grad=True)
    out = fused.softmax(leaf, mask)
    out.backward(np.ones_like(out.data))


def _loss(logits: np.ndarray, targets: np.ndarray) -> None:
    leaf = Tensor(logits, requires_grad=True)
    fused.cross_entropy(leaf, targets).backward()


def torch_cases() -> dict[str, Callable[[], Any]]:
    import torch
    from torch.nn import functional as F  # noqa: N812 - PyTorch's own spelling

    def leaf(*shape: int) -> Any:
        return torch.from_numpy(array(*shape)).requires_grad_()

    hidden, x = leaf(B, T, 4 * C), leaf(B, T, C)
    w, b = leaf(C), leaf(C)
    scores = leaf(B, H, T, T)
    mask = torch.from_numpy(causal_mask(T, T))
    logits = leaf(B * T, V)
    targets = torch.from_numpy(rng.integers(0, V, size=B * T))

    def backward(out: Any) -> None:
        out.backward(torch.ones_like(out))

    return {
        "gelu (B,T,4C)": lambda: backward(F.gelu(hidden, approximate="tanh")),
        "layer_norm (B,T,C)": lambda: backward(F.layer_norm(x, (C,), w, b)),
        "softmax causal (B,H,T,T)": lambda: backward(
            torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        ),
        "cross_entropy (B·T,V)": lambda: F.cross_entropy(logits, targets).backward(),
    }


def compiled_gelus() -> dict[str, Callable[[], Any]]:
    """GELU forward (output and tanh, as civetta's) in numexpr and numba, where installed."""
    x = array(B, T, 4 * C)
    t, out = np.empty_like(x), np.empty_like(x)
    k = {"c0": np.float32(0.7978845608), "c1": np.float32(0.7978845608 * 0.044715)}
    k.update(half=np.float32(0.5), one=np.float32(1.0))
    variants: dict[str, Callable[[], Any]] = {
        "civetta blocked": lambda: threads.run_blocked(
            fused._gelu_forward,
            (x.reshape(-1, 4 * C), t.reshape(-1, 4 * C), out.reshape(-1, 4 * C)),
        )
    }
    if importlib.util.find_spec("numexpr"):
        import numexpr

        def with_numexpr() -> None:
            numexpr.evaluate("tanh(x * (c0 + c1 * x * x))", local_dict={"x": x, **k}, out=t)
            numexpr.evaluate("half * x * (one + t)", local_dict={"x": x, "t": t, **k}, out=out)

        variants["numexpr"] = with_numexpr
    if importlib.util.find_spec("numba"):
        import numba

        @numba.njit(parallel=True, cache=False)
        def gelu_numba(x: np.ndarray, t: np.ndarray, out: np.ndarray) -> None:
            xs, ts, outs = x.ravel(), t.ravel(), out.ravel()
            for i in numba.prange(xs.size):
                v = xs[i]
                th = np.tanh(v * (np.float32(0.7978845608) + np.float32(0.035677408) * v * v))
                ts[i] = th
                outs[i] = np.float32(0.5) * v * (np.float32(1.0) + th)

        gelu_numba(x, t, out)  # compile outside the timing
        variants["numba (parallel)"] = lambda: gelu_numba(x, t, out)
    return variants


def alternate(variants: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median ms per call of each variant, called in turn `repeats` times (after one warm-up)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(repeats + 1):
        for name, fn in variants.items():
            start = clock()
            fn()
            if round_:
                times[name].append(clock() - start)
    return {name: float(np.median(t)) * 1e3 for name, t in times.items()}


class Setting:
    """civetta's kernel layout for one variant: block size and engine threads."""

    def __init__(self, block: int, count: int) -> None:
        self.block, self.count = block, count

    def wrap(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> None:
            saved_block, saved_threads = threads.BLOCK, threads.set_engine_threads(self.count)
            threads.BLOCK = self.block
            try:
                fn()
            finally:
                threads.BLOCK = saved_block
                threads.set_engine_threads(saved_threads)

        return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=threads.engine_threads())
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    args = parser.parse_args()
    global clock
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    settings = {"whole": Setting(1 << 62, 1), "blocked 1 thr": Setting(threads.BLOCK, 1)}
    if args.threads > 1:
        settings[f"blocked {args.threads} thr"] = Setting(threads.BLOCK, args.threads)
    reference = torch_cases() if importlib.util.find_spec("torch") else {}
    if reference:
        import torch

        torch.set_num_threads(args.threads)
    columns = [*settings, *([f"torch {args.threads} thr"] if reference else [])]
    print(f"ms per forward + backward, float32, median of {args.repeats} alternating rounds")
    print(f"  {'op':<26}" + "".join(f"{c:>16}" for c in columns))
    for name, fn in civetta_cases().items():
        variants = {label: s.wrap(fn) for label, s in settings.items()}
        if name in reference:
            variants[columns[-1]] = reference[name]
        ms = alternate(variants, args.repeats)
        print(f"  {name:<26}" + "".join(f"{ms[c]:>16.2f}" for c in columns))
    gelus = compiled_gelus()
    if len(gelus) > 1:
        ms = alternate(gelus, args.repeats)
        print(f"GELU forward (B,T,4C), ms, {args.threads} threads where the variant threads")
        for label, value in ms.items():
            print(f"  {label:<26}{value:>16.2f}")


if __name__ == "__main__":
    main()
