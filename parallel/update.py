"""Turning gradients into an update across the data-parallel group: one interface, two kinds.

After the microbatches' backward, every rank holds partial gradients of its parameters. A
`GradientUpdate` takes them to the next weights: it synchronises them over the data-parallel
group, unscales them (fp16), clips by the global norm and steps the optimizer. Plain data
parallelism (`ReplicatedUpdate`) all-reduces and updates the whole state on every rank; ZeRO
(`ZeroUpdate`, stages 1–3, `parallel.zero`) reduce-scatters and updates only this rank's shard.
The trainer and the checkpoints use the interface and never ask which one runs; `make_update`
picks it from the layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import numpy as np

from civetta import meta
from civetta.optim import Optimizer, clip_coefficient
from civetta.precision import MasterWeights, Precision
from civetta.tensor import Tensor
from parallel.runtime import Runtime
from parallel.zero import ShardedStore, _Bucket, partition_buckets

# fp16 loss scaling: gradients → (unscaled gradients, whether to step), the same on every rank.
Unscale = Callable[[dict[str, np.ndarray]], tuple[dict[str, np.ndarray], bool]]
BuildOptimizer = Callable[[dict[str, Tensor]], Optimizer]
# The global gradient norm → whether to step, the same on every rank; called after `last_grads`
# is set and before the optimizer touches anything, so it may also raise to stop the run.
Guard = Callable[[float], bool]
MASTER = "master"  # the masters' kind when packed beside the optimizer state


class GradientUpdate:
    """What every update offers the trainer and the checkpoints.

    `optimizer` updates what this rank owns; `masters` are its float32 master weights under
    mixed precision (None otherwise); after a step, `last_grads` holds the synchronised gradients
    this rank owns, before clipping, and `grad_bytes` the bytes of gradient buffers it keeps.
    """

    optimizer: Optimizer
    masters: MasterWeights | None
    last_grads: dict[str, np.ndarray]
    grad_bytes: int

    def step(
        self, lr: float, unscale: Unscale | None = None, guard: Guard | None = None
    ) -> tuple[float, bool]:
        """Synchronise, clip and update; returns the global gradient norm before clipping and
        whether the optimizer stepped (fp16 skips a step whose gradients overflowed; `guard`,
        given the norm of a step that fp16 takes, may skip it too)."""
        raise NotImplementedError

    def whole_state(self) -> tuple[dict[str, np.ndarray], ...]:
        """(parameters, optimizer state keyed `<kind>.<name>` plus `step`, float32 masters) as
        plain data parallelism holds them: whole over dp (this rank's tp and pp part). Collective
        over dp; every dp rank gets the same arrays."""
        raise NotImplementedError

    def load_whole_state(
        self,
        params: dict[str, np.ndarray],
        state: dict[str, np.ndarray],
        masters: dict[str, np.ndarray] | None = None,
    ) -> None:
        """The inverse of `whole_state`; raises ValueError on a shape that does not fit."""
        raise NotImplementedError


class ReplicatedUpdate(GradientUpdate):
    """Plain data parallelism: every dp rank all-reduces the gradients and updates the whole
    state. With mixed precision the optimizer updates float32 masters and the model holds their
    rounding."""

    def __init__(
        self,
        runtime: Runtime,
        params: dict[str, Tensor],
        build_optimizer: BuildOptimizer,
        tied: tuple[str, ...] = (),
        grad_clip: float = 0.0,
        precision: Precision | None = None,
    ) -> None:
        self.runtime = runtime
        self.params = params
        self.tied = tied
        self.grad_clip = grad_clip
        self.masters = MasterWeights(params, precision) if precision else None
        self.optimizer = build_optimizer(self.masters.master if self.masters else params)
        self.last_grads = {}
        self.grad_bytes = 0

    def step(
        self, lr: float, unscale: Unscale | None = None, guard: Guard | None = None
    ) -> tuple[float, bool]:
        rt = self.runtime
        grads = gradients(self.params)
        grads = rt.synchronize_gradients(grads, self.tied)
        take_step = True
        if unscale is not None:
            grads, take_step = unscale(grads)
        self.last_grads = grads
        grad_norm = math.sqrt(rt.global_grad_sq_norm(grads, self.tied)) if take_step else 0.0
        if take_step and guard is not None:
            take_step = guard(grad_norm)
        coef = clip_coefficient(grad_norm, self.grad_clip) if self.grad_clip and take_step else 1.0
        if coef < 1.0:  # new arrays: `last_grads` keeps the unclipped gradients
            grads = {name: g * g.dtype.type(coef) for name, g in grads.items()}
        if take_step:
            self.optimizer.lr = lr
            self.optimizer.step(grads)
            if self.masters is not None:
                self.masters.publish()
        self.grad_bytes = sum(g.nbytes for g in grads.values() if g is not None)
        return grad_norm, take_step

    def whole_state(self) -> tuple[dict[str, np.ndarray], ...]:
        params = {name: p.data for name, p in self.params.items()}
        masters = {n: t.data for n, t in self.masters.master.items()} if self.masters else {}
        return params, self.optimizer.state_dict(), masters

    def load_whole_state(
        self,
        params: dict[str, np.ndarray],
        state: dict[str, np.ndarray],
        masters: dict[str, np.ndarray] | None = None,
    ) -> None:
        for name, p in self.params.items():
            _fill(p.data, params[name], name)
        self.optimizer.load_state_dict(state)
        if self.masters is not None:
            masters = masters or params
            for name, weights in self.masters.master.items():
                _fill(weights.data, masters[name], f"master/{name}")
            self.masters.publish()


def gradients(params: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """Every parameter's accumulated gradient (each took part in the step's loss)."""
    grads = {}
    for name, p in params.items():
        assert p.grad is not None, f"{name} has no gradient"
        grads[name] = p.grad
    return grads


def _fill(target: np.ndarray, source: np.ndarray, what: str) -> None:
    source = np.asarray(source)
    if target.shape != source.shape:
        raise ValueError(f"{what!r} has shape {source.shape}, the model {target.shape}")
    target[...] = source


# ---- the update --------------------------------------------------------------------------------
class ZeroUpdate(GradientUpdate):
    """Gradient synchronisation, global-norm clipping and the optimizer update under ZeRO.

    `step(lr)` replaces plain DP's all-reduce → norm → clip → update. The optimizer that
    `build_optimizer` makes sees only this rank's shard: views into the parameters' arrays
    (stages 1, 2; named after their parameter, so weight decay still goes by name) or the
    parameters themselves (stage 3, where they are the shards). Expert parameters
    (`Runtime.expert_names`) are sharded over the expert-data-parallel group instead, in
    buckets of their own; every gradient is divided by dp × cp all the same. With mixed precision
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
        assert (stage == 3) == isinstance(runtime.sharding.store, ShardedStore), stage
        self.runtime = runtime
        self.group = runtime.dp_group
        self.divisor = runtime.dp_group.size  # every gradient is a sum over dp × cp's tokens
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
        like = next(iter(params.values())).data  # real, or data-free (`civetta.meta`)
        dtype = like.dtype
        experts = runtime.expert_names
        for group, names in (
            (runtime.dp_group, [n for n in params if n not in experts]),
            (runtime.edp_group, [n for n in params if n in experts]),
        ):
            sizes = {name: params[name].size for name in names}
            for bucket in partition_buckets(
                sizes, dtype.itemsize, runtime.layout.bucket_mb, group.rank, group.size
            ):
                bucket.group = group
                self.buckets.append(bucket)
        for bucket in self.buckets:
            n = bucket.group.size
            # Stage 1 keeps each bucket's whole gradient buffer (zero padding written once);
            # stage 2 keeps only the chunk.
            length = n * bucket.chunk if stage == 1 else bucket.chunk
            bucket.grad_buffer = meta.zeros(length, dtype, like=like)
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

    def step(
        self, lr: float, unscale: Unscale | None = None, guard: Guard | None = None
    ) -> tuple[float, bool]:
        """Synchronise, clip and update; returns the global gradient norm before clipping and
        whether the optimizer stepped. `unscale` (fp16's loss scaling) takes this rank's
        gradient shards and returns them unscaled and whether to step, the same on every rank
        (an overflow anywhere skips the step everywhere); so does `guard`, given the norm."""
        grads = gradients(self.params)
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
        if guard is not None and not guard(grad_norm):
            return grad_norm, False  # nothing updated, so the parameters need no gather
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
        scale = 1.0 / self.divisor
        averaged = {name: g * g.dtype.type(scale) for name, g in grads.items()}
        self.grad_bytes = sum(g.nbytes for g in averaged.values())
        return averaged

    def _reduce_scatter(self, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Stages 1, 2: each bucket packed, reduce-scattered and averaged; returns this rank's
        pieces of the gradients by parameter name (views into the kept buffers)."""
        shards: dict[str, np.ndarray] = {}
        for bucket in self.buckets:
            assert bucket.grad_buffer is not None
            group = bucket.group
            n, rank = group.size, group.rank
            if self.stage == 1:
                flat = bucket.grad_buffer
            else:  # a transient whole bucket: freed when the next one is packed
                buffer = bucket.buffer
                flat = meta.zeros(n * bucket.chunk, buffer.dtype, like=buffer)
            for name, start, stop in bucket.entries:
                flat[start:stop] = grads.pop(name).reshape(-1)
            if self.stage == 1:
                mine = flat[rank * bucket.chunk : (rank + 1) * bucket.chunk]
                mine[...] = group.reduce_scatter(flat)
            else:
                mine = group.reduce_scatter(flat, out=bucket.grad_buffer)
            mine *= mine.dtype.type(1.0 / self.divisor)
            for name, _, chunk_range in bucket.pieces:
                shards[name] = mine[chunk_range]
        self.grad_bytes = sum(b.buffer.nbytes for b in self.buckets)
        return shards

    def _all_gather_parameters(self) -> None:
        """Stages 1, 2: every rank's updated chunk of each bucket to every rank."""
        for bucket in self.buckets:
            buffer = bucket.buffer
            mine = meta.zeros(bucket.chunk, buffer.dtype, like=buffer)
            for name, param_range, chunk_range in bucket.pieces:
                mine[chunk_range] = self._flat(name)[param_range]
            whole = bucket.group.all_gather(mine)
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

    def _stores(self) -> list[ShardedStore]:
        """Stage 3's stores: the dense parameters' (over dp × cp), the experts' (over edp)."""
        sharding = self.runtime.sharding
        stores = [sharding.store]
        if sharding.experts is not None and sharding.experts.store is not sharding.store:
            stores.append(sharding.experts.store)
        assert all(isinstance(s, ShardedStore) for s in stores)
        return cast(list[ShardedStore], stores)

    def _store_of(self, name: str) -> ShardedStore:
        """Stage 3: the store holding parameter `name`'s chunk."""
        leaf = self.params[name]
        return next(store for store in self._stores() if leaf in store._by_leaf)

    def _whole_state_sharded(self) -> tuple[dict[str, np.ndarray], ...]:
        """Stage 3: every chunk (parameters, optimizer state, masters) in one all-gather per
        store."""
        state = self.optimizer.state_dict()
        store_of = {name: self._store_of(name) for name in self.params}
        shard_of = {name: store_of[name]._by_leaf[p] for name, p in self.params.items()}
        items = [(f"param/{name}", name, p.data) for name, p in self.params.items()]
        for key, value in state.items():
            if key != "step":
                items.append((f"optim/{key}", key.partition(".")[2], value))
        items += [(f"master/{n}", n, a) for n, a in self._masters().items()]
        out: dict[str, dict[str, np.ndarray]] = {"param": {}, "optim": {"step": state["step"]}}
        out["master"] = {}
        for store in self._stores():
            mine_items = [
                (key, shard_of[name], a) for key, name, a in items if store_of[name] is store
            ]
            if not mine_items:
                continue
            n = store.group.size
            width = sum(s.chunk for _, s, _ in mine_items)
            mine = np.concatenate([np.ravel(a) for _, _, a in mine_items])
            blocks = store.group.all_gather(mine).reshape(n, width)  # row r: rank r's chunks
            offset = 0
            for key, s, _ in mine_items:
                whole = blocks[:, offset : offset + s.chunk].reshape(-1)[: s.size]
                kind, _, rest = key.partition("/")
                out[kind][rest] = whole.reshape(s.shape)
                offset += s.chunk
        return out["param"], out["optim"], out["master"]

    def _whole_state_buckets(self) -> tuple[dict[str, np.ndarray], ...]:
        """Stages 1, 2: the parameters are already whole; each bucket's optimizer state (and
        masters, as one more kind) is packed as every kind's chunk side by side and all-gathered
        once."""
        state = self.optimizer.state_dict()
        state.update({f"{MASTER}.{n}": a for n, a in self._masters().items()})
        kinds = self._state_kinds + ([MASTER] if self.masters else [])
        optim = {"step": state["step"]}
        for bucket in self.buckets:
            if not kinds:
                break
            n = bucket.group.size
            buffer = bucket.buffer
            mine = meta.zeros((len(kinds), bucket.chunk), buffer.dtype, like=buffer)
            for name, _, chunk_range in bucket.pieces:
                for k, kind in enumerate(kinds):
                    mine[k, chunk_range] = state[f"{kind}.{name}"]
            blocks = bucket.group.all_gather(mine.reshape(-1)).reshape(n, len(kinds), bucket.chunk)
            for k, kind in enumerate(kinds):
                flat = blocks[:, k, :].reshape(-1)  # the bucket's state of this kind
                for name, start, stop in bucket.entries:
                    optim[f"{kind}.{name}"] = flat[start:stop].reshape(self.params[name].shape)
        params = {name: p.data.copy() for name, p in self.params.items()}
        masters = {k.partition(".")[2]: optim.pop(k) for k in list(optim) if k.startswith(MASTER)}
        return params, optim, masters

    def _shard(self, name: str) -> Any:
        """Stage 3: the store's record of parameter `name` (its whole shape and chunk)."""
        return self._store_of(name)._by_leaf[self.params[name]]

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

        def whole_shape(name: str) -> tuple[int, ...]:
            if self.stage == 3:
                return self._shard(name).shape
            return self.params[name].shape

        def checked(name: str, value: np.ndarray, what: str) -> np.ndarray:
            value, shape = np.asarray(value), whole_shape(name)
            if value.shape != shape:
                raise ValueError(f"{what!r} has shape {value.shape}, the model {shape}")
            return value

        def mine(name: str, value: np.ndarray, what: str) -> np.ndarray:
            flat = checked(name, value, what).reshape(-1)
            if self.stage == 3:
                chunk = self._shard(name).chunk
                group = self._store_of(name).group
                n, rank = group.size, group.rank
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
            buffer = bucket.buffer
            mine = meta.zeros(bucket.chunk, buffer.dtype, like=buffer)
            for name, _, chunk_range in bucket.pieces:
                mine[chunk_range] = grads[name]
            whole = bucket.group.all_gather(mine)
            for name, start, stop in bucket.entries:
                full[name] = whole[start:stop].reshape(self.params[name].shape)
        return {name: full[name] for name in self.params}


def make_update(
    runtime: Runtime,
    params: dict[str, Tensor],
    build_optimizer: BuildOptimizer,
    tied: tuple[str, ...] = (),
    grad_clip: float = 0.0,
    precision: Precision | None = None,
) -> GradientUpdate:
    """The update the runtime's layout asks for: plain data parallelism, or ZeRO's stage."""
    stage = runtime.layout.zero
    if stage == 0:
        return ReplicatedUpdate(runtime, params, build_optimizer, tied, grad_clip, precision)
    return ZeroUpdate(runtime, params, build_optimizer, stage, tied, grad_clip, precision)
