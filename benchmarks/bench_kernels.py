"""civetta's elementwise and row kernels at the bench GPT's shapes, against PyTorch eager.

    python benchmarks/bench_kernels.py [--repeats 15] [--threads N] [--clock wall|cpu]

For each fused op (forward and backward of one node, float32): civetta's numpy kernels on
whole arrays (one pass per operation, `threads.BLOCK` set past the array size), blocked on one
thread, civetta's compiled kernels (`civetta.compiled`, where numba is installed) blocked on one
thread, both blocked on `--threads` threads (when above 1), and the PyTorch eager op on the same
data and thread count. The variants run alternately, one call each in turn, and the median of
`--repeats` rounds is printed, so all see the same machine load. A GELU forward is timed in
more ways too: in numexpr, and in one numba loop with its tanh inside (where each is installed),
against civetta's, whose compiled passes leave the tanh to numpy.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from civetta import compiled, fused, threads
from civetta.functional import causal_mask, rope_tables
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
    packed = array(B, T, 3, H, C // H).transpose(2, 0, 3, 1, 4)  # q, k, v views of one GEMM
    cos, sin = rope_tables(np.arange(T), C // H, 10000.0, np.float32)
    logits, targets = array(B, T, V), rng.integers(0, V, size=(B, T))

    def run(op: Callable[..., Tensor], *args: Any) -> Callable[[], Any]:
        leaves = [Tensor(a, requires_grad=True) if isinstance(a, np.ndarray) else a for a in args]

        def once() -> None:
            out = op(*leaves)
            out.backward(np.ones_like(out.data))

        return once

    return {
        "gelu (B,T,4C)": run(fused.gelu, hidden),
        "swiglu (B,T,4C)": run(fused.swiglu, hidden, hidden.copy()),
        "layer_norm (B,T,C)": run(fused.layer_norm, x, w, b),
        "rope q (B,H,T,C/H)": run(lambda q: fused.rope(q, cos, sin), packed[0]),
        "softmax causal (B,H,T,T)": lambda: _masked(scores, mask),
        "attention (B,H,T,C/H)": run(fused.scaled_dot_product_attention, *packed),
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
    up = leaf(B, T, 4 * C)
    w, b = leaf(C), leaf(C)
    q, k, v = (leaf(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)[i] for i in range(3))
    cos, sin = (torch.from_numpy(a) for a in rope_tables(np.arange(T), C // H, 1e4, np.float32))

    def rope(t: Any) -> Any:
        half = t.shape[-1] // 2
        return t * cos + torch.cat([-t[..., half:], t[..., :half]], dim=-1) * sin

    scores = leaf(B, H, T, T)
    mask = torch.from_numpy(causal_mask(T, T))
    logits = leaf(B * T, V)
    targets = torch.from_numpy(rng.integers(0, V, size=B * T))

    def backward(out: Any) -> None:
        out.backward(torch.ones_like(out))

    return {
        "gelu (B,T,4C)": lambda: backward(F.gelu(hidden, approximate="tanh")),
        "swiglu (B,T,4C)": lambda: backward(F.silu(hidden) * up),
        "layer_norm (B,T,C)": lambda: backward(F.layer_norm(x, (C,), w, b)),
        "rope q (B,H,T,C/H)": lambda: backward(rope(q)),
        "softmax causal (B,H,T,T)": lambda: backward(
            torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        ),
        "attention (B,H,T,C/H)": lambda: backward(
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
        ),
        "cross_entropy (B·T,V)": lambda: F.cross_entropy(logits, targets).backward(),
    }


def compiled_gelus() -> dict[str, Callable[[], Any]]:
    """GELU forward (output and tanh, as civetta's): civetta's numpy and compiled kernels, and
    numexpr and one numba loop with the tanh inside, where installed."""
    x = array(B, T, 4 * C)
    t, out = np.empty_like(x), np.empty_like(x)
    k = {"c0": np.float32(0.7978845608), "c1": np.float32(0.7978845608 * 0.044715)}
    k.update(half=np.float32(0.5), one=np.float32(1.0))
    rows = (x.reshape(-1, 4 * C), t.reshape(-1, 4 * C), out.reshape(-1, 4 * C))
    variants: dict[str, Callable[[], Any]] = {
        "civetta numpy blocked": lambda: threads.run_blocked(fused._gelu_forward, rows)
    }
    if compiled.available():
        compiled_gelu = fused._gelu_forward_compiled
        variants["civetta compiled blocked"] = lambda: threads.run_blocked(compiled_gelu, rows)
    if importlib.util.find_spec("numexpr"):
        import numexpr

        def with_numexpr() -> None:
            numexpr.evaluate("tanh(x * (c0 + c1 * x * x))", local_dict={"x": x, **k}, out=t)
            numexpr.evaluate("half * x * (one + t)", local_dict={"x": x, "t": t, **k}, out=out)

        variants["numexpr"] = with_numexpr
    if importlib.util.find_spec("numba"):
        import numba

        @numba.njit(cache=False)
        def gelu_numba(x: np.ndarray, t: np.ndarray, out: np.ndarray) -> None:
            xs, ts, outs = x.ravel(), t.ravel(), out.ravel()
            for i in range(xs.size):
                v = xs[i]
                th = np.tanh(v * (np.float32(0.7978845608) + np.float32(0.035677408) * v * v))
                ts[i] = th
                outs[i] = np.float32(0.5) * v * (np.float32(1.0) + th)

        gelu_numba(x, t, out)  # compile outside the timing
        variants["numba, tanh in the loop"] = lambda: gelu_numba(x, t, out)
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
    """civetta's kernel layout for one variant: block size, engine threads, compiled or not."""

    def __init__(self, block: int, count: int, compiled_kernels: bool = False) -> None:
        self.block, self.count, self.compiled = block, count, compiled_kernels

    def wrap(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> None:
            saved_block, saved_threads = threads.BLOCK, threads.set_engine_threads(self.count)
            saved_switch = os.environ.get("CIVETTA_COMPILED")
            threads.BLOCK = self.block
            os.environ["CIVETTA_COMPILED"] = "1" if self.compiled else "0"
            try:
                fn()
            finally:
                threads.BLOCK = saved_block
                threads.set_engine_threads(saved_threads)
                if saved_switch is None:
                    del os.environ["CIVETTA_COMPILED"]
                else:
                    os.environ["CIVETTA_COMPILED"] = saved_switch

        return run


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=threads.engine_threads())
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    args = parser.parse_args()
    global clock
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    settings = {"numpy whole": Setting(1 << 62, 1), "numpy 1 thr": Setting(threads.BLOCK, 1)}
    fast = compiled.available()
    if fast:
        settings["compiled 1 thr"] = Setting(threads.BLOCK, 1, compiled_kernels=True)
    if args.threads > 1:
        settings[f"numpy {args.threads} thr"] = Setting(threads.BLOCK, args.threads)
        if fast:
            settings[f"compiled {args.threads} thr"] = Setting(threads.BLOCK, args.threads, True)
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
