"""ZeRO: model state sharded over the data-parallel group (Rajbhandari et al. 2020).

Plain data parallelism keeps on every dp rank the whole parameters, gradients and optimizer
state. ZeRO removes that redundancy one category at a time:

- stage 1: optimizer state. The gradients are reduce-scattered so each rank holds the dp-summed
  gradient of its shard only, updates that shard of the parameters (an elementwise optimizer on a
  slice gives exactly the slice of the whole update), and the updated shards are all-gathered.
- stage 2: gradients too. Each bucket's whole gradient buffer is dropped once it has been
  reduce-scattered; only the shard's gradient is kept.
- stage 3: parameters too. Each rank stores only its shard of every parameter (`ShardedStore`);
  every op that uses a parameter all-gathers it before its forward and again before its
  backward, frees the whole value after use, and reduce-scatters the parameter's gradient
  straight into the shard's gradient.

Partitioning. Stages 1 and 2 partition the gradient buckets of plain data parallelism
(`data_parallel.plan_buckets`, `parallel.bucket_mb`): a bucket of B elements is zero-padded to
dp·⌈B/dp⌉ and rank r owns the contiguous elements [r·⌈B/dp⌉, (r+1)·⌈B/dp⌉). With the default
25 MB buckets a small model is one bucket: each rank owns a contiguous shard of the flattened
parameters. Partitioning by bucket makes the reduce-scatter plus all-gather of each bucket cost
exactly the all-reduce plain DP sends for it. Stage 3 partitions each parameter on its own, as
DeepSpeed's stage 3 does: a parameter of n elements is zero-padded to dp·⌈n/dp⌉ and rank r keeps
chunk r (padding stays zero through AdamW and SGD: zero gradient, zero update).

Communication per step, ring wire bytes of one dp rank (`parallel.comm`): stages 1 and 2 send
what plain DP sends (reduce-scatter + all-gather = all-reduce = 2Ψ in the paper's units), plus
one 8-byte all-reduce of the squared gradient norm, whose terms now live on different ranks.
Stage 3 sends 3Ψ per microbatch: a parameter all-gather in forward, another in backward, the
gradient reduce-scatter. As in DeepSpeed and FSDP, whose hooks gather a module's parameters
before its backward, an op gathers all its parameters before its backward even when its
backward does not read them (a bias, an embedding table). A tied embedding table is used by two
ops (the lookup and the head) and is gathered by each.

Memory, the closed forms of `model_state_bytes`, in elements of the rank's Ψ parameters (this
rank's pipeline stage and tensor-parallel slices):

              params     grads        optimizer (K states per element)
    stage 0   Ψ          Ψ            K·Ψ
    stage 1   Ψ          dp·S         K·Ψ_r
    stage 2   Ψ          S            K·Ψ_r
    stage 3   S3         S3           K·S3

with S = Σ_buckets ⌈B/dp⌉ (the padded shard), Ψ_r the real parameters inside rank r's shard
(optimizer state exists only for those), S3 = Σ_params ⌈n/dp⌉. When dp divides every bucket and
every parameter these are DeepSpeed's Ψ/dp. Stage 1's gradient buffers keep the whole bucket
(as plain DP's do), the reduced shard written back in place.

Mixed precision (bf16/fp16): the float32 masters are optimizer state like Adam's moments, so
stage 1 shards them with it (K = 12 bytes per element: master, m, v; weights and gradients count
2 bytes). A rank updates the masters of its shard and writes their rounding into the shard before
the gather. Gradients are reduced as plain DP reduces them: each rank's rounded gradients summed
in float32. fp16's loss scaling checks the gradient shards for overflow on every rank and skips
the step everywhere if any overflowed.

What the simulation does not model: the engine accumulates each parameter's whole gradient
during backward (it has no per-parameter hooks), so under stage 2 the whole gradients exist until
the step's reduce-scatter; a framework reduce-scatters each bucket as soon as backward fills it.
Stage 3's gradients are reduce-scattered by each op's backward, hence per microbatch (a linear's
in the weight pass under zero-bubble schedules, which defer weight gradients).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from civetta.axioms import _scatter_add_rows
from civetta.meters import flop_meter
from civetta.nn import ParameterStore
from civetta.optim import Optimizer, clip_coefficient
from civetta.precision import MasterWeights, Precision
from civetta.tensor import (
    DeferredGrad,
    Tensor,
    current_precision,
    make_node,
    weight_grads_deferred,
)
from parallel.comm import Group
from parallel.data_parallel import MB, plan_buckets

if TYPE_CHECKING:
    from parallel.runtime import Runtime

# fp16 loss scaling: gradient shards → (unscaled shards, whether to step).
Unscale = Callable[[dict[str, np.ndarray]], tuple[dict[str, np.ndarray], bool]]

STAGES = (0, 1, 2, 3)
MASTER = "master"  # the masters' kind when packed beside the optimizer state


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ---- stage 3: parameters sharded, gathered around each use ---------------------------------------
@dataclass
class _Shard:
    """One parameter under ZeRO-3: this rank's chunk, and what the whole parameter looks like."""

    name: str
    shape: tuple[int, ...]  # the whole parameter (this tensor-parallel rank's part of it)
    size: int  # elements of the whole parameter
    chunk: int  # ⌈size / dp⌉ elements per rank; the last ranks' tails are zero padding
    leaf: Tensor  # this rank's chunk, shape (chunk,): the parameter the optimizer updates


class ShardedStore(ParameterStore):
    """ZeRO-3's parameter store: each rank keeps one chunk of every parameter.

    `create` returns the chunk as the parameter (so the model's `params`, the optimizer and the
    memory report see shards); the ops gather whole values from the chunks over the dp group and
    return the gradients as chunks, reduce-scattered (summed, not yet averaged, over dp).
    """

    def __init__(self, group: Group) -> None:
        self.group = group
        self._by_leaf: dict[Tensor, _Shard] = {}
        self._by_name: dict[str, _Shard] = {}
        self.gathered_peak = 0  # the most bytes of whole parameters one gather produced

    # -- parameters --
    def create(self, name: str, value: np.ndarray, dtype: Any) -> Tensor:
        n, rank = self.group.size, self.group.rank
        value = np.asarray(value)
        chunk = ceil_div(value.size, n)
        padded = np.zeros(n * chunk, dtype=dtype)
        padded[: value.size] = value.reshape(-1)
        # A copy, so the whole initial value is not kept alive as the chunk's base.
        leaf = Tensor(padded[rank * chunk : (rank + 1) * chunk].copy(), requires_grad=True)
        shard = _Shard(name, value.shape, value.size, chunk, leaf)
        self._by_leaf[leaf] = shard
        self._by_name[name] = shard
        return leaf

    def whole_sizes(self) -> dict[str, int]:
        """Elements of every whole parameter, by name."""
        return {name: s.size for name, s in self._by_name.items()}

    def full_array(self, name: str, chunk: np.ndarray) -> np.ndarray:
        """The whole parameter (or gradient) `name` from every rank's chunk; collective over dp."""
        shard = self._by_name[name]
        return self.group.all_gather(np.ascontiguousarray(chunk))[: shard.size].reshape(shard.shape)

    # -- the two collectives --
    def gather(self, shards: Sequence[_Shard]) -> list[np.ndarray]:
        """Whole values of `shards`, in one all-gather of their concatenated chunks."""
        n = self.group.size
        width = sum(s.chunk for s in shards)
        mine = np.concatenate([s.leaf.data for s in shards])
        blocks = self.group.all_gather(mine).reshape(n, width)  # row r: rank r's chunks
        whole, offset = [], 0
        for s in shards:
            flat = blocks[:, offset : offset + s.chunk].reshape(-1)  # a copy: columns of rows
            whole.append(flat[: s.size].reshape(s.shape))
            offset += s.chunk
        self.gathered_peak = max(self.gathered_peak, sum(w.nbytes for w in whole))
        return whole

    def reduce_scatter(self, shards: Sequence[_Shard], grads: Sequence[np.ndarray]) -> list:
        """This rank's chunk of each whole gradient summed over dp, in one reduce-scatter.
        Under mixed precision each rank's gradients are rounded before the sum, as the whole
        store's ops round theirs before plain DP's all-reduce; the sums are kept (`_node`)."""
        policy = current_precision()
        if policy is not None:
            grads = [policy.round(g) for g in grads]
        n = self.group.size
        width = sum(s.chunk for s in shards)
        send = np.zeros((n, width), dtype=grads[0].dtype)  # row r: what rank r receives
        offset = 0
        for s, g in zip(shards, grads, strict=True):
            flat = g.reshape(-1)
            if s.size < n * s.chunk:
                flat = np.concatenate([flat, np.zeros(n * s.chunk - s.size, flat.dtype)])
            send[:, offset : offset + s.chunk] = flat.reshape(n, s.chunk)
            offset += s.chunk
        mine = self.group.reduce_scatter(send.reshape(-1))
        bounds = np.cumsum([0] + [s.chunk for s in shards])
        return [mine[bounds[i] : bounds[i + 1]] for i in range(len(shards))]

    # -- the ops: gather, compute, free; in backward gather again and reduce-scatter --
    @staticmethod
    def _node(out: np.ndarray, parents: tuple[Tensor, ...], backward: Any, sums: int) -> Tensor:
        """`make_node` for an op whose last `sums` input gradients are reduce-scattered sums:
        under mixed precision the others are rounded, those are not (`reduce_scatter`)."""
        policy = current_precision()
        if policy is None:
            return make_node(out, parents, backward)

        def rounded(g: np.ndarray) -> tuple[np.ndarray | None, ...]:
            grads = backward(g)
            head = len(grads) - sums
            return tuple(
                policy.round(x) if i < head and x is not None else x for i, x in enumerate(grads)
            )

        return make_node(out, parents, rounded, round_grads=False)

    def _shards(self, *params: Tensor | None) -> list[_Shard]:
        return [self._by_leaf[p] for p in params if p is not None]

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """`fused.linear` on gathered values; the backward gathers the weight again instead of
        keeping it, so no whole weight outlives its op. Under a zero-bubble schedule the weight
        and bias gradients (which need no weight) are computed and reduce-scattered in the
        weight pass: every dp replica runs the same schedule, so the collectives still pair."""
        shards = self._shards(weight, bias)
        out_features, in_features = shards[0].shape
        data = x.data
        x2 = data.reshape(-1, in_features)
        w, *b = self.gather(shards)
        out = x2 @ w.T
        if b:
            out += b[0]
        del w, b  # the whole parameters are freed here
        flops = 2 * x2.shape[0] * in_features * out_features
        flop_meter.forward += flops
        need_x = x.requires_grad

        def backward(g: np.ndarray) -> tuple[np.ndarray | None, ...]:
            w = self.gather(shards)[0]
            g2 = g.reshape(-1, out_features)
            dx = None
            if need_x:
                dx = (g2 @ w).reshape(data.shape)
                flop_meter.backward += flops
            del w

            def weight_grads() -> list[np.ndarray]:
                flop_meter.backward += flops
                grads = [g2.T @ x2]
                if len(shards) == 2:
                    grads.append(np.ones(g2.shape[0], g2.dtype) @ g2)  # bias: a GEMV over tokens
                return self.reduce_scatter(shards, grads)

            if not weight_grads_deferred():
                return (dx, *weight_grads())
            # One reduce-scatter serves both: the weight's deferred gradient (applied first)
            # runs it, the bias's takes its part.
            done: list[np.ndarray] = []

            def part(i: int) -> DeferredGrad:
                def compute() -> np.ndarray:
                    if not done:
                        done.extend(weight_grads())
                    return done[i]

                return DeferredGrad(compute)

            return (dx, *(part(i) for i in range(len(shards))))

        parents = (x, weight) if bias is None else (x, weight, bias)
        out = out.reshape(*data.shape[:-1], out_features)
        return self._node(out, parents, backward, sums=len(shards))

    def lookup(self, table: Tensor, rows: np.ndarray) -> Tensor:
        shards = self._shards(table)
        (whole,) = self.gather(shards)
        out = whole[rows]  # fancy indexing copies: the table is freed on return
        del whole
        shape = shards[0].shape

        def backward(g: np.ndarray) -> tuple[np.ndarray]:
            self.gather(shards)  # DeepSpeed's pre-backward fetch; the scatter-add needs no values
            full = _scatter_add_rows(rows, g, shape)  # the dense lookup's backward
            return tuple(self.reduce_scatter(shards, [full]))

        return self._node(out, (table,), backward, sums=1)

    def affine(self, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        """x · weight, then + bias: two nodes, as the whole store builds them (so the activation
        meter counts the same bytes), each gathering its own parameter."""
        if weight is not None:
            x = self._scale(x, weight)
        if bias is not None:
            x = self._shift(x, bias)
        return x

    def _scale(self, x: Tensor, weight: Tensor) -> Tensor:
        shards = self._shards(weight)
        data = x.data
        out = data * self.gather(shards)[0]  # (..., C) · (C,)
        leading = tuple(range(data.ndim - 1))
        need_x = x.requires_grad

        def backward(g: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
            (w,) = self.gather(shards)
            dx = g * w if need_x else None
            return (dx, *self.reduce_scatter(shards, [np.sum(g * data, axis=leading)]))

        return self._node(out, (x, weight), backward, sums=1)

    def _shift(self, x: Tensor, bias: Tensor) -> Tensor:
        shards = self._shards(bias)
        out = x.data + self.gather(shards)[0]
        leading = tuple(range(x.ndim - 1))

        def backward(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            self.gather(shards)  # DeepSpeed's pre-backward fetch; a bias's gradient needs no value
            return (g, *self.reduce_scatter(shards, [np.sum(g, axis=leading)]))

        return self._node(out, (x, bias), backward, sums=1)


# ---- stages 1 and 2: gradient buckets partitioned over dp ----------------------------------------
@dataclass
class _Bucket:
    """One gradient bucket of plain DP, flattened, padded to dp·chunk and cut into dp chunks."""

    entries: list[tuple[str, int, int]]  # (name, start, stop) in the flat bucket
    size: int  # B, elements of the bucket
    chunk: int  # ⌈B / dp⌉
    # This rank's chunk, as (name, range in the flattened parameter, range in the chunk).
    pieces: list[tuple[str, slice, slice]] = field(default_factory=list)
    grad_buffer: np.ndarray | None = None  # stage 1: the whole bucket; stage 2: the chunk


def partition_buckets(
    sizes: dict[str, int], itemsize: int, bucket_mb: float, rank: int, dp: int
) -> list[_Bucket]:
    """Plain DP's buckets (`plan_buckets`) with rank `rank`'s chunk of each."""
    cap = max(1, int(bucket_mb * MB))
    buckets = []
    for names in plan_buckets([(name, n * itemsize) for name, n in sizes.items()], cap):
        entries, offset = [], 0
        for name in names:
            entries.append((name, offset, offset + sizes[name]))
            offset += sizes[name]
        bucket = _Bucket(entries, offset, ceil_div(offset, dp))
        low, high = rank * bucket.chunk, (rank + 1) * bucket.chunk
        for name, start, stop in entries:
            a, b = max(start, low), min(stop, high)
            if a < b:
                bucket.pieces.append((name, slice(a - start, b - start), slice(a - low, b - low)))
        buckets.append(bucket)
    return buckets


# ---- the update --------------------------------------------------------------------------------
class ZeroOptimizer:
    """Gradient synchronisation, global-norm clipping and the optimizer update under ZeRO.

    `step(lr)` replaces plain DP's all-reduce → norm → clip → update. The optimizer that
    `build_optimizer` makes sees only this rank's shard: views into the parameters' arrays
    (stages 1, 2; named after their parameter, so weight decay still goes by name) or the
    parameters themselves (stage 3, where they are the shards). With mixed precision
    (`precision`) it updates float32 masters of that shard only (`masters`), whose rounding is
    written into the shard before the parameters are gathered (ZeRO's 16Ψ: the 12 bytes of
    masters and Adam state per parameter are what stage 1 shards).
    """

    def __init__(
        self,
        runtime: Runtime,
        params: dict[str, Tensor],
        build_optimizer: Callable[[dict[str, Tensor]], Optimizer],
        stage: int,
        tied: tuple[str, ...] = (),
        grad_clip: float = 0.0,
        precision: Precision | None = None,
    ) -> None:
        assert stage in (1, 2, 3), stage
        assert (stage == 3) == isinstance(runtime.layout.store, ShardedStore), stage
        self.runtime = runtime
        self.group = runtime.dp_group
        self.params = params
        self.stage = stage
        self.tied = tied
        self.grad_clip = grad_clip
        self.last_grads: dict[str, np.ndarray] = {}  # this rank's gradient shards, before clipping
        self.grad_bytes = 0
        self.buckets: list[_Bucket] = []
        self._owned: dict[str, slice] = {}  # stages 1, 2: this rank's piece of each parameter
        self._state_kinds: list[str] = []
        self.masters: MasterWeights | None = None
        if stage == 3:
            self.optimizer = self._build(build_optimizer, params, precision)
            return
        dtype = next(iter(params.values())).dtype
        sizes = {name: p.size for name, p in params.items()}
        n = self.group.size
        self.buckets = partition_buckets(
            sizes, dtype.itemsize, runtime.bucket_mb, self.group.rank, n
        )
        for bucket in self.buckets:
            # Stage 1 keeps each bucket's whole gradient buffer (zero padding written once);
            # stage 2 keeps only the chunk.
            length = n * bucket.chunk if stage == 1 else bucket.chunk
            bucket.grad_buffer = np.zeros(length, dtype=dtype)
        # Each parameter lies in one bucket, so this rank owns at most one piece of it.
        self._owned = {
            name: param_range for bucket in self.buckets for name, param_range, _ in bucket.pieces
        }
        pieces = {name: Tensor(self._flat(name)[r]) for name, r in self._owned.items()}
        self.optimizer = self._build(build_optimizer, pieces, precision)
        # The kinds of optimizer state ("exp_avg", ...), the same on every rank even if one owns
        # no piece at all: read off an optimizer built on one probe element.
        probe = build_optimizer({"probe": Tensor(np.zeros(1, dtype=dtype))})
        self._state_kinds = sorted(k.partition(".")[0] for k in probe.state_dict() if k != "step")

    def _build(
        self,
        build_optimizer: Callable[[dict[str, Tensor]], Optimizer],
        shard: dict[str, Tensor],
        precision: Precision | None,
    ) -> Optimizer:
        """The optimizer over this rank's shard, or over float32 masters of it."""
        if precision is None:
            return build_optimizer(shard)
        self.masters = MasterWeights(shard, precision)  # masters of the float32 initial values
        for p in self.params.values():  # the model computes with roundings from the first step
            p.data[...] = precision.round(p.data)
        return build_optimizer(self.masters.master)

    def _flat(self, name: str) -> np.ndarray:
        return self.params[name].data.reshape(-1)  # a view: parameters are contiguous

    def step(self, lr: float, unscale: Unscale | None = None) -> tuple[float, bool]:
        """Synchronise, clip and update; returns the global gradient norm before clipping and
        whether the optimizer stepped. `unscale` (fp16's loss scaling) takes this rank's
        gradient shards and returns them unscaled and whether to step, the same on every rank
        (an overflow anywhere skips the step everywhere)."""
        grads = {name: p.grad for name, p in self.params.items()}
        # Tied copies across pipeline stages, sequence-parallel partial sums across tp.
        grads = self.runtime.combine_partial_gradients(grads, self.tied)
        if self.stage == 3:
            shards = self._average_shards(grads)
        else:
            if self.stage == 2:  # `grads` now holds the only references to the whole gradients
                for p in self.params.values():
                    p.grad = None
            shards = self._reduce_scatter(grads)
        del grads
        if unscale is not None:
            shards, take_step = unscale(shards)
            if not take_step:
                self.last_grads = shards
                return 0.0, False
        self.last_grads = shards
        sq_norm = self.runtime.global_grad_sq_norm(shards, self.tied, sharded_over_dp=True)
        grad_norm = math.sqrt(sq_norm)
        coef = clip_coefficient(grad_norm, self.grad_clip) if self.grad_clip else 1.0
        if coef < 1.0:  # new arrays: `last_grads` keeps the unclipped gradients
            shards = {name: g * g.dtype.type(coef) for name, g in shards.items()}
        self.optimizer.lr = lr
        self.optimizer.step(shards)
        if self.masters is not None:
            self.masters.publish()  # the shard's rounding, which the gather then spreads
        if self.stage != 3:
            self._all_gather_parameters()
        return grad_norm, True

    def _average_shards(self, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Stage 3: the ops' backward already reduce-scattered (summed) every gradient."""
        scale = 1.0 / self.group.size
        averaged = {name: g * g.dtype.type(scale) for name, g in grads.items()}
        self.grad_bytes = sum(g.nbytes for g in averaged.values())
        return averaged

    def _reduce_scatter(self, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Stages 1, 2: each bucket packed, reduce-scattered and averaged; returns this rank's
        pieces of the gradients by parameter name (views into the kept buffers)."""
        n, rank = self.group.size, self.group.rank
        shards: dict[str, np.ndarray] = {}
        for bucket in self.buckets:
            assert bucket.grad_buffer is not None
            if self.stage == 1:
                flat = bucket.grad_buffer
            else:  # a transient whole bucket: freed when the next one is packed
                flat = np.zeros(n * bucket.chunk, dtype=bucket.grad_buffer.dtype)
            for name, start, stop in bucket.entries:
                flat[start:stop] = grads.pop(name).reshape(-1)
            if self.stage == 1:
                mine = flat[rank * bucket.chunk : (rank + 1) * bucket.chunk]
                mine[...] = self.group.reduce_scatter(flat)
            else:
                mine = self.group.reduce_scatter(flat, out=bucket.grad_buffer)
            mine *= mine.dtype.type(1.0 / n)
            for name, _, chunk_range in bucket.pieces:
                shards[name] = mine[chunk_range]
        self.grad_bytes = sum(b.grad_buffer.nbytes for b in self.buckets)
        return shards

    def _all_gather_parameters(self) -> None:
        """Stages 1, 2: every rank's updated chunk of each bucket to every rank."""
        for bucket in self.buckets:
            mine = np.zeros(bucket.chunk, dtype=bucket.grad_buffer.dtype)
            for name, param_range, chunk_range in bucket.pieces:
                mine[chunk_range] = self._flat(name)[param_range]
            whole = self.group.all_gather(mine)
            for name, start, stop in bucket.entries:
                self._flat(name)[...] = whole[start:stop]

    # -- checkpoints: the state as whole parameters, whatever the stage --
    def whole_state(self) -> tuple[dict[str, np.ndarray], ...]:
        """This rank's parameters, optimizer state and float32 masters (empty without mixed
        precision) as plain data parallelism holds them: whole parameters (this rank's
        tensor-parallel and pipeline part), optimizer state keyed `<kind>.<name>` in the
        parameter's shape, and `step`. Collective over dp; every dp rank gets the same arrays.
        Not recorded in the ledger: checkpointing is not training."""
        with self.group.ledger.paused():
            if self.stage == 3:
                return self._whole_state_sharded()
            return self._whole_state_buckets()

    def _masters(self) -> dict[str, np.ndarray]:
        return {n: t.data for n, t in self.masters.master.items()} if self.masters else {}

    def _whole_state_sharded(self) -> tuple[dict[str, np.ndarray], ...]:
        """Stage 3: every chunk (parameters, optimizer state, masters) in one all-gather."""
        store = self.runtime.layout.store
        assert isinstance(store, ShardedStore)
        state = self.optimizer.state_dict()
        shard_of = {name: store._by_leaf[p] for name, p in self.params.items()}
        items = [(f"param/{name}", shard_of[name], p.data) for name, p in self.params.items()]
        for key, value in state.items():
            if key != "step":
                items.append((f"optim/{key}", shard_of[key.partition(".")[2]], value))
        items += [(f"master/{n}", shard_of[n], a) for n, a in self._masters().items()]
        n = self.group.size
        width = sum(s.chunk for _, s, _ in items)
        mine = np.concatenate([np.ravel(a) for _, _, a in items])
        blocks = self.group.all_gather(mine).reshape(n, width)  # row r: rank r's chunks
        out: dict[str, dict[str, np.ndarray]] = {"param": {}, "optim": {"step": state["step"]}}
        out["master"] = {}
        offset = 0
        for key, s, _ in items:
            whole = blocks[:, offset : offset + s.chunk].reshape(-1)[: s.size].reshape(s.shape)
            kind, _, rest = key.partition("/")
            out[kind][rest] = whole
            offset += s.chunk
        return out["param"], out["optim"], out["master"]

    def _whole_state_buckets(self) -> tuple[dict[str, np.ndarray], ...]:
        """Stages 1, 2: the parameters are already whole; each bucket's optimizer state (and
        masters, as one more kind) is packed as every kind's chunk side by side and all-gathered
        once."""
        state = self.optimizer.state_dict()
        state.update({f"{MASTER}.{n}": a for n, a in self._masters().items()})
        kinds = self._state_kinds + ([MASTER] if self.masters else [])
        n = self.group.size
        optim = {"step": state["step"]}
        for bucket in self.buckets:
            if not kinds:
                break
            mine = np.zeros((len(kinds), bucket.chunk), dtype=bucket.grad_buffer.dtype)
            for name, _, chunk_range in bucket.pieces:
                for k, kind in enumerate(kinds):
                    mine[k, chunk_range] = state[f"{kind}.{name}"]
            blocks = self.group.all_gather(mine.reshape(-1)).reshape(n, len(kinds), bucket.chunk)
            for k, kind in enumerate(kinds):
                flat = blocks[:, k, :].reshape(-1)  # the bucket's state of this kind
                for name, start, stop in bucket.entries:
                    optim[f"{kind}.{name}"] = flat[start:stop].reshape(self.params[name].shape)
        params = {name: p.data.copy() for name, p in self.params.items()}
        masters = {k.partition(".")[2]: optim.pop(k) for k in list(optim) if k.startswith(MASTER)}
        return params, optim, masters

    def load_whole_state(
        self,
        params: dict[str, np.ndarray],
        state: dict[str, np.ndarray],
        masters: dict[str, np.ndarray] | None = None,
    ) -> None:
        """The inverse of `whole_state`: each rank keeps its chunk or piece. `params` holds every
        parameter by name; `state` every key of this rank's optimizer's `state_dict`, in the
        whole parameter's shape; `masters` the float32 masters under mixed precision (default:
        the parameters). Raises ValueError on a shape that does not fit. Local."""
        store = self.runtime.layout.store
        n, rank = self.group.size, self.group.rank

        def whole_shape(name: str) -> tuple[int, ...]:
            if self.stage == 3:
                return store._by_leaf[self.params[name]].shape
            return self.params[name].shape

        def checked(name: str, value: np.ndarray, what: str) -> np.ndarray:
            value, shape = np.asarray(value), whole_shape(name)
            if value.shape != shape:
                raise ValueError(f"{what!r} has shape {value.shape}, the model {shape}")
            return value

        def mine(name: str, value: np.ndarray, what: str) -> np.ndarray:
            flat = checked(name, value, what).reshape(-1)
            if self.stage == 3:
                chunk = store._by_leaf[self.params[name]].chunk
                padded = np.zeros(n * chunk, dtype=flat.dtype)
                padded[: flat.size] = flat
                return padded[rank * chunk : (rank + 1) * chunk]
            return flat[self._owned[name]]

        for name, p in self.params.items():
            # In place: under stages 1 and 2 the optimizer holds views of these arrays.
            if self.stage == 3:
                p.data[...] = mine(name, params[name], name)
            else:
                p.data[...] = checked(name, params[name], name)
        local = {}
        for key, value in state.items():
            if key == "step":
                local[key] = value
            else:
                local[key] = mine(key.partition(".")[2], value, key)
        self.optimizer.load_state_dict(local)
        if self.masters is not None:
            masters = masters or params
            for name, master in self.masters.master.items():
                master.data[...] = mine(name, masters[name], f"master/{name}")
            self.masters.publish()

    def full_gradients(self, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Gradients shaped like this rank's parameters, from every rank's pieces (stages 1, 2;
        collective over dp). Stage 3 gradients already have their chunk's shape. For tests."""
        if self.stage == 3:
            return dict(grads)
        full: dict[str, np.ndarray] = {}
        for bucket in self.buckets:
            mine = np.zeros(bucket.chunk, dtype=bucket.grad_buffer.dtype)
            for name, _, chunk_range in bucket.pieces:
                mine[chunk_range] = grads[name]
            whole = self.group.all_gather(mine)
            for name, start, stop in bucket.entries:
                full[name] = whole[start:stop].reshape(self.params[name].shape)
        return {name: full[name] for name in self.params}


# ---- closed forms ------------------------------------------------------------------------------
def model_state_bytes(
    sizes: Sequence[int],
    *,
    stage: int,
    dp: int,
    rank: int,
    per_element: tuple[int, int, int],
    itemsize: int,
    bucket_mb: float,
) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state on dp rank `rank`, in closed form.

    `sizes`: elements of each of the rank's parameters, in model order; `per_element`: bytes
    per element of (weights, gradients, optimizer state), as
    `parallel.cost.memory.state_bytes_per_param` gives them; `itemsize` and `bucket_mb` fix
    plain DP's buckets (stages 1, 2). See the module docstring for the table and the padding
    rule.
    """
    assert stage in STAGES, stage
    w, g, k = per_element
    psi = sum(sizes)
    if stage == 0:
        return {"params": psi * w, "grads": psi * g, "optimizer": psi * k}
    if stage == 3:
        shard = sum(ceil_div(n, dp) for n in sizes)
        return {"params": shard * w, "grads": shard * g, "optimizer": shard * k}
    named = {str(i): n for i, n in enumerate(sizes)}
    cap = max(1, int(bucket_mb * MB))
    buckets = [
        sum(named[name] for name in names)
        for names in plan_buckets([(name, n * itemsize) for name, n in named.items()], cap)
    ]
    chunks = [ceil_div(b, dp) for b in buckets]
    owned = sum(max(0, min(c, b - rank * c)) for b, c in zip(buckets, chunks, strict=True))
    grads = dp * sum(chunks) if stage == 1 else sum(chunks)
    return {"params": psi * w, "grads": grads * g, "optimizer": owned * k}
