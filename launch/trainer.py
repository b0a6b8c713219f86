"""One training run on one rank: build the model for the layout, step, measure.

The same loop serves every layout. The step is: this rank's slice of the global batch,
microbatches forward and backward (gradients accumulate), one gradient synchronisation, global
grad-norm clipping, the optimizer update outside the graph.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from civetta import Tensor, activation_meter, flop_meter, meta, no_grad
from civetta.data import Dataset, load_dataset, shard_rows
from civetta.fused import attention_kernel
from civetta.models import build_stage
from civetta.models.moe import RoutingLog, aux_loss_weight, recording_routing
from civetta.nn import Model, merge
from civetta.optim import Optimizer, constant_lr, cosine_with_warmup, make_optimizer
from civetta.precision import PRECISIONS, LossScaler, autocast, has_overflow
from launch import checkpoint
from launch.config import ExperimentConfig, model_description
from launch.faults import maybe_fail
from parallel.cost.memory import state_bytes_per_param
from parallel.pipeline import PipelineExecutor, StepTimeline
from parallel.runtime import Runtime
from parallel.schedules import schedule_of
from parallel.update import GradientUpdate, make_update
from parallel.virtual import VirtualComm
from parallel.zero import ShardedStore, model_state_bytes

# train.dtype -> the dtype of the arrays; bf16/fp16 are emulated on float32 arrays.
DTYPES = {"float32": np.float32, "float64": np.float64, "bf16": np.float32, "fp16": np.float32}


@dataclass
class StepRecord:
    step: int
    loss: float
    time_s: float
    lr: float
    grad_norm: float
    flops: int = 0  # matmul FLOPs this rank executed, recomputation included
    skipped: bool = False  # the optimizer did not step: fp16 overflow, or `nonfinite`
    loss_scale: float = 1.0
    nonfinite: bool = False  # train.on_nonfinite=skip skipped this step: loss or norm not finite


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm under train.on_nonfinite=stop; raised on every rank at
    the same step (the loss and the norm are already reduced over the world), before the update.
    `rank`: the lowest rank holding a non-finite gradient or weight (0 when none does)."""

    def __init__(self, message: str, step: int, rank: int) -> None:
        super().__init__(message)
        self.step = step
        self.rank = rank


@dataclass
class RunResult:
    steps: list[StepRecord] = field(default_factory=list)
    val_loss: float | None = None
    memory: dict[str, int] = field(default_factory=dict)
    tokens_per_step: int = 0
    model_flops_per_step: int = 0
    ledger: list[dict[str, Any]] = field(default_factory=list)


def _not_whole_model(*args: Any) -> Any:
    raise RuntimeError("this rank holds only some pipeline stages: run them through the executor")


def lr_schedule(config: ExperimentConfig) -> Callable[[int], float]:
    t = config.train
    if t.lr_schedule == "cosine":
        return cosine_with_warmup(t.lr, t.warmup_steps, t.steps, min_lr=0.1 * t.lr)
    return constant_lr(t.lr)


class DataFreeBatches:
    """A data-free trainer's dataset: token ids of the batch's shape, without values."""

    def batch(
        self, split: str, seed: int, step: int, batch_size: int, block_size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        shape = (batch_size, block_size)
        # `meta.asarray`: the MetaArrays, typed as the arrays they stand for.
        return meta.asarray(meta.token_ids(shape)), meta.asarray(meta.token_ids(shape))


class Trainer:
    """Owns the model stages, the update and the data of one rank. The runtime carries the
    layout, which must be the config's (default: `Runtime(config.layout)` in this MPI world).
    `model`: the model description, of any family registered in `civetta.models.STAGES`
    (default: the config's GPT)."""

    def __init__(
        self,
        config: ExperimentConfig,
        runtime: Runtime | None = None,
        data_free: bool = False,
        model: Any = None,
    ) -> None:
        self.config = config
        runtime = Runtime(config.layout) if runtime is None else runtime
        self.runtime = runtime
        # Losses and norms that mean nothing: data-free ones are NaN by construction, and a
        # virtual mesh (`parallel.virtual`) sends nothing, so some ranks see no loss at all.
        self.guard_nonfinite = not data_free and not isinstance(runtime.mesh.comm, VirtualComm)
        self.dtype = DTYPES[config.train.dtype]
        # Data-free (`civetta.meta`): parameters and batches have shapes and no values, so a step
        # records what an executed one records without its memory or arithmetic (the cost model
        # runs it on a virtual mesh, `parallel.virtual`); losses and norms are NaN.
        self.dataset: Dataset | DataFreeBatches = DataFreeBatches()
        if not data_free:
            self.dataset = load_dataset(
                config.data.source, config.data.seed, block_size=config.model.block_size
            )
        p, model_config = runtime.layout, model or model_description(config)
        assert p == config.layout, "build the Runtime with config.layout"
        self.schedule = schedule_of(p)  # checked: complete and deadlock-free
        num_stages = self.schedule.num_stages
        layers = p.stage_layers(model_config.n_layer)
        self.stages: dict[int, Model] = {}
        with meta.data_free(data_free):  # nothing drawn: parameters are MetaArrays
            for s in range(num_stages):
                if self.schedule.stage_rank(s) != runtime.pp_rank:
                    continue
                extra: dict[str, Any] = {}
                tied = model_config.tied_weights
                if s == num_stages - 1 and s > 0 and 0 in self.stages and tied:
                    # The first stage is on this rank too (a V): the head reuses its table.
                    extra["tied_table"] = self.stages[0].params[tied[0]]
                self.stages[s] = build_stage(
                    model_config,
                    layers[s],
                    first=s == 0,
                    last=s == num_stages - 1,
                    seed=config.train.seed,
                    dtype=self.dtype,
                    sharding=runtime.sharding,
                    recompute=p.recompute,
                    **extra,
                )
        # All of this rank's parameters, by their whole-model names.
        self.model = Model(
            self.stages[0].forward if num_stages == 1 else _not_whole_model,
            merge(*self.stages.values()),
            {a: t for stage in self.stages.values() for a, t in stage.aliases.items()},
            config=model_config,
        )
        block = config.model.block_size // p.cp  # context parallelism: this rank's chunks
        if runtime.sequence_parallel:
            block //= p.tp
        self.executor = PipelineExecutor(
            self.schedule,
            self.stages,
            runtime.pp_group,
            (p.microbatch_size, block, config.model.n_embd),
            self.dtype,
        )
        # Mixed precision: the update keeps float32 masters, the model holds their rounding.
        self.precision = PRECISIONS.get(config.train.dtype)
        if self.precision:  # the ledger counts the bytes a GPU would send (parallel.comm)
            runtime.ledger.float32_itemsize = self.precision.itemsize
        self.loss_scaler = None
        if config.train.dtype == "fp16":
            self.loss_scaler = LossScaler(config.train.loss_scale, config.train.loss_scale_window)
        self.tied: tuple[str, ...] = model_config.tied_weights

        def build_optimizer(params: dict[str, Tensor]) -> Optimizer:
            t = config.train
            return make_optimizer(t.optimizer, params, t.lr, weight_decay=t.weight_decay)

        # Plain data parallelism or ZeRO, as the layout says (`parallel.update`).
        self.update: GradientUpdate = make_update(
            runtime,
            self.model.params,
            build_optimizer,
            self.tied,
            config.train.grad_clip,
            self.precision,
        )
        if config.train.init_from and not data_free:  # the weights of a Hugging Face checkpoint
            checkpoint.init_from_hf(self, Path(config.train.init_from))
        self.lr_schedule = lr_schedule(config)
        self.timelines: list[StepTimeline] = []
        self.routing = RoutingLog()  # MoE layers' routing over the training steps, this rank

    def _microbatches(self, split: str, step: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """This DP rank's rows of the global batch, cut into microbatches."""
        c, rt = self.config, self.runtime
        x, y = self.dataset.batch(split, c.data.seed, step, c.train.batch_size, c.model.block_size)
        x, y = shard_rows(x, rt.dp_rank, rt.dp_size), shard_rows(y, rt.dp_rank, rt.dp_size)
        context = rt.sharding.context
        if context is not None:  # context parallelism: this rank's chunks of every sequence
            x, y = context.local_tokens(x), context.local_tokens(y)
        count = len(x) // c.microbatch_size
        return [shard_rows(x, i, count) for i in range(count)], [
            shard_rows(y, i, count) for i in range(count)
        ]

    # ---- one step -----------------------------------------------------------------------------
    def step(self, step: int) -> StepRecord:
        rt = self.runtime
        started = time.perf_counter()
        flop_meter.reset()
        inputs, targets = self._microbatches("train", step)
        # Each microbatch's mean loss weighs 1/count: the sum is the mean over the rank's rows.
        # MoE load-balancing terms get the same weight in the backward (`aux_loss_weight`).
        scale = self.loss_scaler.scale if self.loss_scaler else 1.0
        weight = scale / len(inputs)
        kernel = attention_kernel(self.config.framework.attention or "eager")
        routing_log = recording_routing()
        with autocast(self.precision), kernel, routing_log as routing, aux_loss_weight(weight):
            losses, timeline = self.executor.run(inputs, targets, weight)
        self.routing.merge(routing)
        self.timelines.append(timeline)
        lr = self.lr_schedule(step)
        mean_loss = rt.mean_loss(losses)  # before the update: a non-finite loss stops it
        nonfinite = False

        def guard(grad_norm: float) -> bool:
            nonlocal nonfinite
            nonfinite = not (math.isfinite(mean_loss) and math.isfinite(grad_norm))
            if nonfinite and self.config.train.on_nonfinite == "stop":
                raise self._nonfinite_error(step, mean_loss, grad_norm)
            return not nonfinite

        with rt.ledger.phase("optimizer"):
            unscale = self._unscale if self.loss_scaler else None
            checked = guard if self.guard_nonfinite else None
            grad_norm, take_step = self.update.step(lr, unscale, checked)
        self.model.zero_grad()
        elapsed = time.perf_counter() - started
        return StepRecord(
            step,
            mean_loss,
            elapsed,
            lr,
            grad_norm,
            flop_meter.total,
            not take_step,
            scale,
            nonfinite,
        )

    def _nonfinite_error(self, step: int, loss: float, grad_norm: float) -> NonFiniteError:
        """The error for a non-finite step, naming the first non-finite parameter: in model order
        on the lowest rank that holds one. Collective over the world (every rank raises), only
        after detection, and not recorded in the ledger: stopping is not training."""
        world = self.runtime.mesh.world
        grads = self.update.last_grads
        label = ""
        for name in self.model.params:
            if name in grads and not np.isfinite(grads[name]).all():
                label = f"{name} (gradient)"
                break
        else:
            for name, p in self.model.params.items():
                if not np.isfinite(p.data).all():
                    label = f"{name} (weights)"
                    break
        width = 256
        mine = np.zeros(width, dtype=np.uint8)
        encoded = label.encode()[:width]
        mine[: len(encoded)] = np.frombuffer(encoded, dtype=np.uint8)
        with self.runtime.ledger.paused():
            rows = world.all_gather(mine).reshape(world.size, width)
        found = [r for r in range(world.size) if rows[r].any()]
        rank = found[0] if found else 0
        first = rows[rank].tobytes().rstrip(b"\0").decode(errors="replace")
        where = f"first non-finite parameter: {first} on rank {rank}"
        if not found:
            where = "no gradient or weight is non-finite on any rank"
        return NonFiniteError(
            f"step {step}: loss {loss:g}, gradient norm {grad_norm:g}; {where} "
            "(train.on_nonfinite: stop; 'skip' skips such steps)",
            step,
            rank,
        )

    def _unscale(self, grads: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], bool]:
        """fp16: divide out the loss scale, unless some rank's gradients overflowed (then the
        step is skipped and the scale lowered)."""
        scaler = self.loss_scaler
        assert scaler is not None
        used = scaler.scale
        overflow = np.array([float(has_overflow(list(grads.values())))])
        overflow = self.runtime.mesh.world.all_reduce(overflow, op="max")
        if not scaler.update(bool(overflow[0])):
            return grads, False
        inverse = 1.0 / used
        return {name: g * g.dtype.type(inverse) for name, g in grads.items()}, True

    def evaluate(self) -> float:
        """Mean validation loss over `train.eval_batches` fixed batches."""
        losses = []
        with no_grad(), attention_kernel(self.config.framework.attention or "eager"):
            for i in range(self.config.train.eval_batches):
                inputs, targets = self._microbatches("val", i)
                losses.extend(self.executor.forward_only(inputs, targets))
        return self.runtime.mean_loss(losses)

    def memory(self) -> dict[str, int]:
        """Bytes this rank holds, measured from the buffers that exist; with bf16/fp16, weights
        and gradients count in the simulated dtype and the float32 masters as optimizer state
        (mixed-precision Adam: 2 + 2 + 12 bytes per parameter)."""
        params = sum(p.data.nbytes for p in self.model.params.values())
        update = self.update
        grads, optimizer = update.grad_bytes, update.optimizer.state_bytes()
        if self.precision is not None and update.masters is not None:
            shrink = self.precision.itemsize / np.dtype(self.dtype).itemsize
            params, grads = int(params * shrink), int(grads * shrink)
            optimizer += update.masters.nbytes()
        store = self.runtime.sharding.store
        return {
            "params": params,
            "grads": grads,
            "optimizer": optimizer,
            "activations_peak": activation_meter.peak,
            # ZeRO-3's working set: the most bytes of whole parameters gathered at once.
            "params_gathered_peak": store.gathered_peak if isinstance(store, ShardedStore) else 0,
        }

    def memory_closed_form(self) -> dict[str, int]:
        """What `memory()` must report for params, grads and optimizer, in closed form: the
        dense parameters sharded over dp × cp, a MoE's experts over their edp group."""
        c, rt = self.config, self.runtime
        experts = rt.expert_names
        expert_store = rt.sharding.experts.store if rt.sharding.experts is not None else None
        total: dict[str, int] = {}
        for group, store, expert in (
            (rt.dp_group, rt.sharding.store, False),
            (rt.edp_group, expert_store, True),
        ):
            names = [name for name in self.model.params if (name in experts) == expert]
            if not names:
                continue
            if isinstance(store, ShardedStore):
                whole = store.whole_sizes()  # the params are this rank's chunks
                sizes = [whole[name] for name in names]
            else:
                sizes = [self.model.params[name].size for name in names]
            part = model_state_bytes(
                sizes,
                stage=rt.layout.zero,
                dp=group.size,
                rank=group.rank,
                per_element=state_bytes_per_param(c.train.dtype, c.train.optimizer),
                itemsize=np.dtype(self.dtype).itemsize,
                bucket_mb=rt.layout.bucket_mb,
            )
            for key, value in part.items():
                total[key] = total.get(key, 0) + value
        return total

    def run(
        self, on_step: Callable[[StepRecord], Any] | None = None, start_step: int = 0
    ) -> RunResult:
        """Steps `start_step` .. train.steps-1 (a resumed run starts after its checkpoint),
        then the validation loss."""
        tokens = self.config.train.batch_size * self.config.model.block_size
        result = RunResult(
            tokens_per_step=tokens,
            model_flops_per_step=self.model.config.flops_per_token() * tokens,
        )
        activation_meter.reset_peak()
        for step in range(start_step, self.config.train.steps):
            maybe_fail(self.runtime.rank, step)
            record = self.step(step)
            result.steps.append(record)
            if on_step is not None:
                on_step(record)
        result.memory = self.memory()
        # The ledger of the training steps alone: the validation pass below is not training.
        result.ledger = self.runtime.ledger.as_list()
        result.val_loss = self.evaluate()
        return result
