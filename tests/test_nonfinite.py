"""A diverging run (train.on_nonfinite): `stop` ends it at the bad step with one line and no
checkpoint of the bad state, on one process and on several ranks; `skip` leaves the weights as
they were and trains on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from launch import checkpoint
from launch.config import load
from launch.trainer import NonFiniteError, StepRecord, Trainer

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
TINY = [
    "data.source=synthetic",
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=16",
    "train.batch_size=4",
    "train.warmup_steps=0",
    "train.eval_batches=1",
]
POISONED = "transformer.h.0.mlp.c_fc.weight"


def trainer(*overrides: str) -> Trainer:
    return Trainer(load(None, [*TINY, "train.steps=5", *overrides]))


def poison_gradient_at(t: Trainer, bad_step: int) -> None:
    """Make one parameter's gradient inf at `bad_step`, after the backward pass."""
    run, steps = t.executor.run, iter(range(10**6))

    def poisoned_run(*args: Any, **kwargs: Any) -> Any:
        out = run(*args, **kwargs)
        if next(steps) == bad_step:
            grad = t.model.params[POISONED].grad
            assert grad is not None
            grad.reshape(-1)[3] = np.inf
        return out

    t.executor.run = poisoned_run  # type: ignore[method-assign]


def weights(t: Trainer) -> dict[str, np.ndarray]:
    return {name: p.data.copy() for name, p in t.model.params.items()}


ZERO = pytest.mark.parametrize("zero", [0, 1, 3], ids=["replicated", "zero1", "zero3"])


@ZERO
def test_stop_names_the_step_and_first_parameter_before_any_update(zero: int) -> None:
    t = trainer(f"parallel.zero={zero}")
    poison_gradient_at(t, 2)
    seen: dict[int, dict[str, np.ndarray]] = {}

    def on_step(record: StepRecord) -> None:
        seen[record.step] = weights(t)

    with pytest.raises(NonFiniteError) as caught:
        t.run(on_step)
    assert caught.value.step == 2 and caught.value.rank == 0
    message = str(caught.value)
    assert message.startswith("step 2: loss ")
    assert f"first non-finite parameter: {POISONED} (gradient) on rank 0" in message
    assert sorted(seen) == [0, 1]  # the hook (checkpoints) never saw step 2
    for name, w in weights(t).items():  # the optimizer did not touch the bad step
        np.testing.assert_array_equal(w, seen[1][name], err_msg=name)


@ZERO
def test_skip_leaves_the_weights_unchanged_and_trains_on(zero: int) -> None:
    t = trainer("train.on_nonfinite=skip", f"parallel.zero={zero}")
    poison_gradient_at(t, 2)
    seen: dict[int, dict[str, np.ndarray]] = {}
    result = t.run(lambda record: seen.setdefault(record.step, weights(t)))
    assert [r.step for r in result.steps] == [0, 1, 2, 3, 4]
    assert [r.nonfinite for r in result.steps] == [False, False, True, False, False]
    assert [r.skipped for r in result.steps] == [False, False, True, False, False]
    for name in seen[1]:
        np.testing.assert_array_equal(seen[2][name], seen[1][name], err_msg=name)
    assert any(not np.array_equal(seen[3][n], seen[2][n]) for n in seen[2])  # trains on
    assert all(np.isfinite(r.loss) for r in result.steps)


def test_finite_runs_are_unchanged_by_the_option() -> None:
    stop, skip = (
        trainer("train.dtype=float64"),
        trainer("train.dtype=float64", "train.on_nonfinite=skip"),
    )
    stop_losses = [r.loss for r in stop.run().steps]
    assert stop_losses == [r.loss for r in skip.run().steps]


QUICK = [
    "--set", "model.n_layer=1", "--set", "model.n_embd=32", "--set", "model.block_size=16",
    "--set", "train.steps=6", "--set", "train.warmup_steps=0", "--set", "train.batch_size=4",
    "--set", "data.source=synthetic", "--set", "train.eval_batches=1",
    "--set", "train.lr=1e30", "--set", "train.checkpoint_every=1",
]  # fmt: skip


@pytest.mark.parametrize(
    "layout",
    [[], ["parallel.dp=2"], ["parallel.dp=2", "parallel.zero=2"], ["parallel.tp=2"]],
    ids=["one-process", "dp2", "dp2-zero2", "tp2"],
)
def test_civetta_train_stops_a_diverging_run(tmp_path: Path, layout: list[str]) -> None:
    """lr=1e30: step 0 is finite and its update blows the weights up, so step 1 is not."""
    command = [sys.executable, "-m", "launch", "train", str(CONFIG), "--out", str(tmp_path)]
    command += [*QUICK, *(arg for key in layout for arg in ("--set", key))]
    env = {k: v for k, v in os.environ.items() if k != "CIVETTA_FAULT"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "failed: NonFiniteError: step 1: loss nan, gradient norm nan; " in lines[0]
    assert "first non-finite parameter: transformer." in lines[0]
    assert "Traceback" not in result.stderr
    world = 2 if layout else 1
    for rank in range(world):  # every rank stopped at the same step
        status = (tmp_path / "logs" / f"rank{rank}.status").read_text()
        assert status.startswith("failed: NonFiniteError: step 1: "), status
    assert not (tmp_path / "metrics.json").exists()
    root = checkpoint.checkpoint_root(tmp_path)
    assert sorted(p.name for p in root.glob("step*")) == ["step000000"]  # nothing of step 1
    assert checkpoint.verify(root / "step000000") == 0
