"""civetta's blocked and threaded kernels (civetta.threads) give what one whole-array call gives.

The fused ops run their numpy kernels on blocks of rows, on `engine_threads()` threads, and the
attention's stacked GEMMs on one BLAS thread each. Every block's rows depend only on those rows:
the results are bitwise the same on any number of threads, and the same up to rounding for any
block size as in one whole-array call, in float32 and float64, values and gradients; the
composed references (tests/test_fused.py) hold for both layouts.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from civetta import axioms as ax
from civetta import fused, threads
from civetta.functional import causal_mask, rope_tables
from civetta.meta import MetaArray
from civetta.optim import AdamW
from civetta.tensor import Tensor
from launch.launcher import rank_environment, threads_per_rank

_rng = np.random.default_rng(7)


def _x(*shape: int, dtype: Any = np.float64) -> np.ndarray:
    return _rng.standard_normal(shape).astype(dtype)


@pytest.fixture
def layout() -> Iterator[Callable[[int, int], None]]:
    """Set (block size, engine threads) for the test, threading from two blocks on; restored
    afterwards."""
    saved = threads.BLOCK, threads.THREADED_MIN, threads.engine_threads()

    def set_layout(block: int, count: int) -> None:
        threads.BLOCK, threads.THREADED_MIN = block, min(block, 1 << 62)
        threads.set_engine_threads(count)

    yield set_layout
    threads.BLOCK, threads.THREADED_MIN = saved[:2]
    threads.set_engine_threads(saved[2])


def _cases(dtype: Any) -> dict[str, tuple[Callable[..., Tensor], tuple[np.ndarray, ...], tuple]]:
    """op, differentiable inputs, constant arguments."""
    cos, sin = rope_tables(np.arange(12), 8, 10000.0, dtype)
    return {
        "gelu": (fused.gelu, (_x(3, 12, 40, dtype=dtype),), ()),
        "normalize": (fused.normalize, (_x(3, 12, 40, dtype=dtype),), ()),
        "layer_norm": (
            fused.layer_norm,
            tuple(_x(*s, dtype=dtype) for s in [(3, 12, 40), (40,), (40,)]),
            (),
        ),
        "rms_normalize": (fused.rms_normalize, (_x(3, 12, 40, dtype=dtype),), ()),
        "rms_norm": (fused.rms_norm, (_x(3, 12, 40, dtype=dtype), _x(40, dtype=dtype)), ()),
        "softmax": (fused.softmax, (_x(3, 2, 12, 12, dtype=dtype),), ()),
        "causal softmax": (fused.softmax, (_x(3, 2, 12, 12, dtype=dtype),), (causal_mask(12, 12),)),
        "swiglu": (fused.swiglu, (_x(3, 12, 40, dtype=dtype), _x(3, 12, 40, dtype=dtype)), ()),
        "rope": (fused.rope, (_x(3, 2, 12, 8, dtype=dtype),), (cos, sin)),
        "attention": (
            fused.scaled_dot_product_attention,
            tuple(_x(3, 2, 12, 8, dtype=dtype) for _ in range(3)),
            (),
        ),
        "cross_entropy": (
            fused.cross_entropy,
            (_x(3, 12, 40, dtype=dtype),),
            (_rng.integers(0, 40, size=(3, 12)),),
        ),
    }


def _run(
    op: Callable[..., Tensor], inputs: tuple[np.ndarray, ...], args: tuple
) -> list[np.ndarray]:
    leaves = [Tensor(a.copy(), requires_grad=True) for a in inputs]
    out = op(*leaves, *args)
    g = np.random.default_rng(1).standard_normal(out.shape).astype(out.dtype)
    out.backward(g)
    return [out.data, *(leaf.grad for leaf in leaves)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(_cases(np.float64)))
def test_blocked_and_threaded_kernels_match_the_whole_array_call(
    name: str, dtype: Any, layout: Callable[[int, int], None]
) -> None:
    """Bitwise the same for any number of threads at one block size; across block sizes the
    same up to rounding (row sums run as BLAS GEMVs, whose order of summation in a row may
    depend on how many rows one call gets)."""
    op, inputs, args = _cases(dtype)[name]
    layout(1 << 62, 1)  # one block: each numpy operation over the whole array
    whole = _run(op, inputs, args)
    rtol = 1e-5 if dtype == np.float32 else 1e-13
    by_layout = {}
    for block, count in [(64, 1), (64, 2), (100, 3)]:  # many blocks, several threads
        layout(block, count)
        by_layout[block, count] = blocked = _run(op, inputs, args)
        for got, expected in zip(blocked, whole, strict=True):
            assert got.dtype == expected.dtype
            scale = float(np.max(np.abs(expected)))
            error = float(np.max(np.abs(got - expected)))
            assert error <= rtol * scale, f"{name} {block} {count}: {error / scale:.3g}"
    for one, two in zip(by_layout[64, 1], by_layout[64, 2], strict=True):
        np.testing.assert_array_equal(one, two, err_msg=f"{name}: 1 and 2 threads differ")


def test_batched_matmul_is_the_stacked_product(layout: Callable[[int, int], None]) -> None:
    a, b = _x(2, 3, 5, 4), _x(2, 3, 4, 6)
    layout(threads.BLOCK, 2)
    blas_before = threads.blas_threads()
    np.testing.assert_allclose(threads.batched_matmul(a, b), a @ b, rtol=1e-14)
    assert threads.blas_threads() == blas_before  # the one-thread BLAS setting is undone
    out = ax.matmul(Tensor(a, requires_grad=True), Tensor(b))
    np.testing.assert_allclose(out.data, a @ b, rtol=1e-14)


def test_data_free_arrays_run_in_one_call(layout: Callable[[int, int], None]) -> None:
    layout(8, 2)
    x = Tensor(MetaArray((64, 40), np.dtype(np.float32)), requires_grad=True)
    out = fused.gelu(x)
    assert type(out.data) is MetaArray and out.shape == (64, 40)


def test_adamw_blocked_update_is_bitwise_the_whole_update(
    layout: Callable[[int, int], None],
) -> None:
    def updated(block: int, count: int) -> np.ndarray:
        layout(block, count)
        p = Tensor(np.linspace(-1, 1, 3000, dtype=np.float32).reshape(60, 50))
        opt = AdamW({"w": p}, lr=1e-2)
        for step in range(3):
            p.grad = np.random.default_rng(step).standard_normal(p.shape).astype(np.float32)
            opt.step()
        return p.data

    np.testing.assert_array_equal(updated(64, 2), updated(1 << 62, 1))


def test_a_kernel_exception_reaches_the_caller(layout: Callable[[int, int], None]) -> None:
    layout(4, 2)

    def failing(block: np.ndarray) -> None:
        raise ValueError("from a worker")

    with pytest.raises(ValueError, match="from a worker"):
        threads.run_blocked(failing, (np.zeros((16, 4)),))


def test_each_rank_gets_its_share_of_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    assert threads_per_rank(2, cores=8) == 4
    assert threads_per_rank(3, cores=8) == 2
    assert threads_per_rank(16, cores=8) == 1
    for name in (
        "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "MKL_NUM_THREADS",
        "NUMEXPR_NUM_THREADS",
    ):
        monkeypatch.delenv(name, raising=False)
    env = rank_environment(1)
    assert env["OMP_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == str(threads_per_rank(1))
    assert rank_environment()["OMP_NUM_THREADS"] == "1"  # a baseline: one thread
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice wins
    assert rank_environment(2)["NUMEXPR_NUM_THREADS"] == "3"


def test_blocks_run_on_the_engine_threads(layout: Callable[[int, int], None]) -> None:
    layout(4, 2)
    names: set[str] = set()

    def record(block: np.ndarray) -> None:
        names.add(threading.current_thread().name)

    threads.run_blocked(record, (np.zeros((16, 4)),))
    assert names and all(name.startswith("civetta") for name in names)
    layout(4, 1)  # one thread: the caller's
    names.clear()
    threads.run_blocked(record, (np.zeros((16, 4)),))
    assert names == {threading.current_thread().name}
