"""The reverse-mode engine: graph walk, gradient accumulation, graph freeing, no_grad, dtypes and
the activation meter."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from garbage import collect_garbage

from civetta import Tensor, activation_meter, functional, is_grad_enabled, no_grad
from civetta import axioms as ax


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Objects must die by reference counting alone: a cycle would need the collector."""
    collect_garbage()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def leaf(*shape: int, seed: int = 0, dtype: type = np.float64) -> Tensor:
    data = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    return Tensor(data, requires_grad=True)


# ---- the graph walk ----------------------------------------------------------------------------
def test_deep_chain_backward_needs_no_recursion() -> None:
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    y = x
    for _ in range(10_000):
        y = y * 1.0001
    y.sum().backward()
    np.testing.assert_allclose(x.grad, 1.0001**10_000, rtol=1e-9)


def test_non_scalar_upstream_gradient() -> None:
    x = leaf(2, 3)
    g = np.random.default_rng(1).standard_normal((2, 3))
    (x * x).backward(g)
    np.testing.assert_allclose(x.grad, 2 * x.data * g)


def test_non_scalar_backward_needs_explicit_grad_of_matching_shape() -> None:
    x = leaf(2, 3)
    with pytest.raises(RuntimeError):
        (x * 2.0).backward()
    with pytest.raises(ValueError):
        (x * 2.0).backward(np.ones((3, 2)))
    with pytest.raises(RuntimeError):
        Tensor(np.ones(3)).sum().backward()  # nothing requires grad


def test_shared_subexpression_gets_summed_gradient() -> None:
    x = leaf(4)
    h = x.exp()
    y = h * h + h  # h is reached along three paths
    y.sum().backward()
    e = np.exp(x.data)
    np.testing.assert_allclose(x.grad, 2 * e * e + e)


def test_gradients_accumulate_across_backward_calls() -> None:
    x = leaf(3)
    (x * 2.0).sum().backward()
    first = x.grad.copy()
    (x * x).sum().backward()
    np.testing.assert_allclose(first, 2.0)
    np.testing.assert_allclose(x.grad, 2.0 + 2 * x.data)


def test_leaf_gradients_are_fresh_writable_arrays() -> None:
    """sum's backward yields a read-only broadcast view and add returns one array for both
    inputs; a leaf must still own its .grad, since optimizers and all-reduces write in place."""
    x = leaf(3, 2)
    x.sum().backward()
    x.grad *= 0.5
    np.testing.assert_array_equal(x.grad, 0.5)

    a, b = leaf(3), leaf(3, seed=1)
    g = np.ones(3)
    (a + b).backward(g)
    assert a.grad is not b.grad and not np.shares_memory(a.grad, b.grad)
    assert not np.shares_memory(a.grad, g)
    a.grad += 1.0
    np.testing.assert_array_equal(b.grad, 1.0)

    # Here add's upstream gradient is fresh (from mul), yet still handed to both leaves.
    a.grad = b.grad = None
    ((a + b) * 3.0).sum().backward()
    assert not np.shares_memory(a.grad, b.grad)
    a.grad[0] = 0.0
    np.testing.assert_array_equal(b.grad, 3.0)

    s = Tensor(np.array(2.0), requires_grad=True)
    (s * s).backward()
    assert isinstance(s.grad, np.ndarray) and s.grad.shape == () and s.grad == 4.0


def test_backward_on_a_leaf_copies_the_upstream_gradient() -> None:
    x = leaf(3)
    g = np.arange(3.0)
    x.backward(g)
    g[:] = -1.0
    np.testing.assert_array_equal(x.grad, [0.0, 1.0, 2.0])


# ---- graph freeing ---------------------------------------------------------------------------
def _graph_with_probes() -> tuple[Tensor, Tensor, Callable[[], object], Callable[[], object]]:
    """A graph y = sum(exp(x) * c) and weakrefs to an intermediate Tensor and to a constant
    array that only the graph (a closure) still holds."""
    x = leaf(5)
    c = np.random.default_rng(2).standard_normal(5)
    mid = x.exp()
    y = (mid * c).sum()
    probes = weakref.ref(mid), weakref.ref(c)
    del mid, c
    assert probes[0]() is not None and probes[1]() is not None  # the graph holds them
    return x, y, *probes


def test_backward_frees_the_graph(no_gc: None) -> None:
    x, y, mid, const = _graph_with_probes()
    y.backward()
    # Freed during backward, while y itself is still alive.
    assert mid() is None and const() is None
    del y
    assert x.grad is not None


def test_second_backward_without_retain_graph_raises() -> None:
    _, y, _, _ = _graph_with_probes()
    y.backward()
    with pytest.raises(RuntimeError, match="retain_graph"):
        y.backward()


def test_retain_graph_allows_second_backward(no_gc: None) -> None:
    x, y, mid, const = _graph_with_probes()
    y.backward(retain_graph=True)
    first = x.grad.copy()
    assert mid() is not None and const() is not None
    y.backward()
    np.testing.assert_allclose(x.grad, 2 * first)
    assert mid() is None and const() is None


def test_deleting_an_unused_graph_frees_it(no_gc: None) -> None:
    """No reference cycles: dropping the output without backward frees everything."""
    _, y, mid, const = _graph_with_probes()
    del y
    assert mid() is None and const() is None


# ---- no_grad and detach ------------------------------------------------------------------------
def test_no_grad_builds_no_graph() -> None:
    x = leaf(3)
    with no_grad():
        assert not is_grad_enabled()
        y = functional.gelu(x * 2.0 + 1.0).sum()
        with no_grad():
            pass
        assert not is_grad_enabled()  # nesting restores the outer state
    assert is_grad_enabled()
    assert not y.requires_grad and y.is_leaf and y._parents == ()
    with pytest.raises(RuntimeError):
        y.backward()


def test_no_grad_restores_state_after_an_exception() -> None:
    with pytest.raises(KeyError), no_grad():
        raise KeyError
    assert is_grad_enabled()


def test_detach_stops_gradient() -> None:
    x = leaf(3)
    d = x.detach()
    assert not d.requires_grad and d.is_leaf and np.shares_memory(d.data, x.data)
    (d * x).sum().backward()
    np.testing.assert_allclose(x.grad, x.data)  # not 2x: d is a constant


# ---- dtypes ------------------------------------------------------------------------------------
def test_default_dtypes() -> None:
    assert Tensor(1.5).dtype == np.float32
    assert Tensor([1.0, 2.0]).dtype == np.float32
    assert Tensor([[1, 2.5]]).dtype == np.float32
    assert Tensor(np.zeros(2)).dtype == np.float64  # numpy arrays keep their dtype
    assert Tensor(np.zeros(2), dtype=np.float32).dtype == np.float32
    assert Tensor([1, 2]).dtype.kind == "i"  # integer data (indices, targets) stays integer


def test_python_scalars_never_upcast_float32() -> None:
    x = Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    for result in (
        x * 0.5 + 1,
        1 - x,
        2.0 / x,
        x / 3,
        -x + 1e-3,
        x**2,
        x**0.5,
        np.float64(2.0) * x,
    ):
        assert result.dtype == np.float32, result
    y = (x * 0.5 + 1).sum()
    y.backward()
    assert x.grad.dtype == np.float32


def _every_functional_op(x: Tensor) -> dict[str, Tensor]:
    """Each composed op applied to x (shape (2, 3, 4)); constants are built in x's dtype."""
    d = x.dtype
    targets = np.array([[0, 3, -100], [1, 2, 3]])
    heads = ax.reshape(x, (1, 2, 3, 4))
    return {
        "sub": functional.sub(x, 1.0),
        "div": functional.div(x, 2.0),
        "pow": functional.pow(x, 3),
        "pow-frac": functional.pow(x * x + 1.0, 1.5),
        "sqrt": functional.sqrt(x * x + 1.0),
        "tanh": functional.tanh(x),
        "relu": functional.relu(x),
        "mean": functional.mean(x, axis=-1),
        "var": functional.var(x, axis=(0, 1)),
        "matmul": functional.matmul(x, Tensor(np.ones((4, 2), dtype=d))),
        "matmul_reference": functional.matmul_reference(x, Tensor(np.ones((4, 2), dtype=d))),
        "logsumexp": functional.logsumexp(x),
        "log_softmax": functional.log_softmax(x),
        "softmax": functional.softmax(x, axis=0),
        "cross_entropy": functional.cross_entropy(x, targets),
        "layer_norm": functional.layer_norm(
            x, Tensor(np.ones(4, dtype=d)), Tensor(np.zeros(4, dtype=d))
        ),
        "gelu": functional.gelu(x),
        "dropout": functional.dropout(x, 0.5, np.random.default_rng(0)),
        "scaled_dot_product_attention": functional.scaled_dot_product_attention(
            heads, heads, heads
        ),
        "rms_norm": functional.rms_norm(x, Tensor(np.ones(4, dtype=d))),
        "silu": functional.silu(x),
        "swiglu": functional.swiglu(x, x),
        "rotate_half": functional.rotate_half(x),
        "rope": functional.rope(
            ax.reshape(x, (1, 2, 3, 4)), *functional.rope_tables(np.arange(3), 4, 1e4, d)
        ),
    }


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_functional_op_keeps_dtype(dtype: type) -> None:
    x = leaf(2, 3, 4, dtype=dtype)
    results = _every_functional_op(x)
    public = {
        name
        for name, fn in vars(functional).items()
        if getattr(fn, "__module__", None) == functional.__name__ and not name.startswith("_")
    }
    # causal_mask is boolean; rope_tables returns constant arrays (its dtype is an argument).
    assert public - {"causal_mask", "rope_tables"} <= set(results)  # a new op must join
    for name, out in results.items():
        assert out.dtype == dtype, name
        out.backward(np.ones(out.shape, dtype=dtype))
    assert x.grad.dtype == dtype


def test_float64_end_to_end() -> None:
    x = leaf(4, 5)
    w = leaf(5, 3, seed=1)
    loss = functional.cross_entropy(
        functional.gelu(functional.layer_norm(x, None, None)) @ w, np.array([0, 2, 1, 1])
    )
    loss.backward()
    assert loss.dtype == np.float64 and x.grad.dtype == np.float64 and w.grad.dtype == np.float64


# ---- numpy interop -----------------------------------------------------------------------------
def test_numpy_operands_on_the_left_defer_to_tensor() -> None:
    x = leaf(3)
    out = np.full(3, 2.0) * x + np.ones(3)
    assert isinstance(out, Tensor)
    out.sum().backward()
    np.testing.assert_array_equal(x.grad, 2.0)


# ---- activation meter --------------------------------------------------------------------------
def test_activation_meter_returns_to_start_after_backward(no_gc: None) -> None:
    start = activation_meter.live
    activation_meter.reset_peak()
    x = leaf(64, 32)
    w = leaf(32, 16, seed=1)
    h = functional.gelu(x @ w)
    after_forward = activation_meter.live
    loss = functional.mean(h * h)
    assert after_forward > start and activation_meter.live >= after_forward
    peak_before_backward = activation_meter.peak
    assert peak_before_backward >= activation_meter.live
    loss.backward()
    assert activation_meter.live == start  # released during backward, not at garbage collection
    assert activation_meter.peak == peak_before_backward  # backward allocates no activations
    assert activation_meter.peak >= start + h.data.nbytes


def test_activation_meter_released_when_graph_is_dropped(no_gc: None) -> None:
    start = activation_meter.live
    x = leaf(100)
    y = (x.exp() * 3.0).sum()
    assert activation_meter.live > start
    del y
    assert activation_meter.live == start


def test_no_grad_holds_no_activations(no_gc: None) -> None:
    start = activation_meter.live
    x = leaf(100)
    with no_grad():
        y = (x.exp() * 3.0).sum()
    assert activation_meter.live == start and y.item() > 0
