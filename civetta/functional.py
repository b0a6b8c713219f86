"""Composed ops: no backward of their own, their gradients come from the axioms.

These are the reference definitions. Where a benchmark showed that the composition is too slow
for training, `civetta.fused` holds a fast path with the same signature, tested against the
function here in value and gradient.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from civetta import axioms as ax
from civetta import meta
from civetta.tensor import Tensor, as_tensor


def sub(a: Any, b: Any) -> Tensor:
    return ax.add(a, ax.neg(as_tensor(b, a if isinstance(a, Tensor) else None)))


def div(a: Any, b: Any) -> Tensor:
    return ax.mul(a, ax.reciprocal(as_tensor(b, a if isinstance(a, Tensor) else None)))


def pow(a: Tensor, exponent: float) -> Tensor:  # noqa: A001
    """`a ** exponent` for a constant exponent: products (by repeated squaring) for integers, so
    any sign of `a` works, else exp(exponent · log a), which needs a positive `a`."""
    if float(exponent).is_integer():
        n = int(exponent)
        if n == 0:
            return Tensor(np.ones_like(a.data))
        out, square, k = None, a, abs(n)
        while True:
            if k & 1:
                out = square if out is None else ax.mul(out, square)
            k >>= 1
            if not k:
                break
            square = ax.mul(square, square)
        assert out is not None  # k = |n| >= 1 had a set bit
        return out if n > 0 else ax.reciprocal(out)
    return ax.exp(ax.mul(ax.log(a), float(exponent)))


def sqrt(a: Tensor) -> Tensor:
    return pow(a, 0.5)


def tanh(a: Tensor) -> Tensor:
    # tanh(x) = s · (2 / (1 + exp(-2|x|)) - 1) with the constant s = ±1 and |x| = s · x. The
    # exponent stays <= 0: with exp(-2x) overflowing, the backward would compute 0 · inf = NaN.
    sign = Tensor(np.where(a.data >= 0, 1, -1).astype(a.dtype))
    decay = ax.exp(ax.mul(ax.mul(a, sign), -2.0))
    return ax.mul(sub(ax.mul(ax.reciprocal(ax.add(decay, 1.0)), 2.0), 1.0), sign)


def relu(a: Tensor) -> Tensor:
    """ReLU is maximum with zero: in backward a 0-1 filter over the incoming gradient."""
    return ax.maximum(a, 0.0)


def mean(a: Tensor, axis: Any = None, keepdims: bool = False) -> Tensor:
    total = ax.sum(a, axis, keepdims)
    count = a.data.size // max(total.data.size, 1) if a.data.size else 1
    return ax.mul(total, 1.0 / count)


def var(a: Tensor, axis: Any = None, keepdims: bool = False) -> Tensor:
    """Biased variance (divides by N), as LayerNorm uses."""
    centred = sub(a, mean(a, axis, keepdims=True))
    return mean(ax.mul(centred, centred), axis, keepdims)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """`a @ b` with numpy's broadcasting of leading axes, routed through `broadcast_to`."""
    a, b = as_tensor(a), as_tensor(b)
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(f"matmul needs operands with at least 2 dims, got {a.shape} and {b.shape}")
    if b.ndim == 2 or a.shape[:-2] == b.shape[:-2]:
        return ax.matmul(a, b)
    lead = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    if a.shape[:-2] != lead:
        a = ax.broadcast_to(a, lead + a.shape[-2:])
    if b.shape[:-2] != lead:
        b = ax.broadcast_to(b, lead + b.shape[-2:])
    return ax.matmul(a, b)


def matmul_reference(a: Tensor, b: Tensor) -> Tensor:
    """The seed's point: a matrix product is a broadcast multiply followed by a sum."""
    # a: (..., M, K) -> (..., M, K, 1); b: (..., K, N) -> (..., 1, K, N); sum over K.
    product = ax.mul(ax.reshape(a, (*a.shape, 1)), ax.reshape(b, (*b.shape[:-2], 1, *b.shape[-2:])))
    return ax.sum(product, axis=-2)


def _max_shift(a: Tensor, axis: Any) -> np.ndarray:
    """The max along `axis` (kept), as a constant; 0 where it is infinite (masked rows)."""
    shift = np.max(a.data, axis=axis, keepdims=True)
    return np.where(np.isfinite(shift), shift, 0).astype(a.dtype)


def logsumexp(a: Tensor, axis: int = -1, keepdims: bool = False) -> Tensor:
    """log(sum(exp(a))) shifted by the (constant) max, so it never overflows."""
    shift = _max_shift(a, axis)
    total = ax.sum(ax.exp(sub(a, Tensor(shift))), axis=axis, keepdims=True)
    out = ax.add(ax.log(total), Tensor(shift))
    return out if keepdims else ax.reshape(out, np.squeeze(shift, axis=axis).shape)


def log_softmax(a: Tensor, axis: int = -1) -> Tensor:
    # (a - max) - log(sum(exp(a - max))): `a - logsumexp(a)` would add the max back and take it
    # away again, losing the low bits of large float32 logits (1e-3 absolute at 1e4).
    shifted = sub(a, Tensor(_max_shift(a, axis)))
    return sub(shifted, ax.log(ax.sum(ax.exp(shifted), axis=axis, keepdims=True)))


def softmax(a: Tensor, axis: int = -1) -> Tensor:
    return ax.exp(log_softmax(a, axis=axis))


def _kept_targets(targets: Any, ignore_index: int) -> tuple[Any, Any, Any, int]:
    """For flat integer `targets`: the mask of those not equal to `ignore_index`, their rows,
    their values (the columns to pick) and their count (at least 1).

    Data-free targets have no values: every target counts, the shapes of a batch with none
    ignored. The values are fresh arrays, as a real batch's picked targets are (so what a
    backward keeps of them counts the same bytes).
    """
    if meta.is_meta(targets):
        cols = meta.shaped(targets.shape, targets.dtype)
        return None, meta.shaped(targets.shape, np.int64), cols, max(targets.size, 1)
    keep = targets != ignore_index
    return keep, np.arange(targets.size)[keep], targets[keep], max(int(keep.sum()), 1)


def cross_entropy(logits: Tensor, targets: Any, ignore_index: int = -100) -> Tensor:
    """Mean negative log-likelihood of integer `targets` under `logits` (..., V), via log-probs.

    Targets equal to `ignore_index` neither count in the mean nor receive gradient.
    """
    targets = meta.asarray(targets.data if isinstance(targets, Tensor) else targets)
    vocab = logits.shape[-1]
    flat_logits = ax.reshape(logits, (-1, vocab))
    _, rows, cols, count = _kept_targets(targets.reshape(-1), ignore_index)
    logp = log_softmax(flat_logits, axis=-1)
    picked = ax.getitem(logp, (rows, cols))
    return ax.mul(ax.neg(ax.sum(picked)), 1.0 / count)


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """Normalise the last axis to zero mean and unit variance, then scale and shift."""
    centred = sub(x, mean(x, axis=-1, keepdims=True))
    inv_std = pow(ax.add(mean(ax.mul(centred, centred), axis=-1, keepdims=True), eps), -0.5)
    out = ax.mul(centred, inv_std)
    if weight is not None:
        out = ax.mul(out, weight)
    if bias is not None:
        out = ax.add(out, bias)
    return out


def rms_norm(x: Tensor, weight: Tensor | None, eps: float = 1e-5) -> Tensor:
    """RMSNorm (Llama's): x / sqrt(mean(x², last axis) + eps), scaled by `weight` unless None."""
    inv_rms = pow(ax.add(mean(ax.mul(x, x), axis=-1, keepdims=True), eps), -0.5)
    out = ax.mul(x, inv_rms)
    return out if weight is None else ax.mul(out, weight)


GELU_C = math.sqrt(2.0 / math.pi)


def gelu(x: Tensor) -> Tensor:
    """GELU, tanh approximation: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))."""
    inner = ax.mul(ax.add(x, ax.mul(pow(x, 3), 0.044715)), GELU_C)
    return ax.mul(ax.mul(x, 0.5), ax.add(tanh(inner), 1.0))


def _sigmoid(a: Tensor) -> Tensor:
    # 1 / (1 + e) for x >= 0 and e / (1 + e) below, with e = exp(-|x|) <= 1: no exp overflows
    # (the backward of an overflowed exp computes 0 · inf = NaN), and a tiny sigmoid keeps its
    # relative precision, which 1 - 1 / (1 + e) would cancel away.
    positive = a.data >= 0
    sign = Tensor(np.where(positive, 1, -1).astype(a.dtype))
    decay = ax.exp(ax.neg(ax.mul(a, sign)))
    below_one = ax.reciprocal(ax.add(decay, 1.0))
    return ax.where(positive, below_one, ax.mul(decay, below_one))


def silu(x: Tensor) -> Tensor:
    """SiLU (swish): x · sigmoid(x), finite in value and gradient for any finite x."""
    return ax.mul(x, _sigmoid(x))


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """SwiGLU, Llama's MLP activation: silu(gate) · up."""
    return ax.mul(silu(gate), up)


def rotate_half(x: Tensor) -> Tensor:
    """The last axis split into halves (x1, x2) becomes (-x2, x1): Hugging Face's convention,
    which rotates the pairs (i, i + D/2) (not the interleaved pairs (2i, 2i + 1))."""
    x1, x2 = ax.split(x, 2, axis=-1)
    return ax.concat([ax.neg(x2), x1], axis=-1)


def rope(x: Tensor, cos: np.ndarray, sin: np.ndarray) -> Tensor:
    """Rotary position embedding: x · cos + rotate_half(x) · sin, for x of shape (B, H, T, D)
    and constant tables (T, D) from `rope_tables` (broadcast over B and H)."""
    # The tables take x's dtype, so float32 activations stay float32 whatever the tables are.
    cos, sin = cos.astype(x.dtype, copy=False), sin.astype(x.dtype, copy=False)
    return ax.add(ax.mul(x, cos), ax.mul(rotate_half(x), sin))


def rope_tables(
    positions: np.ndarray, head_dim: int, theta: float, dtype: Any
) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of the rotary angles, shape (*positions.shape, head_dim), for `rope`.

    Frequency i (of head_dim / 2) is theta^(-2i / head_dim); the angles (position · frequency)
    repeat once along the last axis, as `rotate_half` pairs i with i + head_dim / 2. Computed in
    float64 and then cast to `dtype` (angles reach block_size radians: float32 would lose
    digits before the cos); shape-only for data-free positions.
    """
    if head_dim % 2:
        raise ValueError(f"rope needs an even head_dim, got {head_dim}")
    shape = (*positions.shape, head_dim)
    if meta.is_meta(positions):
        return meta.shaped(shape, dtype), meta.shaped(shape, dtype)
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.asarray(positions, dtype=np.float64)[..., None] * inv_freq
    emb = np.concatenate([angles, angles], axis=-1)
    return np.cos(emb).astype(dtype), np.sin(emb).astype(dtype)


def dropout(x: Tensor, p: float, rng: np.random.Generator | None, training: bool = True) -> Tensor:
    """Zero each element with probability p and scale survivors by 1/(1-p); the mask is drawn
    from `rng`, so a seeded generator gives the same mask on every run."""
    if not training or p == 0.0:
        return x
    if rng is None:
        raise ValueError("dropout with p > 0 needs a seeded numpy Generator")
    keep = meta.uniform(rng, x.shape, like=x.data) >= p
    return ax.mul(x, Tensor(keep.astype(x.dtype) / (1.0 - p)))


def causal_mask(t_query: int, t_key: int, like: Any = None) -> np.ndarray:
    """True where query i may attend to key j (j <= i, aligned at the end); shape-only when
    `like` is a data-free array (see `civetta.meta.ones`)."""
    return np.tril(meta.ones((t_query, t_key), dtype=bool, like=like), k=t_key - t_query)


def _kv_groups(q: Tensor, k: Tensor, v: Tensor) -> int:
    """How many query heads share each key/value head (grouped-query attention; 1 for
    multi-head attention). Query head h reads kv head h // groups."""
    heads, kv_heads = q.shape[1], k.shape[1]
    if v.shape[1] != kv_heads or kv_heads == 0 or heads % kv_heads:
        raise ValueError(
            f"attention needs k and v with a number of heads dividing q's: q {q.shape},"
            f" k {k.shape}, v {v.shape}"
        )
    return heads // kv_heads


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    """(B, nkv, T, D) → (B, nkv · groups, T, D), each kv head repeated for its `groups`
    consecutive query heads (Hugging Face's `repeat_kv`); the backward sums over the copies."""
    if groups == 1:
        return x
    b, kv_heads, t, d = x.shape
    spread = ax.broadcast_to(ax.reshape(x, (b, kv_heads, 1, t, d)), (b, kv_heads, groups, t, d))
    return ax.reshape(spread, (b, kv_heads * groups, t, d))


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True) -> Tensor:
    """softmax(q·kᵀ/√d [causal]) · v for q of shape (B, heads, T, head_dim) and k, v of shape
    (B, kv_heads, T, head_dim): grouped-query attention when kv_heads < heads (see `_kv_groups`),
    here by repeating k and v."""
    groups = _kv_groups(q, k, v)
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = ax.mul(ax.matmul(q, ax.transpose(k, (0, 1, 3, 2))), scale)  # (B, nh, T, T)
    if causal:
        mask = causal_mask(q.shape[-2], k.shape[-2], like=q.data)
        scores = ax.where(mask, scores, Tensor(np.array(-np.inf, dtype=scores.dtype)))
    return ax.matmul(softmax(scores, axis=-1), v)  # (B, nh, T, hs)
