"""The fused fast paths in civetta.fused against their composed references.

A fused op is one graph node with a hand-written backward; it is only trusted because it agrees
with the composition it replaces (civetta.functional, or the axioms named in its docstring) in
value and in gradient. Both run in float64 with one random upstream gradient, and must agree to
~1e-12; each fused op also passes a finite-difference check of its own, and keeps float32 as
float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from civetta import Tensor, functional, fused
from civetta import axioms as ax
from civetta.gradcheck import check_gradients

TIGHT = 1e-12
_rng = np.random.default_rng(2024)


def normal(*shape: int, scale: float = 1.0) -> np.ndarray:
    return _rng.standard_normal(shape) * scale


def targets(
    shape: tuple[int, ...], vocab: int, ignored: int = 0, ignore_index: int = -100
) -> np.ndarray:
    """Integer targets with `ignored` of them set to `ignore_index`."""
    out = _rng.integers(0, vocab, size=shape)
    flat = out.reshape(-1)
    flat[_rng.choice(flat.size, size=ignored, replace=False)] = ignore_index
    return out


def assert_close(
    actual: np.ndarray, expected: np.ndarray, rtol: float = TIGHT, what: str = ""
) -> None:
    """Norm-wise relative agreement: max |a - e| <= rtol · max |e| (elementwise relative error
    would blow up on entries that are zero up to rounding)."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    scale = max(float(np.max(np.abs(expected), initial=0.0)), np.finfo(np.float64).tiny)
    error = float(np.max(np.abs(actual - expected), initial=0.0)) / scale
    assert error <= rtol, f"{what}: relative error {error:.3g} > {rtol:.3g}"


# ---- the references, spelled through the axioms where the docstring says so ---------------------
def linear_reference(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    out = ax.matmul(x, ax.transpose(w, (1, 0)))
    return out if b is None else ax.add(out, b)


def masked_softmax_reference(mask: np.ndarray) -> Callable[[Tensor], Tensor]:
    def reference(x: Tensor) -> Tensor:
        minus_inf = Tensor(np.array(-np.inf, dtype=x.dtype))
        return functional.softmax(ax.where(mask, x, minus_inf), axis=-1)

    return reference


def random_mask(shape: tuple[int, ...]) -> np.ndarray:
    """A mask with at least one allowed key per row (a fully masked row is 0/0 in both)."""
    mask = _rng.random(shape) < 0.6
    mask[..., 0] = True
    return mask


@dataclass(frozen=True)
class Case:
    label: str
    fast: Callable[..., Tensor]
    reference: Callable[..., Tensor]
    inputs: tuple[np.ndarray, ...]


def _cases() -> list[Case]:
    causal = functional.causal_mask(5, 5)
    wide = functional.causal_mask(3, 6)  # fewer queries than keys: aligned at the end
    ce_2d, ce_3d = targets((6,), 5, ignored=2), targets((2, 4), 7)
    ce_ignore_3 = targets((3, 4), 6, ignored=3, ignore_index=3)
    all_ignored = np.full((2, 3), -100)
    some_keys = random_mask((4, 6))
    cases = [
        Case(
            "linear-2d-bias",
            fused.linear,
            linear_reference,
            (normal(5, 4), normal(3, 4), normal(3)),
        ),
        Case(
            "linear-3d-bias",
            fused.linear,
            linear_reference,
            (normal(2, 5, 4), normal(6, 4), normal(6)),
        ),
        Case("linear-2d-nobias", fused.linear, linear_reference, (normal(5, 4), normal(3, 4))),
        Case("linear-3d-nobias", fused.linear, linear_reference, (normal(2, 3, 4), normal(2, 4))),
        Case(
            "linear-noncontiguous-input",
            lambda x, w, b: fused.linear(ax.transpose(x, (1, 0, 2)), w, b),
            lambda x, w, b: linear_reference(ax.transpose(x, (1, 0, 2)), w, b),
            (normal(3, 2, 4), normal(5, 4), normal(5)),
        ),
        Case("gelu-1d", fused.gelu, functional.gelu, (normal(7, scale=3.0),)),
        Case("gelu-3d", fused.gelu, functional.gelu, (normal(2, 3, 5, scale=2.0),)),
        Case(
            "gelu-wide-range",
            fused.gelu,
            functional.gelu,
            (np.array([-30.0, -6.0, -0.5, 0.0, 1e-3, 8.0]),),
        ),
        Case(
            "normalize-2d",
            fused.normalize,
            lambda x: functional.layer_norm(x, None, None),
            (normal(4, 8, scale=3.0) + 2.0,),
        ),
        Case(
            "normalize-3d-eps",
            lambda x: fused.normalize(x, eps=1e-3),
            lambda x: functional.layer_norm(x, None, None, eps=1e-3),
            (normal(2, 3, 5),),
        ),
        Case(
            "layer_norm-affine",
            fused.layer_norm,
            functional.layer_norm,
            (normal(2, 3, 6), normal(6), normal(6)),
        ),
        Case(
            "layer_norm-weight-only",
            lambda x, w: fused.layer_norm(x, w, None),
            lambda x, w: functional.layer_norm(x, w, None),
            (normal(4, 6), normal(6)),
        ),
        Case(
            "layer_norm-no-affine",
            lambda x: fused.layer_norm(x, None, None),
            lambda x: functional.layer_norm(x, None, None),
            (normal(3, 2, 4),),
        ),
        Case("softmax-2d", fused.softmax, functional.softmax, (normal(4, 7, scale=3.0),)),
        Case("softmax-4d", fused.softmax, functional.softmax, (normal(2, 2, 3, 5),)),
        Case(
            "softmax-causal-mask",
            lambda x: fused.softmax(x, causal),
            masked_softmax_reference(causal),
            (normal(2, 3, 5, 5, scale=2.0),),
        ),
        Case(
            "softmax-causal-mask-rectangular",
            lambda x: fused.softmax(x, wide),
            masked_softmax_reference(wide),
            (normal(2, 3, 6),),
        ),
        Case(
            "softmax-random-mask",
            lambda x: fused.softmax(x, some_keys),
            masked_softmax_reference(some_keys),
            (normal(4, 6),),
        ),
        Case(
            "attention-causal",
            fused.scaled_dot_product_attention,
            functional.scaled_dot_product_attention,
            (normal(2, 2, 5, 3), normal(2, 2, 5, 3), normal(2, 2, 5, 3)),
        ),
        Case(
            "attention-full",
            lambda q, k, v: fused.scaled_dot_product_attention(q, k, v, causal=False),
            lambda q, k, v: functional.scaled_dot_product_attention(q, k, v, causal=False),
            (normal(1, 3, 4, 2), normal(1, 3, 4, 2), normal(1, 3, 4, 2)),
        ),
        Case(
            "attention-causal-kv-longer",
            fused.scaled_dot_product_attention,
            functional.scaled_dot_product_attention,
            (normal(2, 1, 3, 4), normal(2, 1, 6, 4), normal(2, 1, 6, 4)),
        ),
        Case(
            "cross_entropy-2d-ignore",
            lambda z: fused.cross_entropy(z, ce_2d),
            lambda z: functional.cross_entropy(z, ce_2d),
            (normal(6, 5, scale=2.0),),
        ),
        Case(
            "cross_entropy-3d",
            lambda z: fused.cross_entropy(z, ce_3d),
            lambda z: functional.cross_entropy(z, ce_3d),
            (normal(2, 4, 7),),
        ),
        Case(
            "cross_entropy-custom-ignore_index",
            lambda z: fused.cross_entropy(z, ce_ignore_3, ignore_index=3),
            lambda z: functional.cross_entropy(z, ce_ignore_3, ignore_index=3),
            (normal(3, 4, 6),),
        ),
        Case(
            "cross_entropy-tensor-targets",
            lambda z: fused.cross_entropy(z, Tensor(ce_3d)),
            lambda z: functional.cross_entropy(z, ce_3d),
            (normal(2, 4, 7),),
        ),
    ]
    # Every target ignored: both define the loss as 0 with a zero gradient (not 0/0).
    cases.append(
        Case(
            "cross_entropy-all-ignored",
            lambda z: fused.cross_entropy(z, all_ignored),
            lambda z: functional.cross_entropy(z, all_ignored),
            (normal(2, 3, 4),),
        )
    )
    return cases


CASES = _cases()


def _leaves(arrays: tuple[np.ndarray, ...], dtype: type = np.float64) -> list[Tensor]:
    return [Tensor(np.array(a, dtype=dtype), requires_grad=True) for a in arrays]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_fused_matches_reference_in_value_and_gradient(case: Case) -> None:
    fast_inputs, ref_inputs = _leaves(case.inputs), _leaves(case.inputs)
    fast_out, ref_out = case.fast(*fast_inputs), case.reference(*ref_inputs)
    assert_close(fast_out.data, ref_out.data, what="value")

    upstream = np.random.default_rng(len(case.label)).standard_normal(ref_out.shape)
    kept_upstream = upstream.copy()
    fast_out.backward(upstream)
    ref_out.backward(upstream)
    # A fused backward works in place on scratch arrays; it must not write into its upstream.
    np.testing.assert_array_equal(upstream, kept_upstream)
    for i, (fast_leaf, ref_leaf, original) in enumerate(
        zip(fast_inputs, ref_inputs, case.inputs, strict=True)
    ):
        np.testing.assert_array_equal(fast_leaf.data, original, err_msg=f"input {i} was modified")
        assert ref_leaf.grad is not None and fast_leaf.grad is not None, f"input {i}: no grad"
        assert_close(fast_leaf.grad, ref_leaf.grad, what=f"grad of input {i}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_fused_passes_finite_differences(case: Case) -> None:
    check_gradients(case.fast, case.inputs, seed=3, rtol=1e-7)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_fused_keeps_float32(case: Case) -> None:
    leaves = _leaves(case.inputs, np.float32)
    out = case.fast(*leaves)
    assert out.dtype == np.float32
    out.backward(np.ones(out.shape, dtype=np.float32))
    for i, leaf in enumerate(leaves):
        assert leaf.grad is not None and leaf.grad.dtype == np.float32, f"input {i}"
    # Same numbers as float64, up to float32 rounding.
    reference = case.fast(*_leaves(case.inputs)).data
    assert_close(out.data.astype(np.float64), reference, rtol=1e-5, what="float32 value")


def test_causal_softmax_is_exactly_zero_above_the_diagonal() -> None:
    mask = functional.causal_mask(6, 6)
    probs = fused.softmax(Tensor(normal(2, 6, 6, scale=5.0)), mask).data
    assert np.all(probs[..., ~mask] == 0.0)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-14)


def test_cross_entropy_ignore_index_rows_get_no_gradient() -> None:
    y = np.array([[1, -100, 2], [-100, 0, 0]])
    logits = Tensor(normal(2, 3, 4), requires_grad=True)
    loss = fused.cross_entropy(logits, y)
    loss.backward()
    assert logits.grad is not None
    assert np.all(logits.grad[y == -100] == 0.0)
    # The mean runs over the 4 kept targets only.
    logp = logits.data - np.log(np.exp(logits.data).sum(axis=-1, keepdims=True))
    keep = y != -100
    expected = -logp[keep, y[keep]].sum() / keep.sum()
    assert loss.item() == pytest.approx(expected, rel=1e-13)


def test_linear_is_one_node_with_pytorch_layout() -> None:
    """W is (out, in): y = x · Wᵀ + b, as torch.nn.functional.linear."""
    x, w, b = normal(2, 3, 4), normal(5, 4), normal(5)
    out = fused.linear(Tensor(x), Tensor(w, requires_grad=True), Tensor(b))
    assert out.shape == (2, 3, 5)
    np.testing.assert_allclose(out.data, x @ w.T + b, rtol=1e-14)
    assert len(out._parents) == 3  # x, W, b: no intermediate nodes
