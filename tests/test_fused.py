"""The fused fast paths in civetta.fused against their composed references.

A fused op is one graph node with a hand-written backward; it is only trusted because it agrees
with the composition it replaces (civetta.functional, or the axioms named in its docstring) in
value and in gradient. Both run in float64 with one random upstream gradient, and must agree to
~1e-12; each fused op also passes a finite-difference check of its own, keeps float32 as
float32, and runs data-free. The reference is the one `fused.FUSED` registers, and a coverage
test fails if a public op is missing from the registry or from the cases.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from civetta import Tensor, functional, fused, meta
from civetta import axioms as ax
from civetta.gradcheck import check_gradients
from civetta.meta import MetaArray
from civetta.meters import recording_gemms

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


# ---- the cases: each runs a fused op and its registered reference on the same leaves ------------
def random_mask(shape: tuple[int, ...]) -> np.ndarray:
    """A mask with at least one allowed key per row (a fully masked row is 0/0 in both)."""
    mask = _rng.random(shape) < 0.6
    mask[..., 0] = True
    return mask


@dataclass(frozen=True)
class Case:
    """`op(*prepare(leaves), *args, **kwargs)` against `fused.FUSED[op]` with the same call.

    `inputs` become the differentiable leaves; `args` are constants (masks, targets);
    `prepare` changes the leaves' layout before both ops see them."""

    label: str
    op: Callable[..., Tensor]
    inputs: tuple[np.ndarray, ...]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    prepare: Callable[..., tuple[Tensor, ...]] | None = None

    def _call(self, fn: Callable[..., Tensor], leaves: tuple[Tensor, ...]) -> Tensor:
        if self.prepare is not None:
            leaves = self.prepare(*leaves)
        return fn(*leaves, *self.args, **self.kwargs)

    def fast(self, *leaves: Tensor) -> Tensor:
        return self._call(self.op, leaves)

    def reference(self, *leaves: Tensor) -> Tensor:
        return self._call(fused.FUSED[self.op], leaves)


def _cases() -> list[Case]:
    causal = functional.causal_mask(5, 5)
    wide = functional.causal_mask(3, 6)  # fewer queries than keys: aligned at the end
    ce_2d, ce_3d = targets((6,), 5, ignored=2), targets((2, 4), 7)
    ce_ignore_3 = targets((3, 4), 6, ignored=3, ignore_index=3)
    all_ignored = np.full((2, 3), -100)
    some_keys = random_mask((4, 6))
    linear, gelu, normalize = fused.linear, fused.gelu, fused.normalize
    layer_norm, softmax, attention = (
        fused.layer_norm,
        fused.softmax,
        fused.scaled_dot_product_attention,
    )
    cross_entropy = fused.cross_entropy
    rms_norm, rms_normalize, swiglu, rope = (
        fused.rms_norm,
        fused.rms_normalize,
        fused.swiglu,
        fused.rope,
    )
    # Real rope tables (T = 5, D = 4) and arbitrary ones: the op must not rely on the halves of
    # a table being equal.
    cos, sin = functional.rope_tables(np.arange(5), 4, 10000.0, np.float64)
    any_cos, any_sin = normal(3, 6), normal(3, 6)
    large_gate = np.array([-1000.0, -100.0, -40.0, -20.0, 20.0, 40.0, 100.0, 1000.0])
    return [
        Case("linear-2d-bias", linear, (normal(5, 4), normal(3, 4), normal(3))),
        Case("linear-3d-bias", linear, (normal(2, 5, 4), normal(6, 4), normal(6))),
        Case("linear-2d-nobias", linear, (normal(5, 4), normal(3, 4))),
        Case("linear-3d-nobias", linear, (normal(2, 3, 4), normal(2, 4))),
        Case(
            "linear-noncontiguous-input",
            linear,
            (normal(3, 2, 4), normal(5, 4), normal(5)),
            prepare=lambda x, w, b: (ax.transpose(x, (1, 0, 2)), w, b),
        ),
        Case("gelu-1d", gelu, (normal(7, scale=3.0),)),
        Case("gelu-3d", gelu, (normal(2, 3, 5, scale=2.0),)),
        Case("gelu-wide-range", gelu, (np.array([-30.0, -6.0, -0.5, 0.0, 1e-3, 8.0]),)),
        Case("normalize-2d", normalize, (normal(4, 8, scale=3.0) + 2.0,)),
        Case("normalize-3d-eps", normalize, (normal(2, 3, 5),), kwargs={"eps": 1e-3}),
        Case("layer_norm-affine", layer_norm, (normal(2, 3, 6), normal(6), normal(6))),
        Case("layer_norm-weight-only", layer_norm, (normal(4, 6), normal(6)), args=(None,)),
        Case("layer_norm-no-affine", layer_norm, (normal(3, 2, 4),), args=(None, None)),
        Case(
            "layer_norm-bias-only",
            layer_norm,
            (normal(4, 6), normal(6)),
            prepare=lambda x, b: (x, None, b),
        ),
        Case("rms_norm-weight", rms_norm, (normal(2, 3, 6, scale=3.0) + 1.0, normal(6))),
        Case("rms_norm-no-weight", rms_norm, (normal(4, 6),), args=(None,)),
        Case("rms_norm-eps", rms_norm, (normal(3, 5, scale=0.1), normal(5)), kwargs={"eps": 1e-2}),
        Case("rms_normalize-2d", rms_normalize, (normal(4, 8, scale=3.0) + 2.0,)),
        Case("rms_normalize-3d-eps", rms_normalize, (normal(2, 3, 5),), kwargs={"eps": 1e-3}),
        Case("swiglu-2d", swiglu, (normal(4, 6, scale=2.0), normal(4, 6))),
        Case("swiglu-3d", swiglu, (normal(2, 3, 5, scale=3.0), normal(2, 3, 5))),
        # exp(1000) overflows: the sigmoid must never compute it, nor 0 · inf in the backward.
        # (A small `up` keeps the finite differences' rounding, ~1e-16 · |loss| / 1e-6, small.)
        Case("swiglu-large-gate", swiglu, (large_gate, normal(large_gate.size, scale=0.1))),
        Case("rope-tables", rope, (normal(2, 3, 5, 4),), args=(cos, sin)),
        Case("rope-any-tables", rope, (normal(1, 2, 3, 6),), args=(any_cos, any_sin)),
        Case(  # as the model calls it: heads split off a (B, T, nh, D) projection
            "rope-noncontiguous-input",
            rope,
            (normal(2, 5, 3, 4),),
            args=(cos, sin),
            prepare=lambda x: (ax.transpose(x, (0, 2, 1, 3)),),
        ),
        Case("softmax-2d", softmax, (normal(4, 7, scale=3.0),)),
        Case("softmax-4d", softmax, (normal(2, 2, 3, 5),)),
        Case("softmax-causal-mask", softmax, (normal(2, 3, 5, 5, scale=2.0),), args=(causal,)),
        Case("softmax-causal-mask-rectangular", softmax, (normal(2, 3, 6),), args=(wide,)),
        Case("softmax-random-mask", softmax, (normal(4, 6),), args=(some_keys,)),
        Case(
            "attention-causal",
            attention,
            (normal(2, 2, 5, 3), normal(2, 2, 5, 3), normal(2, 2, 5, 3)),
        ),
        Case(
            "attention-full",
            attention,
            (normal(1, 3, 4, 2), normal(1, 3, 4, 2), normal(1, 3, 4, 2)),
            kwargs={"causal": False},
        ),
        Case(
            "attention-causal-kv-longer",
            attention,
            (normal(2, 1, 3, 4), normal(2, 1, 6, 4), normal(2, 1, 6, 4)),
        ),
        # Grouped-query attention: 4 query heads over 2 or 1 key/value heads.
        Case(
            "attention-gqa-2kv-causal",
            attention,
            (normal(2, 4, 5, 3), normal(2, 2, 5, 3), normal(2, 2, 5, 3)),
        ),
        Case(
            "attention-gqa-2kv-full",
            attention,
            (normal(2, 4, 5, 3), normal(2, 2, 5, 3), normal(2, 2, 5, 3)),
            kwargs={"causal": False},
        ),
        Case(
            "attention-gqa-1kv-causal",
            attention,
            (normal(1, 4, 4, 2), normal(1, 1, 4, 2), normal(1, 1, 4, 2)),
        ),
        Case(
            "attention-gqa-1kv-full",
            attention,
            (normal(2, 4, 3, 2), normal(2, 1, 3, 2), normal(2, 1, 3, 2)),
            kwargs={"causal": False},
        ),
        Case(
            "attention-gqa-causal-kv-longer",
            attention,
            (normal(1, 4, 3, 4), normal(1, 2, 6, 4), normal(1, 2, 6, 4)),
        ),
        Case(  # as the model calls it: q, k, v split off (B, T, heads, D) projections
            "attention-gqa-noncontiguous",
            attention,
            (normal(2, 5, 4, 3), normal(2, 5, 2, 3), normal(2, 5, 2, 3)),
            prepare=lambda q, k, v: tuple(ax.transpose(t, (0, 2, 1, 3)) for t in (q, k, v)),
        ),
        Case("cross_entropy-2d-ignore", cross_entropy, (normal(6, 5, scale=2.0),), args=(ce_2d,)),
        Case("cross_entropy-3d", cross_entropy, (normal(2, 4, 7),), args=(ce_3d,)),
        Case(
            "cross_entropy-custom-ignore_index",
            cross_entropy,
            (normal(3, 4, 6),),
            args=(ce_ignore_3,),
            kwargs={"ignore_index": 3},
        ),
        Case(
            "cross_entropy-tensor-targets", cross_entropy, (normal(2, 4, 7),), args=(Tensor(ce_3d),)
        ),
        # Every target ignored: both define the loss as 0 with a zero gradient (not 0/0).
        Case("cross_entropy-all-ignored", cross_entropy, (normal(2, 3, 4),), args=(all_ignored,)),
    ]


CASES = _cases()
# The flash kernel on every attention case: same values and gradients, fewer arrays kept.
CASES += [
    dataclasses.replace(c, label=c.label.replace("attention", "flash"), op=fused.flash_attention)
    for c in CASES
    if c.op is fused.scaled_dot_product_attention
]


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


# ---- SwiGLU at large |gate| --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "op",
    [lambda g, u: ax.mul(functional.silu(g), u), functional.swiglu, fused.swiglu],
    ids=["silu", "functional-swiglu", "fused-swiglu"],
)
def test_swiglu_is_finite_and_exact_for_large_gates(op: Callable[..., Tensor], dtype: type) -> None:
    """exp(1000) overflows: no exp of a positive number, in the forward or the backward (whose
    0 · inf would be NaN), and no cancellation: silu(-30) keeps its relative precision."""
    values = np.array([-1e3, -100.0, -30.0, -1.0, 0.0, 1.0, 30.0, 100.0, 1e3])
    gate = Tensor(values.astype(dtype), requires_grad=True)
    up = Tensor(np.ones(values.size, dtype=dtype), requires_grad=True)
    with np.errstate(over="raise", invalid="raise"):
        out = op(gate, up)
        out.backward(np.ones(out.shape, dtype=dtype))
    assert gate.grad is not None and up.grad is not None
    sig = np.exp(-np.logaddexp(0.0, -values))  # sigmoid in float64, without overflow
    silu_prime = sig * (1 + values * (1 - sig))
    rtol = 1e-6 if dtype == np.float32 else 1e-14
    for actual, expected in (
        (out.data, values * sig),
        (gate.grad, silu_prime),
        (up.grad, values * sig),
    ):
        assert actual.dtype == dtype
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=1e-30)


# ---- rotary embeddings and grouped-query attention ----------------------------------------------
ROPES = [functional.rope, fused.rope]


def test_rope_tables_match_an_independent_float64_evaluation() -> None:
    positions, head_dim, theta = np.array([0, 1, 7, 100, 2047]), 8, 500000.0
    cos, sin = functional.rope_tables(positions, head_dim, theta, np.float64)
    assert cos.shape == sin.shape == (5, 8) and cos.dtype == np.float64
    for row, p in enumerate(positions):
        for i in range(head_dim):
            # Hugging Face's inv_freq: 1 / theta^(2j / D), frequency j shared by i = j, j + D/2.
            angle = int(p) / theta ** (2 * (i % (head_dim // 2)) / head_dim)
            assert cos[row, i] == pytest.approx(math.cos(angle), rel=1e-13, abs=1e-13)
            assert sin[row, i] == pytest.approx(math.sin(angle), rel=1e-13, abs=1e-13)
    # float32 tables are the float64 ones rounded once (not computed in float32).
    cos32, sin32 = functional.rope_tables(positions, head_dim, theta, np.float32)
    assert cos32.dtype == sin32.dtype == np.float32
    np.testing.assert_array_equal(cos32, cos.astype(np.float32))
    np.testing.assert_array_equal(sin32, sin.astype(np.float32))


def test_rope_tables_are_shape_only_for_data_free_positions() -> None:
    cos, sin = functional.rope_tables(meta.arange(6, like=MetaArray(())), 4, 1e4, np.float32)
    for table in (cos, sin):
        assert isinstance(table, MetaArray)
        assert (table.shape, table.dtype) == ((6, 4), np.float32)
    with pytest.raises(ValueError, match="even head_dim"):
        functional.rope_tables(np.arange(3), 5, 1e4, np.float64)


@pytest.mark.parametrize("op", ROPES, ids=["functional", "fused"])
def test_rope_rotates_each_pair_of_halves(op: Callable[..., Tensor]) -> None:
    """Pair (i, i + D/2) is rotated by position · frequency i: its norm is kept, and position 0
    is the identity."""
    x = normal(2, 3, 6, 8)
    cos, sin = functional.rope_tables(np.arange(6), 8, 10000.0, np.float64)
    out = op(Tensor(x), cos, sin).data
    pair_norm = np.hypot(x[..., :4], x[..., 4:])
    np.testing.assert_allclose(np.hypot(out[..., :4], out[..., 4:]), pair_norm, rtol=1e-13)
    np.testing.assert_allclose(np.sum(out**2, axis=-1), np.sum(x**2, axis=-1), rtol=1e-13)
    np.testing.assert_array_equal(out[..., 0, :], x[..., 0, :])


@pytest.mark.parametrize("op", ROPES, ids=["functional", "fused"])
def test_rope_scores_depend_only_on_relative_position(op: Callable[..., Tensor]) -> None:
    """q at position m against k at n: the score after rope is a function of m − n."""
    d = 16
    q, k = normal(d), normal(d)
    cos, sin = functional.rope_tables(np.arange(300), d, 10000.0, np.float64)

    def at(x: np.ndarray, p: int) -> np.ndarray:
        row = slice(p, p + 1)  # x as (B, H, T, D) = (1, 1, 1, d) at position p
        return op(Tensor(x.reshape(1, 1, 1, d)), cos[row], sin[row]).data.reshape(d)

    for offset in (0, 1, 5, 37):
        scores = [at(q, n + offset) @ at(k, n) for n in (0, 3, 50, 250)]
        np.testing.assert_allclose(scores, scores[0], rtol=1e-11, atol=1e-12)
    # ... and does change with it: positions do reach the scores.
    assert abs(at(q, 5) @ at(k, 0) - q @ k) > 1e-3


def _numpy_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool) -> np.ndarray:
    """Head by head in plain numpy, query head h reading kv head h // (nh // nkv)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    out = np.empty(q.shape)
    mask = np.tril(np.ones((q.shape[2], k.shape[2]), dtype=bool), k=k.shape[2] - q.shape[2])
    for b in range(q.shape[0]):
        for h in range(heads):
            kv = h // (heads // kv_heads)
            scores = q[b, h] @ k[b, kv].T / math.sqrt(q.shape[-1])
            if causal:
                scores = np.where(mask, scores, -np.inf)
            p = np.exp(scores - scores.max(axis=-1, keepdims=True))
            out[b, h] = p / p.sum(axis=-1, keepdims=True) @ v[b, kv]
    return out


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize(
    "op",
    [functional.scaled_dot_product_attention, fused.scaled_dot_product_attention],
    ids=["functional", "fused"],
)
def test_grouped_query_attention_matches_repeated_kv_heads(
    op: Callable[..., Tensor], causal: bool, kv_heads: int
) -> None:
    q, k, v = normal(2, 4, 5, 3), normal(2, kv_heads, 5, 3), normal(2, kv_heads, 5, 3)
    out = op(Tensor(q), Tensor(k), Tensor(v), causal=causal).data
    np.testing.assert_allclose(out, _numpy_attention(q, k, v, causal), rtol=1e-12, atol=1e-14)


def test_grouped_query_attention_multiplies_each_kv_head_once() -> None:
    """The fused GQA runs one batched GEMM per kv head over its group's queries (B·nkv products
    of (rep·T, D)·(D, T)): k and v are never repeated."""
    b, heads, kv_heads, t, d = 2, 4, 2, 5, 3
    leaves = _leaves((normal(b, heads, t, d), normal(b, kv_heads, t, d), normal(b, kv_heads, t, d)))
    with recording_gemms() as log:
        out = fused.scaled_dot_product_attention(*leaves)
        out.backward(np.ones(out.shape))
    rep_t = heads // kv_heads * t
    assert [(g.m, g.k, g.n, g.batch, g.phase) for g in log.gemms] == [
        (rep_t, d, t, b * kv_heads, "forward"),  # q·kᵀ
        (rep_t, t, d, b * kv_heads, "forward"),  # p·v
        (rep_t, d, t, b * kv_heads, "backward-input"),
        (t, rep_t, d, b * kv_heads, "backward-input"),
        (rep_t, t, d, b * kv_heads, "backward-input"),
        (t, rep_t, d, b * kv_heads, "backward-input"),  # dk (the composed ops: dkᵀ)
    ]


def test_attention_rejects_kv_heads_that_do_not_divide_query_heads() -> None:
    q, kv = Tensor(normal(1, 4, 3, 2)), Tensor(normal(1, 3, 3, 2))
    for op in (functional.scaled_dot_product_attention, fused.scaled_dot_product_attention):
        with pytest.raises(ValueError, match="dividing"):
            op(q, kv, kv)


# ---- the registry, closures, data-free runs ---------------------------------------------------
def test_every_fused_op_is_registered_and_checked_against_its_reference() -> None:
    public = {
        fn
        for name, fn in vars(fused).items()
        if inspect.isfunction(fn) and fn.__module__ == fused.__name__ and not name.startswith("_")
    } - {fused.attention_kernel}  # the kernel switch, not an op
    assert public == set(fused.FUSED), "register each fused op with its composed reference"
    # A case compares its op with `fused.FUSED[op]`: every op needs at least one.
    assert public <= {case.op for case in CASES}, "give each fused op a reference case"
    for fast, reference in fused.FUSED.items():
        assert reference.__module__ != fused.__name__ or reference.__name__.startswith("_")
        assert fast is not reference


def _captured(fn: Any, seen: set[int]) -> list[Any]:
    """Everything `fn`'s closure holds, through the functions it holds."""
    if id(fn) in seen or not callable(fn):
        return []
    seen.add(id(fn))
    found = []
    for cell in getattr(fn, "__closure__", None) or ():
        value = cell.cell_contents
        found.append(value)
        if inspect.isfunction(value):
            found += _captured(value, seen)
    return found


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_no_backward_closure_captures_a_tensor(case: Case) -> None:
    """A closure that holds a Tensor keeps its graph (and a parameter's .grad) alive."""
    out = case.fast(*_leaves(case.inputs))
    stack, seen = [out], set()
    while stack:
        node = stack.pop()
        if id(node) in seen or node._backward is None:
            continue
        seen.add(id(node))
        held = [v for v in _captured(node._backward, set()) if isinstance(v, Tensor)]
        assert not held, f"{case.label}: a backward closure holds {len(held)} Tensor(s)"
        stack.extend(node._parents)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_fused_runs_data_free(case: Case) -> None:
    """On shape-only inputs: the shapes and dtypes of a real run, value and gradients."""
    real_leaves = _leaves(case.inputs, np.float32)
    real = case.fast(*real_leaves)
    real.backward(np.ones(real.shape, np.float32))
    leaves = [Tensor(MetaArray(a.shape, np.float32), requires_grad=True) for a in case.inputs]
    out = case.fast(*leaves)
    assert isinstance(out.data, MetaArray)
    assert (out.shape, out.dtype) == (real.shape, real.dtype)
    out.backward(np.ones_like(out.data))
    for leaf, real_leaf in zip(leaves, real_leaves, strict=True):
        assert isinstance(leaf.grad, MetaArray) and real_leaf.grad is not None
        assert (leaf.grad.shape, leaf.grad.dtype) == (real_leaf.grad.shape, real_leaf.grad.dtype)


def test_flash_keeps_no_score_matrix_and_logs_the_tiles_it_runs() -> None:
    from civetta.meters import activation_meter, recording_gemms

    b, heads, t, d = 1, 2, 256, 8
    leaves = [Tensor(normal(b, heads, t, d), requires_grad=True) for _ in range(3)]
    kept = {}
    for kernel in fused.ATTENTION_KERNELS:
        before = activation_meter.live
        with fused.attention_kernel(kernel), recording_gemms() as log:
            out = fused.scaled_dot_product_attention(*leaves)
            kept[kernel] = activation_meter.live - before
            out.sum().backward()
            flops = log.flops("forward")
        kept[kernel, "flops"] = flops
    scores = b * heads * t * t * 8  # one float64 probability per (query, key)
    assert kept["eager"] >= scores > kept["flash"]
    # causal, two 128-row tiles: 3 of the 4 tile pairs run; q·kᵀ and p·v forward and q·kᵀ again
    # in backward (logged as recomputation); eager runs both whole products once
    product = 2 * b * heads * t * t * d
    eager_fwd = 2 * product
    assert kept["flash", "flops"] == 3 * product * 3 // 4
    assert kept["eager", "flops"] == eager_fwd
