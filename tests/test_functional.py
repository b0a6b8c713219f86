"""Gradient and value checks for the composed ops in civetta.functional.

Composed ops get their gradients from the axioms, so the finite-difference checks here test the
compositions (and numerical stability), while value checks compare against plain numpy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from civetta import Tensor, functional
from civetta.gradcheck import check_gradients

RTOL = 1e-6
_rng = np.random.default_rng(7)


@dataclass(frozen=True)
class Case:
    fn: Callable[..., Tensor]
    inputs: tuple[np.ndarray, ...]
    label: str


def normal(*shape: int) -> np.ndarray:
    return _rng.standard_normal(shape)


def positive(*shape: int) -> np.ndarray:
    return _rng.uniform(0.5, 2.0, shape)


def away_from_zero(*shape: int) -> np.ndarray:
    """relu and integer powers of negatives are fine, but FD must not straddle relu's kink."""
    return _rng.choice([-1.0, 1.0], shape) * _rng.uniform(0.1, 2.0, shape)


def _cases() -> list[Case]:
    cases: list[Case] = [
        Case(functional.sub, (normal(3, 1), normal(4)), "sub-broadcast"),
        Case(lambda a: functional.sub(1.5, a), (normal(2, 3),), "sub-scalar-first"),
        Case(functional.div, (normal(2, 3), positive(3)), "div-broadcast"),
        Case(lambda a: functional.div(2.0, a), (positive(2, 2),), "div-scalar-first"),
        Case(functional.sqrt, (positive(2, 3),), "sqrt"),
        Case(functional.tanh, (normal(3, 4) * 2,), "tanh"),
        Case(
            functional.tanh,
            (np.array([-30.0, -5.0, -1e-3, 0.0, 1e-3, 4.0, 25.0]),),
            "tanh-wide-range",
        ),
        Case(functional.relu, (away_from_zero(3, 4),), "relu"),
        Case(functional.gelu, (normal(3, 4) * 2,), "gelu"),
        Case(functional.gelu, (np.array([-40.0, -12.0, -3.0, 0.0, 0.5, 12.0]),), "gelu-wide-range"),
        Case(functional.silu, (normal(3, 4) * 2,), "silu"),
        Case(
            functional.silu,
            (np.array([-1e3, -40.0, -5.0, 0.0, 1e-3, 5.0, 40.0, 1e3]),),
            "silu-wide-range",
        ),
        Case(functional.swiglu, (normal(3, 4) * 2, normal(3, 4)), "swiglu"),
        Case(functional.rms_norm, (normal(2, 3, 5), normal(5)), "rms_norm"),
        Case(lambda x: functional.rms_norm(x, None), (normal(4, 6),), "rms_norm-no-weight"),
        Case(functional.rotate_half, (normal(2, 3, 6),), "rotate_half"),
        Case(
            lambda x: functional.rope(x, *functional.rope_tables(np.arange(3), 4, 1e4, np.float64)),
            (normal(2, 2, 3, 4),),
            "rope",
        ),
        Case(
            lambda q, k, v: functional.scaled_dot_product_attention(q, k, v),
            (normal(1, 4, 3, 2), normal(1, 2, 3, 2), normal(1, 2, 3, 2)),
            "scaled_dot_product_attention-grouped",
        ),
        Case(functional.matmul, (normal(3, 4), normal(4, 2)), "matmul-2d"),
        Case(functional.matmul, (normal(2, 3, 4), normal(4, 5)), "matmul-nd@2d"),
        Case(functional.matmul, (normal(3, 4), normal(2, 4, 5)), "matmul-2d@nd"),
        Case(functional.matmul, (normal(2, 1, 3, 4), normal(3, 4, 2)), "matmul-broadcast-batch"),
        Case(functional.matmul, (normal(2, 3, 4), normal(2, 4, 2)), "matmul-batched"),
    ]
    for exponent in (1, 2, 3, 4, 5, 7, -1, -2, -3):
        cases.append(
            Case(
                lambda a, e=exponent: functional.pow(a, e),
                (away_from_zero(2, 3),),
                f"pow-int-{exponent}",
            )
        )
    for exponent in (0.5, 1.5, -0.5, 2.5, 1 / 3):
        cases.append(
            Case(
                lambda a, e=exponent: functional.pow(a, e),
                (positive(2, 3),),
                f"pow-frac-{exponent:.3g}",
            )
        )
    cases.append(Case(lambda a: a**2.0, (normal(3),), "pow-float-integer-operator"))

    for axis, keepdims in ((None, False), (0, False), (-1, True), ((0, 2), False), ((1, 2), True)):
        label = f"axis={axis}-keepdims={keepdims}"
        cases.append(
            Case(
                lambda a, x=axis, k=keepdims: functional.mean(a, x, k),
                (normal(2, 3, 4),),
                f"mean-{label}",
            )
        )
        cases.append(
            Case(
                lambda a, x=axis, k=keepdims: functional.var(a, x, k),
                (normal(2, 3, 4),),
                f"var-{label}",
            )
        )
    cases.append(Case(functional.mean, (normal(),), "mean-0d"))

    for axis, keepdims in ((-1, False), (0, True), (1, False)):
        cases.append(
            Case(
                lambda a, x=axis, k=keepdims: functional.logsumexp(a, x, k),
                (normal(3, 4, 2) * 3,),
                f"logsumexp-axis={axis}-keepdims={keepdims}",
            )
        )
    for axis in (-1, 0):
        cases.append(
            Case(
                lambda a, x=axis: functional.softmax(a, x),
                (normal(3, 5) * 3,),
                f"softmax-axis={axis}",
            )
        )
        cases.append(
            Case(
                lambda a, x=axis: functional.log_softmax(a, x),
                (normal(3, 5) * 3,),
                f"log_softmax-axis={axis}",
            )
        )

    targets = np.array([1, 0, 4, 2])
    cases.append(
        Case(lambda z: functional.cross_entropy(z, targets), (normal(4, 5),), "cross_entropy")
    )
    seq_targets = np.array([[1, -100, 4], [-100, 0, 2]])
    cases.append(
        Case(
            lambda z: functional.cross_entropy(z, seq_targets),
            (normal(2, 3, 5),),
            "cross_entropy-ignored",
        )
    )
    cases.append(
        Case(
            lambda z: functional.cross_entropy(z, targets, ignore_index=2),
            (normal(4, 5),),
            "cross_entropy-custom-ignore",
        )
    )

    cases.append(
        Case(functional.layer_norm, (normal(3, 6), normal(6), normal(6)), "layer_norm-affine")
    )
    cases.append(
        Case(lambda x: functional.layer_norm(x, None, None), (normal(2, 3, 4),), "layer_norm-plain")
    )
    cases.append(
        Case(
            lambda x, w: functional.layer_norm(x, w, None),
            (normal(2, 5), normal(5)),
            "layer_norm-weight",
        )
    )

    # A fresh generator with a fixed seed per call: every evaluation draws the same mask.
    cases.append(
        Case(
            lambda x: functional.dropout(x, 0.3, np.random.default_rng(5)),
            (normal(4, 5),),
            "dropout",
        )
    )

    qkv = (normal(1, 2, 4, 3), normal(1, 2, 4, 3), normal(1, 2, 4, 3))
    cases.append(
        Case(
            lambda q, k, v: functional.scaled_dot_product_attention(q, k, v, True),
            qkv,
            "scaled_dot_product_attention-causal",
        )
    )
    cases.append(
        Case(
            lambda q, k, v: functional.scaled_dot_product_attention(q, k, v, False),
            qkv,
            "scaled_dot_product_attention-full",
        )
    )
    cases.append(
        Case(
            lambda q, k, v: functional.scaled_dot_product_attention(q, k, v, True),
            (normal(2, 1, 2, 3), normal(2, 1, 4, 3), normal(2, 1, 4, 3)),
            "scaled_dot_product_attention-causal-short-query",
        )
    )
    return cases


CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=[case.label for case in CASES])
def test_composed_gradient(case: Case) -> None:
    assert check_gradients(case.fn, list(case.inputs), seed=3, rtol=RTOL) <= RTOL


def test_every_composed_op_has_a_gradient_case() -> None:
    """A new differentiable function in functional.py needs a case above (labels start with
    the function's name)."""
    covered = {case.label.split("-")[0] for case in CASES}
    # A boolean mask, and the reference checked against matmul in value and gradient below.
    # rope_tables: constant tables, checked against float64 in test_fused.
    untested_by_design = {"causal_mask", "matmul_reference", "rope_tables"}
    public = {
        name
        for name, fn in vars(functional).items()
        if callable(fn)
        and getattr(fn, "__module__", None) == functional.__name__
        and name[0] != "_"
    }
    assert public - untested_by_design == covered


# ---- matmul is broadcast-multiply then sum ---------------------------------------------------
@pytest.mark.parametrize(
    ("sa", "sb"),
    [((3, 4), (4, 2)), ((2, 3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)), ((2, 1, 3, 4), (3, 4, 2))],
)
def test_matmul_equals_reference(sa: tuple[int, ...], sb: tuple[int, ...]) -> None:
    a_data, b_data = normal(*sa), normal(*sb)
    g = normal(*np.broadcast_shapes(sa[:-2], sb[:-2]), sa[-2], sb[-1])
    grads = []
    for op in (functional.matmul, functional.matmul_reference):
        a, b = Tensor(a_data, requires_grad=True), Tensor(b_data, requires_grad=True)
        out = op(a, b)
        np.testing.assert_allclose(out.data, a_data @ b_data, rtol=1e-12, atol=1e-12)
        out.backward(g)
        grads.append((a.grad, b.grad))
    (ga, gb), (ra, rb) = grads
    np.testing.assert_allclose(ga, ra, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gb, rb, rtol=1e-12, atol=1e-12)


def test_matmul_rejects_vectors() -> None:
    with pytest.raises(ValueError):
        functional.matmul(Tensor(np.ones(3)), Tensor(np.ones((3, 2))))


# ---- numerical stability ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", ["softmax", "log_softmax", "cross_entropy"])
def test_large_logits_stay_finite(op: str, dtype: type) -> None:
    logits = np.array([[1e4, 0.0, -1e4], [-1e4, -1e4, -1e4], [1e4, 1e4, -1e4]], dtype=dtype)
    z = Tensor(logits, requires_grad=True)
    if op == "cross_entropy":
        out = functional.cross_entropy(z, np.array([2, 0, 1]))
    else:
        out = getattr(functional, op)(z, -1)
    with np.errstate(all="raise"):  # also no overflow warnings on the way
        out.backward(np.ones(out.shape, dtype=dtype))
    assert out.dtype == dtype and z.grad.dtype == dtype
    assert np.all(np.isfinite(out.data)) and np.all(np.isfinite(z.grad))
    if op == "softmax":
        expected = [[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0]]
        np.testing.assert_allclose(out.data, expected, atol=1e-6)
    if op == "log_softmax":
        # No low bits lost to the large shift: -log 2 stays accurate next to 1e4 in float32.
        lg2, lg3 = math.log(2), math.log(3)
        expected = [[0.0, -1e4, -2e4], [-lg3, -lg3, -lg3], [-lg2, -lg2, -2e4 - lg2]]
        np.testing.assert_allclose(out.data, expected, rtol=1e-6, atol=1e-6)
    if op == "cross_entropy":
        # -log p: 2e4 for row 0 (target at -1e4), log 3 for row 1, log 2 for row 2.
        np.testing.assert_allclose(out.item(), (2e4 + math.log(3) + math.log(2)) / 3, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tanh_gelu_and_silu_gradients_finite_for_large_inputs(dtype: type) -> None:
    x = Tensor(np.array([-1e3, -60.0, -12.0, 12.0, 60.0, 1e3], dtype=dtype), requires_grad=True)
    with np.errstate(over="raise", invalid="raise"):
        functional.tanh(x).sum().backward()
        functional.gelu(x).sum().backward()
        functional.silu(x).sum().backward()
    assert np.all(np.isfinite(x.grad))
    np.testing.assert_allclose(functional.tanh(x).data, np.tanh(x.data), atol=1e-6)


def test_tanh_matches_numpy() -> None:
    x = np.linspace(-6, 6, 101)
    np.testing.assert_allclose(functional.tanh(Tensor(x)).data, np.tanh(x), rtol=1e-12, atol=1e-15)


def test_gelu_matches_tanh_formula() -> None:
    x = np.linspace(-8, 8, 161)
    expected = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(functional.gelu(Tensor(x)).data, expected, rtol=1e-12, atol=1e-15)


def test_pow_matches_numpy_for_negative_bases() -> None:
    x = np.array([-2.0, -0.5, 0.5, 3.0])
    for exponent in (1, 2, 3, 5, 8, -1, -3):
        np.testing.assert_allclose(
            functional.pow(Tensor(x), exponent).data, x**exponent, rtol=1e-13
        )
    np.testing.assert_allclose(functional.sqrt(Tensor(x[2:])).data, np.sqrt(x[2:]), rtol=1e-13)


def test_layer_norm_normalises_last_axis() -> None:
    x = normal(4, 3, 64) * 5 + 3
    out = functional.layer_norm(Tensor(x), None, None).data
    np.testing.assert_allclose(out.mean(axis=-1), 0.0, atol=1e-10)
    np.testing.assert_allclose(out.var(axis=-1), 1.0, rtol=1e-3)  # eps=1e-5 shrinks it slightly
    w, b = normal(64), normal(64)
    affine = functional.layer_norm(Tensor(x), Tensor(w), Tensor(b)).data
    np.testing.assert_allclose(affine, out * w + b, rtol=1e-12, atol=1e-12)


def test_mean_var_match_numpy() -> None:
    x = normal(3, 4, 5)
    for axis in (None, 0, (1, 2), -1):
        np.testing.assert_allclose(
            functional.mean(Tensor(x), axis).data, x.mean(axis=axis), rtol=1e-12
        )
        np.testing.assert_allclose(
            functional.var(Tensor(x), axis).data, x.var(axis=axis), rtol=1e-12
        )


def test_cross_entropy_value_and_ignored_targets() -> None:
    logits = normal(2, 3, 5)
    targets = np.array([[1, -100, 4], [-100, 0, 2]])
    z = Tensor(logits, requires_grad=True)
    loss = functional.cross_entropy(z, targets)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    kept = targets != -100
    expected = -np.mean(logp[kept, targets[kept]])
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-12)
    loss.backward()
    assert np.all(z.grad[~kept] == 0.0)  # ignored positions receive no gradient
    assert np.all(np.abs(z.grad[kept]) > 0.0)

    everything_ignored = functional.cross_entropy(Tensor(logits), np.full((2, 3), -100))
    assert everything_ignored.item() == 0.0


def test_dropout_mask_is_seeded_and_scaled() -> None:
    x = Tensor(np.ones((200, 50)))
    first = functional.dropout(x, 0.25, np.random.default_rng(11)).data
    again = functional.dropout(x, 0.25, np.random.default_rng(11)).data
    np.testing.assert_array_equal(first, again)
    assert set(np.unique(first)) == {0.0, 1 / 0.75}
    assert abs((first == 0).mean() - 0.25) < 0.02
    assert functional.dropout(x, 0.25, None, training=False) is x
    assert functional.dropout(x, 0.0, None) is x
    with pytest.raises(ValueError):
        functional.dropout(x, 0.5, None)


def _attention_numpy(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool) -> np.ndarray:
    scores = q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        tq, tk = scores.shape[-2:]
        scores = np.where(np.tril(np.ones((tq, tk), bool), k=tk - tq), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_numpy(causal: bool) -> None:
    q, k, v = normal(2, 3, 5, 4), normal(2, 3, 5, 4), normal(2, 3, 5, 4)
    out = functional.scaled_dot_product_attention(Tensor(q), Tensor(k), Tensor(v), causal)
    np.testing.assert_allclose(out.data, _attention_numpy(q, k, v, causal), rtol=1e-12)


def test_causal_attention_ignores_the_future() -> None:
    """Output at position t must not depend on keys/values after t: their gradient is zero."""
    q, k, v = (Tensor(normal(1, 2, 5, 4), requires_grad=True) for _ in range(3))
    out = functional.scaled_dot_product_attention(q, k, v, causal=True)
    g = np.zeros(out.shape)
    g[..., 2, :] = normal(1, 2, 4)  # only position 2's output
    out.backward(g)
    assert np.all(k.grad[..., 3:, :] == 0) and np.all(v.grad[..., 3:, :] == 0)
    assert np.all(k.grad[..., :3, :] != 0) and np.all(q.grad[..., 2, :] != 0)
    assert np.all(np.isfinite(q.grad))


def test_causal_mask_aligns_at_the_end() -> None:
    np.testing.assert_array_equal(
        functional.causal_mask(2, 4), [[True, True, True, False], [True, True, True, True]]
    )
