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
from typing import Any

import numpy as np

from civetta import activation_meter, no_grad
from civetta.data import Dataset, load_dataset, shard_rows
from civetta.models.gpt import GPT, GPTConfig
from civetta.nn import Module
from civetta.optim import (
    Optimizer,
    clip_coefficient,
    constant_lr,
    cosine_with_warmup,
    make_optimizer,
)
from launch.config import ExperimentConfig
from launch.faults import maybe_fail
from parallel.runtime import Runtime

DTYPES = {"float32": np.float32, "float64": np.float64}


@dataclass
class StepRecord:
    step: int
    loss: float
    time_s: float
    lr: float
    grad_norm: float


@dataclass
class RunResult:
    steps: list[StepRecord] = field(default_factory=list)
    val_loss: float | None = None
    memory: dict[str, int] = field(default_factory=dict)
    tokens_per_step: int = 0


def gpt_config(config: ExperimentConfig) -> GPTConfig:
    m = config.model
    return GPTConfig(
        vocab_size=m.vocab_size,
        block_size=m.block_size,
        n_layer=m.n_layer,
        n_head=m.n_head,
        n_embd=m.n_embd,
        tie_embeddings=m.tie_embeddings,
        bias=m.bias,
    )


def lr_schedule(config: ExperimentConfig) -> Callable[[int], float]:
    t = config.train
    if t.lr_schedule == "cosine":
        return cosine_with_warmup(t.lr, t.warmup_steps, t.steps, min_lr=0.1 * t.lr)
    return constant_lr(t.lr)


class Trainer:
    """Owns the model shard, the optimizer and the data of one rank."""

    def __init__(self, config: ExperimentConfig, runtime: Runtime) -> None:
        self.config = config
        self.runtime = runtime
        self.dtype = DTYPES[config.train.dtype]
        self.dataset: Dataset = load_dataset(
            config.data.source, config.data.seed, block_size=config.model.block_size
        )
        self.model: Module = GPT(
            gpt_config(config), seed=config.train.seed, dtype=self.dtype, layout=runtime.layout
        )
        self.optimizer: Optimizer = make_optimizer(
            config.train.optimizer,
            self.model.params,
            config.train.lr,
            weight_decay=config.train.weight_decay,
        )
        self.schedule = lr_schedule(config)
        self.grad_bytes = 0
        self.last_grads: dict[str, np.ndarray] = {}

    # ---- one step -----------------------------------------------------------------------------
    def step(self, step: int) -> StepRecord:
        c, rt = self.config, self.runtime
        started = time.perf_counter()
        x, y = self.dataset.batch(
            "train", c.data.seed, step, c.train.batch_size, c.model.block_size
        )
        x, y = shard_rows(x, rt.dp_rank, rt.dp_size), shard_rows(y, rt.dp_rank, rt.dp_size)
        micro, count = c.microbatch_size, c.microbatches
        # Each microbatch's mean loss weighs 1/count: the sum is the mean over the rank's rows.
        weight = np.asarray(1.0 / count, dtype=self.dtype)
        local_loss = 0.0
        for i in range(count):
            rows = slice(i * micro, (i + 1) * micro)
            with rt.ledger.phase("forward"):
                loss = self.model(x[rows], y[rows])
            local_loss += float(loss.data)
            with rt.ledger.phase("backward"):
                loss.backward(weight)
            del loss
        grads = {name: p.grad for name, p in self.model.params.items()}
        with rt.ledger.phase("optimizer"):
            grads = rt.synchronize_gradients(grads)
            self.last_grads = grads  # the step's synchronised gradients, before clipping
            grad_norm = math.sqrt(rt.global_grad_sq_norm(grads))
            coef = clip_coefficient(grad_norm, c.train.grad_clip) if c.train.grad_clip else 1.0
            if coef < 1.0:
                grads = {name: g * g.dtype.type(coef) for name, g in grads.items()}
            lr = self.schedule(step)
            self.optimizer.lr = lr
            self.optimizer.step(grads)
            mean_loss = rt.mean_over_data_parallel(local_loss / count)
        self.grad_bytes = sum(g.nbytes for g in grads.values() if g is not None)
        self.model.zero_grad()
        return StepRecord(step, mean_loss, time.perf_counter() - started, lr, grad_norm)

    def evaluate(self) -> float:
        """Mean validation loss over `train.eval_batches` fixed batches."""
        c, rt = self.config, self.runtime
        losses = []
        with no_grad():
            for i in range(c.train.eval_batches):
                x, y = self.dataset.batch(
                    "val", c.data.seed, i, c.train.batch_size, c.model.block_size
                )
                x, y = shard_rows(x, rt.dp_rank, rt.dp_size), shard_rows(y, rt.dp_rank, rt.dp_size)
                losses.append(float(self.model(x, y).data))
        return rt.mean_over_data_parallel(float(np.mean(losses)))

    def memory(self) -> dict[str, int]:
        """Bytes this rank holds, measured from the buffers that exist."""
        params = self.model.params.values()
        return {
            "params": sum(p.data.nbytes for p in params),
            "grads": self.grad_bytes,
            "optimizer": self.optimizer.state_bytes(),
            "activations_peak": activation_meter.peak,
        }

    def run(self, on_step: Callable[[StepRecord], Any] | None = None) -> RunResult:
        result = RunResult(
            tokens_per_step=self.config.train.batch_size * self.config.model.block_size
        )
        activation_meter.reset_peak()
        for step in range(self.config.train.steps):
            maybe_fail(self.runtime.rank, step)
            record = self.step(step)
            result.steps.append(record)
            if on_step is not None:
                on_step(record)
        result.memory = self.memory()
        result.val_loss = self.evaluate()
        return result
