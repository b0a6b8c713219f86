"""Pipeline parallelism: what the computation graph cannot express.

The model's layers are cut into `pp · virtual_stages` stages, placed on the pipeline ranks as
the schedule says (by default stage s on rank s mod pp; V-shaped schedules put stages r and 2·pp
− 1 − r on rank r, so consecutive stages at the V's turn share a rank and hand their tensors
over in memory). A schedule (`parallel.schedules`) says, for each rank, in which order to run
the forward (F), backward (B, or its input half I and weight half W) of each microbatch on each
of its stages, and when to send and receive activations and gradients. The executor here runs
that list over MPI with buffer point-to-point calls (sends non-blocking, receives blocking, as
the schedule checker assumes), times every action, and measures how long each rank sat idle."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from civetta import meta
from civetta.nn import Model
from civetta.tensor import Tensor, WeightGradStore, defer_weight_grads
from parallel.comm import Group
from parallel.schedules import Action, Schedule

COMPUTE_KINDS = ("F", "B", "I", "W")
LEDGER_PHASE = {
    "F": "forward",
    "SEND_F": "forward",
    "RECV_F": "forward",
    "B": "backward",
    "I": "backward",
    "W": "backward",
    "SEND_B": "backward",
    "RECV_B": "backward",
}


@dataclass
class ActionTiming:
    action: Action
    start_s: float
    end_s: float


@dataclass
class StepTimeline:
    """What one rank did during one pipeline step, in seconds from the step's common start."""

    timings: list[ActionTiming] = field(default_factory=list)
    window_s: float = 0.0
    peak_in_flight: int = 0
    # The `time.perf_counter()` reading of that start, to place other events (the ledger's
    # call log) on the same clock.
    origin_s: float = 0.0

    @property
    def compute_s(self) -> float:
        return sum(t.end_s - t.start_s for t in self.timings if t.action.kind in COMPUTE_KINDS)

    @property
    def bubble_fraction(self) -> float:
        """Idle share of this rank's step: waiting for peers (and messages) / step time."""
        return 1.0 - self.compute_s / self.window_s if self.window_s > 0 else 0.0


def _loss_value(loss: Tensor) -> float:
    """A microbatch's loss as a float; NaN for a data-free one, which has no value."""
    return float("nan") if meta.is_meta(loss.data) else float(loss.data)


def message_tag(kind: str, microbatch: int, stage: int, schedule: Schedule) -> int:
    """A distinct MPI tag per message: direction, stage and microbatch."""
    direction = 0 if kind.endswith("_F") else 1
    tag = (direction * schedule.num_stages + stage) * schedule.microbatches + microbatch
    assert tag < 32768, "MPI guarantees tags up to 32767"
    return tag


@dataclass
class _StepState:
    """What is in flight during one step, keyed by (microbatch, stage)."""

    inputs: list[np.ndarray]
    targets: list[np.ndarray]
    loss_weight: np.ndarray
    stage_inputs: dict[tuple[int, int], Tensor] = field(default_factory=dict)
    outputs: dict[tuple[int, int], Tensor] = field(default_factory=dict)
    output_grads: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    input_grads: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    weight_stores: dict[tuple[int, int], WeightGradStore] = field(default_factory=dict)
    losses: dict[int, float] = field(default_factory=dict)
    sends: list[Any] = field(default_factory=list)

    @property
    def buffer_like(self) -> np.ndarray:
        """What received buffers are like: real, or data-free when the inputs are."""
        return self.inputs[0]


class PipelineExecutor:
    """Runs one rank's actions of a schedule over the pipeline group.

    `stages` maps the virtual stage indices this rank holds to their modules; the first stage
    takes token ids, the last returns the loss. `activation_shape` is the (micro, T, C) shape of
    what crosses a stage boundary.
    """

    def __init__(
        self,
        schedule: Schedule,
        stages: dict[int, Model],
        group: Group,
        activation_shape: tuple[int, ...],
        dtype: Any,
    ) -> None:
        self.schedule = schedule
        self.stages = stages
        self.group = group
        self.activation_shape = activation_shape
        self.dtype = np.dtype(dtype)
        self.rank = group.rank
        self.actions = schedule.actions[self.rank]
        self.last_stage = schedule.num_stages - 1

    def run(
        self, inputs: list[np.ndarray], targets: list[np.ndarray], loss_weight: float
    ) -> tuple[list[float], StepTimeline]:
        """One step: every microbatch forward and backward; gradients accumulate in `.grad`.

        Returns the losses of the microbatches (on the rank holding the last stage; empty
        elsewhere) and this rank's timeline.
        """
        state = _StepState(inputs, targets, np.asarray(loss_weight, dtype=self.dtype))
        timeline = StepTimeline()
        ledger = self.group.ledger
        self.group.barrier()  # a common start, so idle time is measured from the same instant
        origin = timeline.origin_s = time.perf_counter()
        for action in self.actions:
            start = time.perf_counter()
            with ledger.phase(LEDGER_PHASE[action.kind]):
                self._execute(action, state)
            timeline.peak_in_flight = max(timeline.peak_in_flight, len(state.outputs))
            timeline.timings.append(
                ActionTiming(action, start - origin, time.perf_counter() - origin)
            )
        self.group.wait_all(state.sends)
        timeline.window_s = time.perf_counter() - origin
        assert not state.outputs and not state.weight_stores, "the schedule left work undone"
        return [state.losses[m] for m in sorted(state.losses)], timeline

    def _execute(self, action: Action, state: _StepState) -> None:
        kind, m, s = action.kind, action.microbatch, action.stage
        key = (m, s)
        if kind == "F":
            x = state.inputs[m] if s == 0 else state.stage_inputs[key]
            out = self.stages[s](x, state.targets[m] if s == self.last_stage else None)
            if s == self.last_stage:
                state.losses[m] = _loss_value(out)
            elif s + 1 in self.stages:  # the next stage is here too: hand the output over
                state.stage_inputs[(m, s + 1)] = Tensor(out.data, requires_grad=True)
            state.outputs[key] = out  # in flight until its backward
        elif kind in ("B", "I"):
            out = state.outputs.pop(key)
            grad = state.loss_weight if s == self.last_stage else state.output_grads.pop(key)
            if kind == "I":  # input gradients now, weight gradients at the matching W
                with defer_weight_grads(state.weight_stores.setdefault(key, WeightGradStore())):
                    out.backward(grad)
            else:
                out.backward(grad)
            if s > 0:
                grad_in = state.stage_inputs.pop(key).grad
                assert grad_in is not None, "a stage's input takes part in its loss"
                if s - 1 in self.stages:  # the previous stage is here: no message
                    state.output_grads[(m, s - 1)] = grad_in
                else:
                    state.input_grads[key] = grad_in
        elif kind == "W":
            state.weight_stores.pop(key).apply()
        elif kind == "SEND_F":
            tag = message_tag(kind, m, s, self.schedule)
            dest = self.schedule.stage_rank(s + 1)
            state.sends.append(self.group.isend(state.outputs[key].data, dest, tag))
        elif kind == "RECV_F":
            tag = message_tag("SEND_F", m, s, self.schedule)
            buf = self.group.recv(
                self.activation_shape,
                self.dtype,
                self.schedule.stage_rank(s),
                tag,
                like=state.buffer_like,
            )
            state.stage_inputs[(m, s + 1)] = Tensor(buf, requires_grad=True)
        elif kind == "SEND_B":
            tag = message_tag(kind, m, s, self.schedule)
            dest = self.schedule.stage_rank(s - 1)
            state.sends.append(self.group.isend(state.input_grads.pop(key), dest, tag))
        elif kind == "RECV_B":
            tag = message_tag("SEND_B", m, s, self.schedule)
            state.output_grads[(m, s - 1)] = self.group.recv(
                self.activation_shape,
                self.dtype,
                self.schedule.stage_rank(s),
                tag,
                like=state.buffer_like,
            )
        else:
            raise AssertionError(f"unknown action {action}")

    def forward_only(self, inputs: list[np.ndarray], targets: list[np.ndarray]) -> list[float]:
        """Evaluation: each microbatch through every stage, no graph, no backward."""
        losses = []
        out: Any = None  # the previous stage's output, when that stage is on this rank too
        for m in range(len(inputs)):
            for s in range(self.schedule.num_stages):
                if self.schedule.stage_rank(s) != self.rank:
                    continue
                if s == 0:
                    x: Any = inputs[m]
                elif s - 1 in self.stages:  # handed over in memory
                    x = Tensor(out.data)
                else:
                    source = self.schedule.stage_rank(s - 1)
                    tag = message_tag("SEND_F", m, s - 1, self.schedule)
                    shape, like = self.activation_shape, inputs[m]
                    x = Tensor(self.group.recv(shape, self.dtype, source, tag, like=like))
                out = self.stages[s](x, targets[m] if s == self.last_stage else None)
                if s == self.last_stage:
                    losses.append(_loss_value(out))
                elif s + 1 not in self.stages:
                    tag = message_tag("SEND_F", m, s, self.schedule)
                    self.group.send(out.data, self.schedule.stage_rank(s + 1), tag)
        return losses
