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

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from civetta import fused, meta
from civetta.axioms import _scatter_add_rows
from civetta.meters import flop_meter, gemm_log
from civetta.nn import ParameterStore
from civetta.tensor import (
    DeferredGrad,
    Tensor,
    current_precision,
    make_node,
    weight_grads_deferred,
)
from parallel.comm import Group
from parallel.data_parallel import MB, plan_buckets

STAGES = (0, 1, 2, 3)


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
        # Each chunk, the parameter the optimizer updates: kept here, not in the shard records
        # the ops' backward closures hold, so no closure holds a Tensor.
        self._chunks: dict[str, Tensor] = {}
        self.gathered_peak = 0  # the most bytes of whole parameters one gather produced

    # -- parameters --
    def create(self, name: str, value: np.ndarray, dtype: Any) -> Tensor:
        n, rank = self.group.size, self.group.rank
        value = meta.asarray(value)
        chunk = ceil_div(value.size, n)
        padded = meta.zeros(n * chunk, dtype, like=value)
        padded[: value.size] = value.reshape(-1)
        # A copy, so the whole initial value is not kept alive as the chunk's base.
        leaf = Tensor(padded[rank * chunk : (rank + 1) * chunk].copy(), requires_grad=True)
        shard = _Shard(name, value.shape, value.size, chunk)
        self._by_leaf[leaf] = shard
        self._by_name[name] = shard
        self._chunks[name] = leaf
        return leaf

    def whole_sizes(self) -> dict[str, int]:
        """Elements of every whole parameter, by name."""
        return {name: s.size for name, s in self._by_name.items()}

    def full_array(self, name: str, chunk: np.ndarray) -> np.ndarray:
        """The whole parameter (or gradient) `name` from every rank's chunk; collective over dp."""
        shard = self._by_name[name]
        gathered = self.group.all_gather(meta.ascontiguousarray(chunk))
        return gathered[: shard.size].reshape(shard.shape)

    # -- the two collectives --
    def gather(self, shards: Sequence[_Shard]) -> list[np.ndarray]:
        """Whole values of `shards`, in one all-gather of their concatenated chunks."""
        n = self.group.size
        width = sum(s.chunk for s in shards)
        mine = np.concatenate([self._chunks[s.name].data for s in shards])
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
        send = meta.zeros((n, width), grads[0].dtype, like=grads[0])  # row r: rank r's part
        offset = 0
        for s, g in zip(shards, grads, strict=True):
            flat = g.reshape(-1)
            if s.size < n * s.chunk:
                padding = meta.zeros(n * s.chunk - s.size, flat.dtype, like=flat)
                flat = np.concatenate([flat, padding])
            send[:, offset : offset + s.chunk] = flat.reshape(n, s.chunk)
            offset += s.chunk
        mine = self.group.reduce_scatter(send.reshape(-1))
        bounds = np.cumsum([0] + [s.chunk for s in shards])
        return [mine[bounds[i] : bounds[i + 1]] for i in range(len(shards))]

    # -- the ops: gather, compute, free; in backward gather again and reduce-scatter --
    @staticmethod
    def _node(
        out: np.ndarray, parents: tuple[Tensor, ...], backward: Any, sums: int, saved: tuple
    ) -> Tensor:
        """`make_node` for an op whose last `sums` input gradients are reduce-scattered sums:
        under mixed precision the others are rounded, those are not (`reduce_scatter`). `saved`:
        the activations the backward keeps (the parameters are gathered again, not kept)."""
        policy = current_precision()
        if policy is None:
            return make_node(out, parents, backward, saved=saved)

        def rounded(g: np.ndarray) -> tuple[np.ndarray | None, ...]:
            grads = backward(g)
            head = len(grads) - sums
            return tuple(
                policy.round(x) if i < head and x is not None else x for i, x in enumerate(grads)
            )

        return make_node(out, parents, rounded, round_grads=False, saved=saved)

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
        tokens = x2.shape[0]
        flops = 2 * tokens * in_features * out_features
        flop_meter.forward += flops
        # The GEMMs `fused.linear` logs, in its phases (the backward's in the forward's precision).
        precision = current_precision()
        gemm_log.record(tokens, in_features, out_features, 1, "forward", data.dtype, precision)
        need_x = x.requires_grad
        shape, dtype = data.shape, data.dtype  # the closure keeps x2 (the weight gradient's)

        def backward(g: np.ndarray) -> tuple[Any, ...]:
            w = self.gather(shards)[0]
            g2 = g.reshape(-1, out_features)
            dx = None
            if need_x:
                dx = (g2 @ w).reshape(shape)
                flop_meter.backward += flops
                phase = "backward-input"
                gemm_log.record(tokens, out_features, in_features, 1, phase, dtype, precision)
            del w

            def weight_grads() -> list[np.ndarray]:
                flop_meter.backward += flops
                phase = "backward-weight"
                gemm_log.record(out_features, tokens, in_features, 1, phase, dtype, precision)
                grads = [g2.T @ x2]
                if len(shards) == 2:  # bias: a GEMV over tokens
                    grads.append(meta.ones(g2.shape[0], g2.dtype, like=g2) @ g2)
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
        out = out.reshape(*shape[:-1], out_features)
        return self._node(out, parents, backward, len(shards), saved=(x2,))

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

        return self._node(out, (table,), backward, 1, saved=(rows,))

    def layer_norm(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5
    ) -> Tensor:
        """`fused.layer_norm` on gathered parameters, one node keeping x̂ and 1/σ: the weight
        is gathered again for the backward, which reduce-scatters dw and db together."""
        shards = self._shards(weight, bias)
        if not shards:
            return fused.normalize(x, eps)
        # The dense node's own kernels (`fused.layer_norm`'s blocks, forward and backward): with
        # one rank gather and reduce-scatter are the identity and the bits must be the same.
        values = self.gather(shards)
        has_weight, has_bias = weight is not None, bias is not None
        w = values[0] if has_weight else None
        b = values[-1] if has_bias else None
        xhat, rstd, out = fused._normalized(x.data, eps, fused._normalize_forward, w, b)
        del values, w, b  # the whole parameters are freed here
        need_x = x.requires_grad

        def backward(g: np.ndarray) -> tuple[np.ndarray | None, ...]:
            gathered = self.gather(shards)  # the weight for dx (a bias alone needs no value)
            w = gathered[0] if has_weight else None
            dx, dw, db = fused._norm_affine_grads(xhat, rstd, g, w, need_x, has_weight, has_bias)
            del gathered, w
            sums = [s for s in (dw, db) if s is not None]
            return (dx, *self.reduce_scatter(shards, sums))

        parents = (x, *(p for p in (weight, bias) if p is not None))
        return self._node(out, parents, backward, len(shards), saved=(xhat, rstd))

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
        need_x = x.requires_grad

        def backward(g: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
            (w,) = self.gather(shards)
            dx = g * w if need_x else None
            # dw as the dense RMSNorm node sums it (`fused._norm_affine_grads`): the same bits.
            return (dx, *self.reduce_scatter(shards, [fused._column_sum(g * data)]))

        return self._node(out, (x, weight), backward, 1, saved=(data,))

    def _shift(self, x: Tensor, bias: Tensor) -> Tensor:
        shards = self._shards(bias)
        out = x.data + self.gather(shards)[0]
        leading = tuple(range(x.ndim - 1))

        def backward(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            self.gather(shards)  # DeepSpeed's pre-backward fetch; a bias's gradient needs no value
            return (g, *self.reduce_scatter(shards, [np.sum(g, axis=leading)]))

        return self._node(out, (x, bias), backward, 1, saved=())


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
    group: Any = None  # the ranks sharing it: dp × cp, or edp for expert parameters

    @property
    def buffer(self) -> np.ndarray:
        """The gradient buffer, once the update has made it."""
        assert self.grad_buffer is not None
        return self.grad_buffer


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
