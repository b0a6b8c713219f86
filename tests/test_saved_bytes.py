"""The activation meter counts the bytes each op saves for backward.

Each op declares the arrays its backward closure keeps (`make_node(..., saved=...)`); the meter
holds their buffers while the node waits for its backward: a view counts its whole base, a
buffer kept by several nodes (or twice by one) counts once, leaf tensors' buffers (parameters,
inputs, constants) not at all, and under autocast float32 buffers count in the simulated dtype.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from garbage import collect_garbage

from civetta import activation_meter, functional, fused, meta, nn
from civetta import axioms as ax
from civetta.meta import MetaArray
from civetta.precision import PRECISIONS, autocast
from civetta.recompute import checkpoint
from civetta.tensor import Tensor


@pytest.fixture(autouse=True)
def no_gc() -> Iterator[None]:
    """Nodes must die by reference counting alone, at known moments."""
    collect_garbage()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def leaf(*shape: int, seed: int = 0, dtype: Any = np.float64, data_free: bool = False) -> Tensor:
    if data_free:
        return Tensor(MetaArray(shape, dtype), requires_grad=True)
    data = np.random.default_rng(seed).uniform(0.5, 1.5, shape).astype(dtype)  # log-able
    return Tensor(data, requires_grad=True)


def act(*shape: int, seed: int = 0, dtype: Any = np.float64, data_free: bool = False) -> Tensor:
    """An activation: a graph node's fresh output (a leaf times a constant, which keeps
    nothing: the constant is a leaf and the leaf's buffer is not an activation)."""
    return ax.mul(leaf(*shape, seed=seed, dtype=dtype, data_free=data_free), 1.0)


def saved_by(build: Callable[[], Any]) -> tuple[int, Any]:
    """Bytes the meter holds for what `build` adds to a graph (its inputs built beforehand)."""
    start = activation_meter.live
    out = build()
    return activation_meter.live - start, out


# ---- per op -------------------------------------------------------------------------------------
# float64, x of shape (4, 6): 192 bytes; the constant and the leaf cost nothing.
X = 4 * 6 * 8
MASK = 4 * 6  # a bool per element


def _cases(data_free: bool) -> dict[str, tuple[Callable[[], Callable[[], Any]], int]]:
    """name → (inputs builder returning the op call, expected saved bytes)."""
    kw: dict[str, Any] = dict(data_free=data_free)

    def two(fn: Callable[[Tensor, Tensor], Any], shape: tuple[int, ...] = (4, 6)):
        def inputs() -> Callable[[], Any]:
            a, b = act(*shape, **kw), act(*shape, seed=1, **kw)
            return lambda: fn(a, b)

        return inputs

    def one(fn: Callable[[Tensor], Any], shape: tuple[int, ...] = (4, 6)):
        def inputs() -> Callable[[], Any]:
            a = act(*shape, **kw)
            return lambda: fn(a)

        return inputs

    def with_leaf(fn: Callable[[Tensor, Tensor], Any], w_shape: tuple[int, ...]):
        def inputs() -> Callable[[], Any]:
            a, w = act(4, 6, **kw), leaf(*w_shape, seed=2, **kw)
            return lambda: fn(a, w)

        return inputs

    index = meta.arange(3, like=MetaArray(()) if data_free else None)
    cond = meta.ones((4, 6), bool, like=MetaArray(()) if data_free else None)
    targets = meta.token_ids((4,)) if data_free else np.array([0, 5, 2, 1])

    def attention() -> Callable[[], Any]:
        q, k, v = (act(1, 2, 4, 3, seed=i, **kw) for i in range(3))
        return lambda: fused.scaled_dot_product_attention(q, k, v)

    def grouped_attention() -> Callable[[], Any]:
        q = act(1, 4, 4, 3, **kw)
        k, v = (act(1, 2, 4, 3, seed=i, **kw) for i in (1, 2))
        return lambda: fused.scaled_dot_product_attention(q, k, v)

    def rms_norm() -> Callable[[], Any]:
        x, w = act(4, 6, **kw), leaf(6, seed=1, **kw)
        return lambda: fused.rms_norm(x, w)

    # Rope's tables: constants shared by every layer, made once (data-free for data-free runs).
    positions = meta.arange(4, like=MetaArray(()) if data_free else None)
    cos, sin = functional.rope_tables(positions, 6, 10000.0, np.float64)

    def layer_norm() -> Callable[[], Any]:
        x, w, b = act(4, 6, **kw), leaf(6, seed=1, **kw), leaf(6, seed=2, **kw)
        return lambda: fused.layer_norm(x, w, b)

    def linear() -> Callable[[], Any]:
        x, w, b = act(4, 6, **kw), leaf(5, 6, seed=1, **kw), leaf(5, seed=2, **kw)
        return lambda: fused.linear(x, w, b)

    return {
        "add": (two(ax.add), 0),
        "mul": (two(ax.mul), 2 * X),  # each operand for the other's gradient
        "mul-by-constant": (one(lambda a: ax.mul(a, 3.0)), 0),  # the constant is a leaf
        "mul-by-parameter": (with_leaf(ax.mul, (4, 6)), X),  # x for w's gradient; w is a leaf
        "neg": (one(ax.neg), 0),
        "reciprocal": (one(ax.reciprocal), X),  # its output
        "exp": (one(ax.exp), X),  # its output
        "log": (one(ax.log), X),  # its input
        "maximum": (two(ax.maximum), MASK),
        "relu": (one(functional.relu), MASK),
        "where": (two(lambda a, b: ax.where(cond, a, b)), MASK),
        "sum": (one(lambda a: ax.sum(a, axis=-1)), 0),
        "max": (one(lambda a: ax.max(a, axis=-1)), X + 4 * 8),  # input and the (4, 1) max
        "reshape": (one(lambda a: ax.reshape(a, (24,))), 0),
        "transpose": (one(ax.transpose), 0),
        "broadcast_to": (one(lambda a: ax.broadcast_to(a, (2, 4, 6))), 0),
        "concat": (two(lambda a, b: ax.concat([a, b])), 0),
        "split": (one(lambda a: ax.split(a, 2)), 0),
        "getitem-slice": (one(lambda a: ax.getitem(a, (slice(1, 3),))), 0),
        "getitem-rows": (one(lambda a: ax.getitem(a, index)), 3 * 8),  # the int64 index
        "matmul-2d-parameter": (with_leaf(ax.matmul, (6, 5)), X),  # x; the weight is a leaf
        "matmul-transposed-parameter": (  # a transpose node's data is a view of the leaf
            with_leaf(lambda a, w: ax.matmul(a, ax.transpose(w)), (5, 6)),
            X,
        ),
        "matmul-batched": (
            two(lambda a, b: ax.matmul(a, ax.transpose(b, (0, 2, 1))), (2, 4, 6)),
            2 * 2 * X,
        ),
        "linear": (linear, X),  # x; weight and bias are parameters
        "gelu": (one(fused.gelu), 2 * X),  # x and t = tanh(...)
        "normalize": (one(fused.normalize), X + 4 * 8),  # x̂ and 1/σ (4, 1)
        "layer_norm": (layer_norm, X + 4 * 8),  # x̂ and 1/σ; not the affine output
        "rms_norm": (rms_norm, X + 4 * 8),  # x̂ and 1/rms; not the output; the weight is a leaf
        "rms_normalize": (one(fused.rms_normalize), X + 4 * 8),  # x̂ (its output) and 1/rms
        "swiglu": (two(fused.swiglu), 2 * X),  # gate and up; the sigmoid is recomputed
        "rope": (one(lambda a: fused.rope(a, cos, sin), (1, 1, 4, 6)), 0),  # tables: constants
        "softmax": (one(fused.softmax), X),  # the probabilities
        "cross_entropy": (one(lambda a: fused.cross_entropy(a, targets)), X + 2 * 4 * 8),
        "attention": (attention, 3 * 24 * 8 + 2 * 16 * 8),  # q/√d, k, v; probabilities
        # q/√d (4 heads), k and v (2 heads each, not repeated); the 4 heads' probabilities
        "attention-grouped": (grouped_attention, 48 * 8 + 2 * 24 * 8 + 4 * 16 * 8),
        "checkpoint": (one(lambda a: checkpoint(lambda t: ax.exp(ax.exp(t)), a)), X),
    }


@pytest.mark.parametrize("data_free", [False, True], ids=["real", "data-free"])
@pytest.mark.parametrize("name", list(_cases(False)))
def test_each_op_saves_what_its_backward_reads(name: str, data_free: bool) -> None:
    inputs, expected = _cases(data_free)[name]
    start = activation_meter.live
    call = inputs()  # the activations it reads, which keep nothing themselves
    assert activation_meter.live == start
    saved, out = saved_by(call)
    assert saved == expected, name
    del out
    assert activation_meter.live == start  # released when the node dies


def test_matmul_keeps_each_operand_only_for_the_others_gradient() -> None:
    a, b = act(4, 6), act(6, 5, seed=1)
    assert saved_by(lambda: ax.matmul(a, b))[0] == X + 6 * 5 * 8
    w = Tensor(np.ones((6, 5)))  # a constant: x is not needed, w is a leaf
    assert saved_by(lambda: ax.matmul(a, w))[0] == 0


def test_cross_entropy_with_ignored_targets_keeps_their_mask() -> None:
    logits = act(4, 6)
    targets = np.array([0, -100, 2, 1])
    # log-probabilities, 3 kept rows and their targets (int64), the 4-element bool mask
    assert saved_by(lambda: fused.cross_entropy(logits, targets))[0] == X + 2 * 3 * 8 + 4


# ---- dedup, leaves, release ---------------------------------------------------------------------
def test_a_buffer_counts_once_however_many_nodes_keep_it() -> None:
    x, y = act(4, 6), act(4, 6, seed=1)
    start, buffers = activation_meter.live, activation_meter.held_buffers()
    a = ax.mul(x, x)  # keeps x twice
    b = ax.log(x)  # keeps x again
    c = ax.mul(x, y)  # x and y
    assert activation_meter.live - start == 2 * X
    assert activation_meter.held_buffers() - buffers == 2
    del a, b
    assert activation_meter.live - start == 2 * X  # c still keeps both
    del c
    assert activation_meter.live == start


def test_a_view_keeps_its_whole_base() -> None:
    x = act(4, 6)
    start = activation_meter.live
    row = ax.getitem(x, (slice(0, 1),))  # (1, 6), a view of x's buffer
    first = ax.log(row)  # keeps the row: x's whole buffer
    assert activation_meter.live - start == X
    second = ax.log(ax.transpose(x))  # another view of the same buffer
    assert activation_meter.live - start == X
    del first, second, row


def test_leaf_buffers_are_not_activations() -> None:
    w = leaf(4, 6)
    start = activation_meter.live
    out = ax.exp(ax.log(w))  # log keeps w (a leaf): nothing; exp keeps its output
    assert activation_meter.live - start == X
    view = ax.log(ax.transpose(ax.reshape(w, (6, 4))))  # a view of a view of the leaf
    assert activation_meter.live - start == X
    del out, view


def test_backward_releases_every_buffer() -> None:
    start, buffers = activation_meter.live, activation_meter.held_buffers()
    x = act(4, 6)
    loss = ax.sum(ax.mul(fused.gelu(x), ax.exp(x)))
    assert activation_meter.live > start
    loss.backward()
    assert activation_meter.live == start
    assert activation_meter.held_buffers() == buffers


def test_garbage_collection_releases_an_unused_graph() -> None:
    start = activation_meter.live
    x = act(4, 6)
    y = ax.sum(ax.exp(ax.log(x)))
    assert activation_meter.live - start == 2 * X
    del y
    assert activation_meter.live == start


def test_calls_without_saved_count_the_fresh_output() -> None:
    """The rule for ops that do not declare `saved` (parallel/'s ops): the fresh output."""
    from civetta.tensor import make_node

    x = act(4, 6)
    start = activation_meter.live
    fresh = make_node(x.data * 2.0, (x,), lambda g: (2.0 * g,))
    view = make_node(x.data.T, (x,), lambda g: (g.T,))
    assert activation_meter.live - start == X
    del fresh, view


# ---- autocast -----------------------------------------------------------------------------------
@pytest.mark.parametrize("data_free", [False, True], ids=["real", "data-free"])
def test_autocast_counts_floats_in_the_simulated_dtype(data_free: bool) -> None:
    kw: dict[str, Any] = dict(dtype=np.float32, data_free=data_free)
    index = meta.arange(3, like=MetaArray(()) if data_free else None)
    with autocast(PRECISIONS["bf16"]):
        x, y = act(4, 6, **kw), act(4, 6, seed=1, **kw)
        assert saved_by(lambda: ax.exp(x))[0] == 24 * 2  # 2 bytes an element
        assert saved_by(lambda: ax.maximum(x, y))[0] == MASK  # a bool is a byte
        assert saved_by(lambda: ax.getitem(x, index))[0] == 3 * 8  # int64 ids keep 8 bytes
        # exp's closure keeps its float32 result; the node returns the rounded copy, which a
        # product keeps: one low-precision output, counted once.
        e = ax.exp(y)
        assert saved_by(lambda: ax.mul(e, e))[0] == 0


# ---- recomputation ------------------------------------------------------------------------------
def test_checkpoint_keeps_its_inputs_and_backward_rebuilds_the_graph() -> None:
    x = act(4, 6)
    start = activation_meter.live
    out = checkpoint(lambda t: ax.exp(ax.exp(t)), x)
    loss = ax.sum(out)
    assert activation_meter.live - start == X  # the input only
    activation_meter.reset_peak()
    loss.backward()
    # During its backward: the input, still kept, and the two exps' outputs of the rebuilt graph.
    assert activation_meter.peak - start == 3 * X
    assert activation_meter.live == start


# ---- a GPT block against a closed form ----------------------------------------------------------
def block_bytes_per_token(c: int, heads: int, t: int, e: int, recompute: str) -> int:
    """Bytes one pre-LN GPT block (tp = 1, no dropout) keeps for backward per token, for
    e-byte floats, hidden size c, `heads` heads and sequence length t:

    - ln_1 and ln_2: x̂ (c each) and 1/σ (1 each)                        2c + 2
    - the inputs of c_attn and c_fc (the LayerNorms' outputs)             2c
    - q, k, v: views of c_attn's output, kept whole by q·kᵀ and p·v       3c
    - q/√d, the scaled copy q·kᵀ keeps                                    c
    - the softmax's probabilities (kept by softmax and p·v: once)         heads·t
    - c_proj's input (attention's heads, merged: a copy)                  c
    - GELU: its input and t = tanh(...); c_proj's input (its output)      3·4c

    none: e·(21c + heads·t + 2); selective (the attention core recomputed: q/√d and the
    probabilities are not kept, q, k, v are the checkpoint's inputs): e·(20c + 2); full (the
    block recomputed): e·c, its input. The residual adds, biases and the LayerNorms' affine
    outputs keep nothing.

    In 16-bit, per layer of s·b tokens: 42·sbh + 2·a·s²·b + 4·sb, against Megatron-LM's
    34·sbh + 5·a·s²·b (Korthikanti et al. 2022), which counts dropout (two sbh masks, and
    for the attention a mask a·s²·b and its output 2·a·s²·b) that civetta's GPT does not have,
    and keeps neither q/√d (2sbh: the scale is baddbmm's alpha) nor GELU's tanh (8sbh:
    recomputed by its fused backward).
    """
    if recompute == "full":
        return e * c
    if recompute == "selective":
        return e * (20 * c + 2)
    return e * (21 * c + heads * t + 2)


BLOCK = dict(c=32, heads=4, t=8, batch=3)
MODES = [(p, r) for p in (None, "bf16") for r in nn.RECOMPUTE_MODES]


@pytest.mark.parametrize(("precision", "recompute"), MODES, ids=[f"{p}-{r}" for p, r in MODES])
def test_gpt_block_saves_the_closed_form(precision: str | None, recompute: str) -> None:
    c, heads, t, batch = BLOCK["c"], BLOCK["heads"], BLOCK["t"], BLOCK["batch"]
    results = []
    for data_free in (False, True):
        with meta.data_free(data_free):
            block = nn.Block("h.0", c, heads, proj_std=0.02, dtype=np.float32, recompute=recompute)
        with autocast(PRECISIONS[precision] if precision else None):
            x = act(batch, t, c, dtype=np.float32, data_free=data_free)
            saved, out = saved_by(lambda: block(x))  # noqa: B023 - called at once
            start = activation_meter.live - saved
            activation_meter.reset_peak()
            out.backward(meta.ones(out.shape, np.float32, like=out.data))
        assert activation_meter.live == start
        results.append((saved, activation_meter.peak - start))
    e = 4 if precision is None else 2
    assert results[0][0] == batch * t * block_bytes_per_token(c, heads, t, e, recompute)
    assert results[1] == results[0]  # data-free counts equal real counts
    if recompute == "full":  # backward rebuilds the block: its graph is alive again
        assert results[0][1] >= batch * t * block_bytes_per_token(c, heads, t, e, "none")
