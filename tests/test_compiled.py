"""The compiled (numba) normalisation kernels against the numpy kernels they replace.

`civetta.compiled` runs LayerNorm and RMSNorm rows at least `MIN_WIDTH` wide through numba
where it is installed; the numpy kernels in `civetta.fused` stay the fallback (and what every
narrower row runs). Both paths must agree in value and in every gradient, float64 to ~1e-13 and
float32 to ~1e-6 relative, and the compiled path must agree with the composed reference too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from civetta import Tensor, compiled, functional, fused, meta
from civetta.threads import set_engine_threads

pytest.importorskip("numba")  # the `fast` extra (in `test`): without it only numpy runs

WIDTH = 2 * compiled.MIN_WIDTH
_rng = np.random.default_rng(7)

# op, whether it takes a weight, whether it takes a bias, its composed reference
NORMS: list[tuple[Callable[..., Tensor], bool, bool, Callable[..., Tensor]]] = [
    (fused.layer_norm, True, True, functional.layer_norm),
    (fused.rms_norm, True, False, functional.rms_norm),
    (fused.normalize, False, False, lambda x: functional.layer_norm(x, None, None)),
    (fused.rms_normalize, False, False, lambda x: functional.rms_norm(x, None)),
]


def _run(op: Callable[..., Tensor], arrays: list[np.ndarray], g: np.ndarray) -> list[np.ndarray]:
    leaves = [Tensor(a.copy(), requires_grad=True) for a in arrays]
    out = op(*leaves)
    out.backward(g)
    grads = [leaf.grad for leaf in leaves]
    assert all(grad is not None for grad in grads)
    return [out.data, *(grad for grad in grads if grad is not None)]


def _case(
    weighted: bool, biased: bool, dtype: Any, rows: int = 300
) -> tuple[list[np.ndarray], np.ndarray]:
    x = (_rng.standard_normal((3, rows, WIDTH)) * 2 + 0.5).astype(dtype)
    arrays = [x]
    if weighted:
        arrays.append(_rng.standard_normal(WIDTH).astype(dtype))
    if biased:
        arrays.append(_rng.standard_normal(WIDTH).astype(dtype))
    return arrays, _rng.standard_normal(x.shape).astype(dtype)


def _assert_numpys_bits(
    monkeypatch: pytest.MonkeyPatch,
    op: Callable[..., Tensor],
    arrays: list[np.ndarray],
    g: np.ndarray,
) -> list[np.ndarray]:
    """Run `op` compiled, then on numpy (`CIVETTA_COMPILED=0`): the same output and gradients,
    bit for bit (NaN where NaN). Returns the compiled run's arrays."""
    with np.errstate(invalid="ignore", over="ignore"):
        fast = _run(op, arrays, g)
        monkeypatch.setenv("CIVETTA_COMPILED", "0")
        slow = _run(op, arrays, g)
    monkeypatch.delenv("CIVETTA_COMPILED")
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_array_equal(a, b)
    return fast


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-13), (np.float32, 2e-6)])
@pytest.mark.parametrize(
    "op, weighted, biased, reference", NORMS, ids=lambda o: getattr(o, "__name__", "")
)
def test_compiled_norm_matches_numpy_and_reference(
    monkeypatch: pytest.MonkeyPatch,
    op: Callable[..., Tensor],
    weighted: bool,
    biased: bool,
    reference: Callable[..., Tensor],
    dtype: Any,
    tol: float,
) -> None:
    arrays, g = _case(weighted, biased, dtype)
    assert compiled.used_for(arrays[0])
    fast = _run(op, arrays, g)
    monkeypatch.setenv("CIVETTA_COMPILED", "0")
    assert not compiled.used_for(arrays[0])
    slow = _run(op, arrays, g)
    composed = _run(reference, arrays, g)
    for got, numpy_path, ref in zip(fast, slow, composed, strict=True):
        assert got.dtype == dtype
        assert _relative(got, numpy_path) < tol
        assert _relative(got, ref) < tol * 10


def test_compiled_norms_split_rows_over_threads_with_the_same_bits() -> None:
    """The engine's threads share the row blocks (the kernels release the GIL): the result is
    the one-thread result bit for bit, since each row is computed alone."""
    arrays, g = _case(True, True, np.float32, rows=2048)  # large enough to be threaded
    previous = set_engine_threads(1)
    try:
        one = _run(fused.layer_norm, arrays, g)
        set_engine_threads(2)
        two = _run(fused.layer_norm, arrays, g)
    finally:
        set_engine_threads(previous)
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(a, b)


def test_compiled_norm_propagates_nan_to_its_row_only() -> None:
    arrays, g = _case(True, True, np.float32)
    arrays[0][1, 5, 17] = np.nan
    out, dx, *_ = _run(fused.layer_norm, arrays, g)
    assert np.isnan(out[1, 5]).all() and np.isnan(dx[1, 5]).all()
    assert np.isfinite(np.delete(out.reshape(-1, WIDTH), 300 + 5, axis=0)).all()


def test_narrow_data_free_and_integer_rows_stay_on_numpy() -> None:
    assert not compiled.used_for(np.zeros((4, compiled.MIN_WIDTH - 1), np.float32))
    assert not compiled.used_for(meta.shaped((4, WIDTH), np.float32))
    assert not compiled.used_for(np.zeros((4, WIDTH), np.int64))
    assert compiled.used_for(np.zeros((4, WIDTH), np.float32))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_compiled_gelu_returns_the_numpy_kernels_bits(
    monkeypatch: pytest.MonkeyPatch, dtype: Any
) -> None:
    x = (_rng.standard_normal((96, 4 * WIDTH)) * 3).astype(dtype)
    x[0, :8] = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-30, 30.0, -30.0]
    g = _rng.standard_normal(x.shape).astype(dtype)
    assert compiled.elementwise_for(x)
    _assert_numpys_bits(monkeypatch, fused.gelu, [x], g)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_compiled_adamw_returns_the_numpy_kernels_bits(
    monkeypatch: pytest.MonkeyPatch, dtype: Any
) -> None:
    from civetta.optim import AdamW

    start = _rng.standard_normal((300, 300)).astype(dtype)
    grads = [_rng.standard_normal(start.shape).astype(dtype) for _ in range(3)]
    results = []
    for switch in ("1", "0"):
        monkeypatch.setenv("CIVETTA_COMPILED", switch)
        weight = Tensor(start.copy(), requires_grad=True)
        bias = Tensor(np.ones(300, dtype), requires_grad=True)  # no decay, too small: numpy
        assert compiled.elementwise_for(weight.data) == (switch == "1")
        optimizer = AdamW({"w.weight": weight, "w.bias": bias}, lr=1e-2)
        for g in grads:
            weight.grad, bias.grad = g.copy(), g[0].copy()
            optimizer.step()
        results.append((weight.data.copy(), bias.data.copy()))
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_compiled_swiglu_returns_the_numpy_kernels_bits(
    monkeypatch: pytest.MonkeyPatch, dtype: Any
) -> None:
    gate = (_rng.standard_normal((3, 64, 2 * WIDTH)) * 4).astype(dtype)
    gate[0, 0, :6] = [np.nan, np.inf, -np.inf, 0.0, -0.0, 90.0]  # the first of a block, too
    up = _rng.standard_normal(gate.shape).astype(dtype)
    g = _rng.standard_normal(gate.shape).astype(dtype)
    _assert_numpys_bits(monkeypatch, fused.swiglu, [gate, up], g)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_compiled_rope_returns_the_numpy_kernels_bits_on_strided_heads(
    monkeypatch: pytest.MonkeyPatch, dtype: Any
) -> None:
    """q of a packed projection is a strided view (B, nh, T, hs) of (B, T, 3, nh, hs)."""
    batch, heads, t, hs = 4, 4, 64, 64
    packed = _rng.standard_normal((batch, t, 3, heads, hs)).astype(dtype)
    q = packed.transpose(2, 0, 3, 1, 4)[0]
    cos, sin = functional.rope_tables(np.arange(t), hs, 10000.0, dtype)
    g = _rng.standard_normal(q.shape).astype(dtype)

    def run() -> tuple[np.ndarray, np.ndarray]:
        x = Tensor(q, requires_grad=True)  # the strided view itself, not a copy
        out = fused.rope(x, cos, sin)
        out.backward(g)
        assert x.grad is not None
        return out.data, x.grad

    assert not q.flags.c_contiguous and compiled.elementwise_for(q)
    fast = run()
    monkeypatch.setenv("CIVETTA_COMPILED", "0")
    slow = run()
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_compiled_bias_add_returns_numpys_bits(monkeypatch: pytest.MonkeyPatch, dtype: Any) -> None:
    x = _rng.standard_normal((4, 200, WIDTH)).astype(dtype)
    weight = _rng.standard_normal((3 * WIDTH, WIDTH)).astype(dtype)
    bias = _rng.standard_normal(3 * WIDTH).astype(dtype)
    g = _rng.standard_normal((4, 200, 3 * WIDTH)).astype(dtype)
    _assert_numpys_bits(monkeypatch, fused.linear, [x, weight, bias], g)


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("causal", [True, False])
def test_compiled_attention_softmax_returns_the_numpy_kernels_bits(
    monkeypatch: pytest.MonkeyPatch, kv_heads: int, causal: bool
) -> None:
    q = _rng.standard_normal((3, 4, 128, 32)) * 3
    q[1, 2, 7, 5] = np.nan  # one query row of NaN: numpy's max makes the whole row NaN
    k, v = (_rng.standard_normal((3, kv_heads, 128, 32)) for _ in range(2))
    g = _rng.standard_normal(q.shape)

    def attention(*leaves: Tensor) -> Tensor:
        return fused.scaled_dot_product_attention(*leaves, causal=causal)

    fast = _assert_numpys_bits(monkeypatch, attention, [q, k, v], g)
    assert np.isnan(fast[0][1, 2, 7]).all()
