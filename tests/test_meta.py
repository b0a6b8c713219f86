"""Data-free (shape-only) execution: `civetta.meta.MetaArray` through the engine.

The cost model runs the model's own code on MetaArrays and prices what the meters record, so a
data-free step must record exactly what a real step records: the same FLOPs, activation peak,
graph nodes, GEMM log and output bytes, and a gradient of the right shape and dtype for every
parameter. The MetaArray itself must produce numpy's shapes, dtypes and strides (whether a
reshape copies depends on strides), and refuse to invent values.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from garbage import collect_garbage

from civetta import activation_meter, flop_meter, meta
from civetta.meta import DataFreeError, MetaArray
from civetta.meters import Gemm, gemm_log, recording_gemms
from civetta.models.gpt import GPT, GPTConfig, GPTStage
from civetta.precision import PRECISIONS, autocast
from civetta.tensor import Tensor, WeightGradStore, defer_weight_grads


# ---- the array against numpy ---------------------------------------------------------------------
def like(x: np.ndarray) -> MetaArray:
    """A MetaArray with `x`'s shape, dtype and strides."""
    return MetaArray(x.shape, x.dtype, x.strides)


def assert_like_numpy(result: Any, expected: Any, what: str) -> None:
    """Same shape, dtype and (on axes longer than 1, where they mean something) strides."""
    expected = np.asarray(expected)
    assert isinstance(result, MetaArray), (what, type(result))
    assert (result.shape, result.dtype) == (expected.shape, expected.dtype), what
    long = [i for i, n in enumerate(expected.shape) if n != 1]
    assert [result.strides[i] for i in long] == [expected.strides[i] for i in long], what


_PERMUTED = np.ones((2, 3, 4, 5)).transpose(1, 0, 2, 3)  # a non-contiguous view
_IDX = np.array([[0, 1], [2, 0]])
OPS: dict[str, Callable[[Callable[[np.ndarray], Any]], Any]] = {
    # each op takes `wrap` (identity or `like`) and applies one numpy operation
    "ufunc-order-K": lambda w: np.exp(w(_PERMUTED)),
    "mul-scalar-float32": lambda w: w(np.ones(3, np.float32)) * np.float32(2),
    "python-float-stays-float32": lambda w: 1.0 / w(np.ones(3, np.float32)),
    "scalar-minus-array": lambda w: np.float32(1) - w(np.ones(3, np.float32)),
    "compare-invert": lambda w: ~(w(_PERMUTED) >= 0),
    "isfinite": lambda w: np.isfinite(w(np.ones(3))),
    "broadcast-add": lambda w: w(np.ones((4, 1))) + w(np.ones((3, 1, 5))),
    "reshape-view": lambda w: w(_PERMUTED).reshape(3, 2, 20),
    "reshape-copy": lambda w: w(_PERMUTED).reshape(6, 20),
    "transpose": lambda w: w(_PERMUTED).T,
    "swapaxes": lambda w: w(_PERMUTED).swapaxes(-1, -2),
    "sum-keepdims": lambda w: np.sum(w(_PERMUTED), axis=-1, keepdims=True),
    "sum-axes": lambda w: np.sum(w(_PERMUTED), axis=(0, 2)),
    "sum-bool": lambda w: (w(np.ones(3)) > 0).sum(),
    "sum-dtype": lambda w: w(np.ones((2, 3), np.float32)).sum(dtype=np.float64),
    "max-method": lambda w: w(_PERMUTED).max(axis=-1, keepdims=True),
    "mean": lambda w: w(np.ones((2, 3), np.float16)).mean(axis=0),
    "matmul-batched": lambda w: w(_PERMUTED) @ w(np.ones((3, 2, 5, 6))),
    "matmul-vector-right": lambda w: w(np.ones((7, 4))) @ w(np.ones(4)),
    "matmul-vector-left": lambda w: w(np.ones(4)) @ w(np.ones((4, 3))),
    "einsum": lambda w: np.einsum("...i,...i->...", w(_PERMUTED), w(_PERMUTED)),
    "getitem-ellipsis": lambda w: w(_PERMUTED)[..., 0],
    "getitem-basic": lambda w: w(_PERMUTED)[:, 1:, None, ::2],
    "getitem-rows": lambda w: w(_PERMUTED)[_IDX],
    "getitem-split-arrays": lambda w: w(_PERMUTED)[_IDX, :, _IDX],
    "getitem-int-and-array": lambda w: w(_PERMUTED)[0, :, _IDX],
    "getitem-pairs": lambda w: w(np.ones((5, 3)))[np.arange(5), np.array([0, 1, 2, 0, 1])],
    "where": lambda w: np.where(w(_PERMUTED) > 0, w(_PERMUTED), np.float32(1)),
    "where-python-ints": lambda w: np.where(w(np.ones(3)) >= 0, 1, -1),
    "broadcast_to": lambda w: np.broadcast_to(w(np.ones((4, 1))), (3, 4, 5)),
    "concatenate": lambda w: np.concatenate([w(_PERMUTED), w(_PERMUTED)], axis=1),
    "split": lambda w: np.split(w(_PERMUTED), 3, axis=0)[1],
    "astype": lambda w: w(_PERMUTED).astype(np.float32),
    "copy": lambda w: w(_PERMUTED).copy(),
    "empty_like": lambda w: np.empty_like(w(_PERMUTED)),
    "ones_like-dtype": lambda w: np.ones_like(w(_PERMUTED), dtype=np.float32),
    "tril": lambda w: np.tril(w(np.ones((4, 6), bool)), k=2),
    "squeeze": lambda w: np.squeeze(w(np.ones((3, 1))), axis=-1),
}


@pytest.mark.parametrize("name", OPS)
def test_meta_array_matches_numpy(name: str) -> None:
    assert_like_numpy(OPS[name](like), OPS[name](lambda x: x), name)


def test_views_know_their_base_and_copies_do_not() -> None:
    x = MetaArray((2, 3, 4))
    view = x.transpose(1, 0, 2)[1:]
    assert view.base is x and view.reshape(-1).base is None  # the reshape had to copy
    assert x.reshape(6, 4).base is x and x[[0, 1]].base is None
    assert not np.broadcast_to(x, (5, 2, 3, 4)).flags.writeable
    assert x.flags.c_contiguous and x.T.flags.f_contiguous and not view.flags.owndata
    assert x.nbytes == 24 * 8 and x.itemsize == 8 and x.size == 24 and x.ndim == 3


def test_out_and_in_place_operators_return_the_same_array() -> None:
    x = MetaArray((3, 4), np.float32)
    alias = x
    x += 1.0
    x *= np.float32(2)
    assert x is alias and x.dtype == np.float32
    out: Any = MetaArray((3, 4))  # numpy's stubs know only ndarray outputs
    assert np.exp(MetaArray((3, 4)), out=out) is out
    assert np.add.at(MetaArray((5, 3)), np.array([1, 2]), MetaArray((2, 3))) is None
    x[1:, 0] = 3.0  # writing is a no-op
    with pytest.raises(ValueError):
        x += MetaArray((2, 3, 4))  # the result does not fit `x`


@pytest.mark.parametrize(
    ("action", "words"),
    [
        (lambda: float(MetaArray(())), "float()"),
        (lambda: int(MetaArray((), np.int64)), "int()"),
        (lambda: bool(MetaArray(())), "truth value"),
        (lambda: MetaArray(()).item(), ".item()"),
        (lambda: np.asarray(MetaArray((2,))), "np.asarray"),
        (lambda: np.cumsum(MetaArray((2,))), "numpy.cumsum"),
        (lambda: np.argsort(MetaArray((2,))), "numpy.argsort"),
        (lambda: np.add.reduceat(MetaArray((4,)), [0, 2]), "numpy.add.reduceat"),
        (lambda: MetaArray((3,))[MetaArray((3,)) > 0], "boolean mask"),
        (lambda: np.where(MetaArray((3,)) > 0), "data-dependent"),
    ],
)
def test_values_and_unsupported_functions_raise_a_named_error(
    action: Callable[[], Any], words: str
) -> None:
    with pytest.raises(DataFreeError, match=words.replace("(", r"\(").replace(")", r"\)")):
        action()


def test_tensor_item_of_a_data_free_loss_raises() -> None:
    with pytest.raises(DataFreeError):
        Tensor(MetaArray((), np.float32)).item()


def test_creation_helpers_follow_like_then_the_mode() -> None:
    assert isinstance(meta.zeros(3), np.ndarray)
    assert isinstance(meta.ones((2, 2), bool, like=MetaArray(())), MetaArray)
    with meta.data_free():
        assert meta.is_data_free()
        assert isinstance(meta.empty((2, 3), np.float32), MetaArray)
        assert isinstance(meta.zeros(3, like=np.ones(1)), np.ndarray)  # `like` decides
    assert not meta.is_data_free()
    ids = meta.token_ids((2, 5))
    assert ids.shape == (2, 5) and ids.dtype == np.int64
    assert meta.asarray(ids) is ids and meta.asarray([1, 2]).dtype == np.int64


# ---- one training step, real and data-free -------------------------------------------------------
@dataclass(frozen=True)
class Record:
    flops_forward: int
    flops_backward: int
    peak: int
    nodes: int
    gemms: tuple[Gemm, ...]
    output_bytes: int


def _reset_meters() -> None:
    collect_garbage()  # graphs of earlier tests must not release bytes into this count
    flop_meter.reset()
    activation_meter.live = activation_meter.peak = activation_meter.nodes = 0


def one_step(
    config: GPTConfig,
    data_free: bool,
    dtype: type = np.float32,
    recompute: str = "none",
    precision: str | None = None,
    deferred: bool = False,
    batch: int = 2,
) -> tuple[Record, dict[str, Tensor]]:
    """Build the model, run forward + backward (+ the weight pass when `deferred`)."""
    with meta.data_free(data_free):
        model = GPT(config, seed=1, dtype=dtype, recompute=recompute)
    shape = (batch, config.block_size)
    if data_free:
        idx, targets = meta.token_ids(shape), meta.token_ids(shape)
    else:
        rng = np.random.default_rng(0)
        idx, targets = (rng.integers(0, config.vocab_size, shape) for _ in range(2))
    _reset_meters()
    store = WeightGradStore()
    with (
        recording_gemms() as log,
        autocast(PRECISIONS[precision] if precision else None),
        defer_weight_grads(store) if deferred else contextlib.nullcontext(),
    ):
        loss = model(idx, targets)
        loss.backward()
    with recording_gemms(clear=False), autocast(PRECISIONS[precision] if precision else None):
        store.apply()
    assert gemm_log.flops() == flop_meter.total  # the log and the meter agree
    record = Record(
        flop_meter.forward,
        flop_meter.backward,
        activation_meter.peak,
        activation_meter.nodes,
        tuple(log.gemms),
        log.output_bytes,
    )
    return record, model.params


def assert_same_step(real: tuple[Record, dict], free: tuple[Record, dict]) -> None:
    (real_record, real_params), (free_record, free_params) = real, free
    assert free_record == real_record
    assert real_record.gemms and real_record.peak > 0
    assert free_params.keys() == real_params.keys()
    for name, p in free_params.items():
        assert isinstance(p.data, MetaArray), name
        q = real_params[name]
        assert p.grad is not None and q.grad is not None, name
        assert isinstance(p.grad, MetaArray) and isinstance(q.grad, np.ndarray), name
        assert p.grad.shape == q.grad.shape == p.shape, name
        assert p.grad.dtype == q.grad.dtype == p.dtype, name


TINY: dict[str, Any] = dict(vocab_size=48, block_size=8, n_layer=2, n_head=2, n_embd=16)
VARIANTS = list(
    itertools.product(
        [np.float32, np.float64], [True, False], [True, False], ["none", "selective", "full"]
    )
)


@pytest.mark.parametrize(
    ("dtype", "tie", "bias", "recompute"),
    VARIANTS,
    ids=[f"{d.__name__}-tie{t}-bias{b}-{r}" for d, t, b, r in VARIANTS],
)
def test_data_free_step_records_what_a_real_step_records(
    dtype: type, tie: bool, bias: bool, recompute: str
) -> None:
    config = GPTConfig(**TINY, tie_embeddings=tie, bias=bias)
    assert_same_step(
        one_step(config, False, dtype, recompute), one_step(config, True, dtype, recompute)
    )


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_data_free_step_under_autocast(precision: str, recompute: str) -> None:
    config = GPTConfig(**TINY, tie_embeddings=False)
    real = one_step(config, False, recompute=recompute, precision=precision)
    assert_same_step(real, one_step(config, True, recompute=recompute, precision=precision))
    assert {g.dtype for g in real[0].gemms} == {PRECISIONS[precision].dtype.name}
    # Float activations count 2 bytes an element; the integer arrays backward keeps (the token
    # ids of the two embedding lookups, cross-entropy's rows and targets) keep their 8. (Before
    # the meter counted what backward keeps, only float outputs counted: exactly half.) Under
    # full recomputation the peak is in backward, in the last block's rebuilt graph, after
    # cross-entropy's node has let go of its arrays.
    float32 = one_step(config, False, recompute=recompute)[0]
    batch, block = 2, TINY["block_size"]
    integers = 8 * (batch * block + block) + (0 if recompute == "full" else 16 * batch * block)
    assert 2 * (real[0].peak - integers) == float32.peak - integers


@pytest.mark.parametrize("precision", [None, "bf16"])
def test_data_free_zero_bubble_weight_pass(precision: str | None) -> None:
    config = GPTConfig(**TINY)
    real = one_step(config, False, precision=precision, deferred=True)
    assert_same_step(real, one_step(config, True, precision=precision, deferred=True))
    # The weight pass comes after every input gradient; without deferral they interleave.
    phases = [g.phase for g in real[0].gemms]
    first_weight = phases.index("backward-weight")
    assert "backward-input" not in phases[first_weight:]
    immediate = one_step(config, False, precision=precision)[0]
    assert sorted(immediate.gemms, key=repr) == sorted(real[0].gemms, key=repr)


def test_gemm_log_of_a_linear_has_the_three_phases() -> None:
    config = GPTConfig(vocab_size=40, block_size=4, n_layer=1, n_head=1, n_embd=8)
    record, _ = one_step(config, True, batch=3)
    head = [g for g in record.gemms if 40 in (g.m, g.k, g.n)]  # 3·4 tokens, C → V, tied
    assert head == [
        Gemm(12, 8, 40, 1, "forward", "float32"),
        Gemm(12, 40, 8, 1, "backward-input", "float32"),
        Gemm(40, 12, 8, 1, "backward-weight", "float32"),
    ]
    scores = Gemm(4, 8, 4, 3, "forward", "float32")  # (B·nh) products of (T × hs) · (hs × T)
    assert scores in record.gemms


def test_gemm_log_is_off_by_default() -> None:
    gemm_log.clear()
    model = GPT(GPTConfig(**TINY))
    model(np.zeros((1, 8), np.int64), np.zeros((1, 8), np.int64)).backward()
    assert not gemm_log.enabled and gemm_log.gemms == [] and gemm_log.output_bytes == 0


# ---- GPT-3 sizes, no memory ----------------------------------------------------------------------
GPT3 = GPTConfig(vocab_size=50257, block_size=2048, n_layer=96, n_head=96, n_embd=12288)


def test_a_gpt3_block_runs_data_free_in_a_few_kib_and_counts_its_flops() -> None:
    _reset_meters()
    tracemalloc.start()
    try:
        with meta.data_free():
            block = GPTStage(GPT3, range(1), first=False, last=False)
        x = Tensor(MetaArray((1, GPT3.block_size, GPT3.n_embd), np.float32), requires_grad=True)
        out = block(x)
        out.backward(np.ones_like(out.data))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, f"{peak} bytes traced"
    c, t = GPT3.n_embd, GPT3.block_size
    one_layer = 72 * c * c + 12 * c * t  # GPTConfig.flops_per_token for one layer, no head
    assert flop_meter.total == t * one_layer
    assert x.grad is not None and x.grad.shape == x.shape
    assert activation_meter.peak > 10**9  # GBs of activations, simulated
    for name, p in block.params.items():
        assert p.grad is not None and p.grad.shape == p.shape, name


def test_a_175b_model_builds_data_free_without_allocating() -> None:
    tracemalloc.start()
    try:
        with meta.data_free():
            model = GPT(GPT3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak} bytes traced"
    assert sum(p.size for p in model.parameters()) == GPT3.num_parameters()
    assert math.isclose(GPT3.num_parameters(), 175e9, rel_tol=0.01)
