"""What one microbatch costs, read off the model's own code run without data.

The cost model never restates the model. To price a layout it runs the model's own layers, one
block and the model's two ends (the embeddings; the final norm, head and loss), for one
microbatch on one representative rank, data-free (`civetta.meta`: arrays with a shape and no
values) over a virtual mesh (`parallel.virtual`: collectives recorded, not sent), and keeps what
the engine recorded:

- every GEMM with its shape and phase (`civetta.meters.gemm_log`), forward and backward apart;
- every collective with its op, axis, phase, bytes and ring wire bytes (the ledger's rules);
- the graph nodes built (the engine's fixed cost per op) and the bytes op outputs wrote (the
  elementwise traffic);
- the activation bytes the forward left alive for the backward, in the training dtype;
- the parameters, with their names and sizes on this rank, whether tensor parallelism splits
  them and whether they are a MoE layer's experts (held E/ep to a rank, reduced over edp);
- the shape of the activation a pipeline stage sends on.

A stage is blocks and, on the first and last stage, the ends: its counts are the pieces' counts
times how many it holds. Each distinct piece is traced once (`trace`, memoised): a GPT-3 block
is one trace whatever the number of layers, and a tuner's thousands of layouts share a few
hundred traces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from civetta import axioms as ax
from civetta import meta
from civetta.fused import attention_kernel
from civetta.meters import Gemm, activation_meter, recording_gemms
from civetta.models import ModelDescription, build_stage
from civetta.nn import Module
from civetta.precision import PRECISIONS, autocast
from civetta.tensor import Tensor
from parallel.comm import Ledger
from parallel.layout import Layout
from parallel.runtime import Runtime
from parallel.tensor_parallel import TensorParallelSharding
from parallel.virtual import numpy_fill, virtual_mesh
from parallel.zero import ShardedStore, ceil_div

# train.dtype -> the arrays' dtype; bf16/fp16 are float32 arrays rounded by autocast.
ARRAY_DTYPES = {"float64": np.float64, "float32": np.float32, "bf16": np.float32}
ARRAY_DTYPES["fp16"] = np.float32
PARTS = ("block", "first", "last", "whole")  # whole: first and last (one pipeline stage)


@dataclass(frozen=True)
class Call:
    """One collective or message, as the ledger counts it."""

    op: str
    axis: str
    phase: str
    nbytes: int
    wire_bytes: int


class CallLog(Ledger):
    """A ledger that also keeps every call in order (the cost model times them one by one)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Call] = []

    def record(
        self, op: str, axis: str, nbytes: int, seconds: float, wire_bytes: int | None = None
    ) -> None:
        if not self._paused:
            wire = nbytes if wire_bytes is None else wire_bytes
            self.calls.append(Call(op, axis, self.current_phase, nbytes, wire))
        super().record(op, axis, nbytes, seconds, wire_bytes)


@dataclass(frozen=True)
class Pass:
    """What a forward or a backward pass of a piece ran."""

    gemms: tuple[Gemm, ...]
    calls: tuple[Call, ...]
    nodes: int  # graph nodes built (recomputation rebuilds some in backward)
    output_bytes: int  # bytes written by fresh op outputs, in the training dtype

    def calls_on(self, axis: str) -> tuple[Call, ...]:
        return tuple(c for c in self.calls if c.axis == axis)


@dataclass(frozen=True)
class Param:
    name: str
    elements: int  # on this tensor-parallel rank, whole over dp
    tp_split: bool  # False: every tp rank holds it whole (norms, row-parallel biases, positions)
    expert: bool = False  # a MoE expert's: this rank's experts, gradients over edp
    tp_partial: bool = False  # replicated, but each tp rank's gradient is a part (per-head norms)


# A ZeRO-3 gather or reduce-scatter: (op, pass, elements of each whole parameter, group).
ShardedOp = tuple[str, str, tuple[int, ...], str]


@dataclass(frozen=True)
class Piece:
    """One microbatch through one part of the model on one rank."""

    forward: Pass
    backward: Pass
    saved_bytes: int  # activations the forward left alive for the backward
    peak_bytes: int  # the most activation bytes alive above the start, forward or backward
    params: tuple[Param, ...]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    tied: tuple[str, ...] = ()  # parameters a pipeline's first and last stage both hold
    # ZeRO-3: each gather and reduce-scatter the pieces' ops issue, in order, as (op, pass,
    # elements of each whole parameter in it, group: "dp" or "edp" for experts);
    # `zero3_calls` prices them for any dp.
    sharded_ops: tuple[tuple[str, str, tuple[int, ...], str], ...] = ()

    def __post_init__(self) -> None:
        # Totals every projection reads, summed once.
        again = sum(g.flops for g in self.backward.gemms if g.phase == "forward")
        total = sum(g.flops for g in self.forward.gemms + self.backward.gemms)
        object.__setattr__(self, "flops", total - again)  # forward and backward: model FLOPs
        object.__setattr__(self, "recomputed_flops", again)
        object.__setattr__(self, "param_elements", sum(p.elements for p in self.params))

    flops: int = field(init=False)
    recomputed_flops: int = field(init=False)
    param_elements: int = field(init=False)

    def gemms(self, phase: str) -> tuple[Gemm, ...]:
        return tuple(g for g in self.forward.gemms + self.backward.gemms if g.phase == phase)


@dataclass(frozen=True)
class TraceKey:
    """Everything a piece's counts depend on."""

    config: ModelDescription
    part: str  # one of PARTS
    microbatch: int
    seq_len: int
    tp: int = 1
    sequence_parallel: bool = False
    recompute: str = "none"
    dtype: str = "bf16"
    zero3: bool = False  # ZeRO-3 shards the parameters: its gathers are the pieces' own
    cp: int = 1  # context parallelism: the piece runs one cp rank's chunks
    cp_comm: str = "ring"
    cp_balance: bool = True
    ep: int = 1  # expert parallelism: the piece holds E/ep experts and exchanges tokens
    moe_imbalance: float = 1.0  # the traced rank's experts get this many times the mean slots
    attention: str = "eager"  # the attention kernel (`civetta.fused.attention_kernel`)


def key_for(
    config: ModelDescription,
    part: str,
    layout: Layout,
    dtype: str,
    seq_len: int | None = None,
    moe_imbalance: float = 1.0,
    attention: str = "eager",
) -> TraceKey:
    """The key of `part` under `layout`, with what the trace does not depend on left out: the
    ends of the model hold no block to recompute, and ZeRO-3's ops are the same for any dp > 1
    (`zero3_calls` sizes them)."""
    assert part in PARTS, part
    sp = layout.sequence_parallel and layout.tp > 1
    recompute = layout.recompute if part == "block" else "none"
    zero3 = layout.zero == 3 and layout.dp > 1
    seq = seq_len or config.block_size
    cp = (layout.cp, layout.cp_comm, layout.cp_balance) if layout.cp > 1 else (1, "ring", True)
    ep = layout.ep if part == "block" else 1
    imbalance = moe_imbalance if ep > 1 else 1.0
    kernel = attention if part == "block" else "eager"  # the ends hold no attention
    return TraceKey(
        config, part, layout.microbatch_size, seq, layout.tp, sp, recompute, dtype, zero3, *cp, ep,
        imbalance, kernel,
    )  # fmt: skip


def zero3_calls(piece: Piece, dp: int, element_bytes: int, edp: int | None = None) -> list[Call]:
    """ZeRO-3's collectives of one microbatch of `piece` over `dp` ranks (a MoE's experts over
    their `edp` ranks, on axis "edp"), as the ledger counts them: each parameter is cut into n
    chunks of ⌈size/n⌉ elements (`parallel.zero`); an all-gather passes this rank's chunks, a
    reduce-scatter the n chunks of every gradient."""
    return sharded_calls(piece.sharded_ops, dp, element_bytes, edp)


def sharded_calls(
    ops: Sequence[ShardedOp], dp: int, element_bytes: int, edp: int | None = None
) -> list[Call]:
    """`zero3_calls` of a sequence of sharded ops (a piece's, or one per tensor of them)."""
    calls = []
    for op, phase, sizes, group in ops:
        n, axis = (dp, "dp") if group == "dp" else (edp or dp, "edp")
        if n == 1:
            continue
        chunks = sum(ceil_div(size, n) for size in sizes) * element_bytes
        if op == "all_gather":
            calls.append(Call(op, axis, phase, chunks, (n - 1) * chunks))
        else:
            calls.append(Call(op, axis, phase, n * chunks, (n - 1) * chunks))
    return calls


def _fill(out: Any, source: Any = None) -> None:
    """What the virtual mesh writes into a received buffer: nothing, when it holds no data."""
    if not meta.is_meta(out):
        numpy_fill(out, source)


def _build(key: TraceKey, runtime: Runtime) -> tuple[Module, bool]:
    """The piece's module, built data-free by the model's own stage constructor (a stage of
    one block, or of none with the ends), and whether it starts from token ids."""
    first, last = key.part in ("first", "whole"), key.part in ("last", "whole")
    layers = range(1) if key.part == "block" else range(0)
    with meta.data_free():
        stage = build_stage(
            key.config,
            layers,
            first,
            last,
            dtype=ARRAY_DTYPES[key.dtype],
            sharding=runtime.sharding,
            recompute=key.recompute,
        )
    return stage, first


@lru_cache(maxsize=4096)
def trace(key: TraceKey) -> Piece:
    """Run one microbatch of the piece forward and backward, data-free, on tp rank 0 (and dp
    rank 0 under ZeRO-3) of a virtual mesh, and keep what the engine and the ledger recorded.
    Under expert parallelism the mesh has ep data-parallel ranks (2·ep under ZeRO-3, so the
    experts' edp group issues its ops too); balanced data-free routing sends each ep rank as
    many slots as it receives."""
    # Any dp > 1 issues ZeRO-3's ops; their sizes are `zero3_calls`'.
    dp = key.ep * (2 if key.zero3 else 1)
    layout = Layout(
        dp=dp,
        ep=key.ep,
        tp=key.tp,
        cp=key.cp,
        cp_comm=key.cp_comm,
        cp_balance=key.cp_balance,
        sequence_parallel=key.sequence_parallel,
        zero=3 if key.zero3 else 0,
        recompute=key.recompute,
    )
    log = CallLog()
    # Balanced, every cp rank attends over as much; unbalanced, the last one over the most.
    rank = 0 if key.cp_balance else layout.mesh.rank_of(cp=key.cp - 1)
    mesh = virtual_mesh(dp=dp, tp=key.tp, ledger=log, fill=_fill, cp=key.cp, rank=rank, ep=key.ep)
    runtime = Runtime(layout, mesh)
    if runtime.sharding.experts is not None:  # the routing assumption (ep rank 0 is traced)
        runtime.sharding.experts.imbalance = key.moe_imbalance
    sharded_ops = _record_sharded_ops(runtime, log)
    precision = PRECISIONS.get(key.dtype)
    if precision is not None:  # the ledger counts the bytes a GPU would send
        log.float32_itemsize = precision.itemsize
    module, from_tokens = _build(key, runtime)
    dtype = ARRAY_DTYPES[key.dtype]
    b, s, h = key.microbatch, key.seq_len // key.cp, key.config.n_embd  # this cp rank's chunks
    local = s // key.tp if key.sequence_parallel else s
    tokens = meta.token_ids((b, s))
    inputs: Any = tokens
    if not from_tokens:
        # The previous piece's output, not a leaf: what a block keeps of its input counts, as it
        # does for every block but a stage's first (whose input is the received message).
        leaf = Tensor(meta.MetaArray((b, local, h), dtype), requires_grad=True)
        inputs = ax.mul(leaf, 1.0)
    live, nodes = activation_meter.live, activation_meter.nodes
    peak = activation_meter.peak
    activation_meter.peak = live
    with autocast(precision), attention_kernel(key.attention), recording_gemms() as gemms:
        with log.phase("forward"):
            out = module(inputs, tokens) if key.part in ("last", "whole") else module(inputs)
        forward = Pass(tuple(gemms.gemms), tuple(log.calls), activation_meter.nodes - nodes,
                       gemms.output_bytes)  # fmt: skip
        saved = activation_meter.live - live
        gemms.clear()
        log.calls.clear()
        nodes = activation_meter.nodes
        grad = None if out.data.ndim == 0 else meta.MetaArray(out.shape, out.dtype)
        with log.phase("backward"):
            out.backward(grad)
        backward = Pass(tuple(gemms.gemms), tuple(log.calls), activation_meter.nodes - nodes,
                        gemms.output_bytes)  # fmt: skip
    top = activation_meter.peak - live
    activation_meter.peak = max(peak, activation_meter.peak)
    output_shape = tuple(out.shape)
    del out
    tied = tuple(getattr(module, "aliases", {}).values())
    return Piece(forward, backward, saved, top, _params(module, runtime), (b, local, h),
                 output_shape, tied, tuple(sharded_ops))  # fmt: skip


def _record_sharded_ops(runtime: Runtime, log: CallLog) -> list[ShardedOp]:
    """Under ZeRO-3, note the whole sizes of the parameters each gather and reduce-scatter of
    the stores (`parallel.zero.ShardedStore`: the dense one over dp × cp, the experts' over
    edp) moves, with the pass it runs in and the group."""
    found: list[ShardedOp] = []
    experts = runtime.sharding.experts
    stores = [(runtime.sharding.store, "dp")]
    if experts is not None and experts.store is not runtime.sharding.store:
        stores.append((experts.store, "edp"))
    for store, group in stores:
        if isinstance(store, ShardedStore):
            _wrap(store, group, log, found)
    return found


def _wrap(store: ShardedStore, group: str, log: CallLog, found: list[ShardedOp]) -> None:
    gather, reduce_scatter = store.gather, store.reduce_scatter

    def gathering(shards: Any) -> Any:
        found.append(("all_gather", log.current_phase, tuple(s.size for s in shards), group))
        return gather(shards)

    def scattering(shards: Any, grads: Any) -> Any:
        found.append(("reduce_scatter", log.current_phase, tuple(s.size for s in shards), group))
        return reduce_scatter(shards, grads)

    store.gather, store.reduce_scatter = gathering, scattering  # type: ignore[method-assign]


def _params(module: Module, runtime: Runtime) -> tuple[Param, ...]:
    """The piece's parameters on this rank, whole over dp (ZeRO-3 keeps chunks)."""
    sharding = runtime.sharding
    sizes = {name: p.size for name, p in module.params.items()}
    stores = [sharding.store] + ([sharding.experts.store] if sharding.experts else [])
    for store in stores:
        whole = getattr(store, "whole_sizes", None)
        if whole:
            sizes.update({k: v for k, v in whole().items() if k in sizes})
    tensor_parallel = sharding if isinstance(sharding, TensorParallelSharding) else None
    experts = runtime.expert_names
    partial = tensor_parallel.partial_over_tp if tensor_parallel else set()
    return tuple(
        Param(
            name,
            int(sizes[name]),
            bool(tensor_parallel and tensor_parallel.is_sharded(name)),
            name in experts,
            name in partial,
        )
        for name in module.params
    )
