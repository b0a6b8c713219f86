"""The single-process training loop and `civetta train` end to end.

Tiny GPTs on the synthetic corpus (or the standard library's sources) keep every run well under
a second: the loss must fall, one seed must reproduce bit for bit, the memory figures must be the
sizes of the buffers that exist, and microbatching must not change the arithmetic.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from launch.config import ExperimentConfig, load
from launch.trainer import RunResult, Trainer

REPO = Path(__file__).resolve().parent.parent

TINY = [
    "data.source=synthetic",
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=16",
    "train.batch_size=8",
    "train.lr=1.0e-2",
    "train.eval_batches=1",
]


def config(*overrides: str) -> ExperimentConfig:
    return load(None, [*TINY, *overrides])


def train(cfg: ExperimentConfig) -> tuple[Trainer, RunResult]:
    trainer = Trainer(cfg)
    return trainer, trainer.run()


def losses(result: RunResult) -> list[float]:
    return [record.loss for record in result.steps]


@pytest.mark.parametrize("source", ["synthetic", "stdlib"])
def test_loss_decreases(source: str) -> None:
    _, result = train(config(f"data.source={source}", "train.steps=40"))
    curve = losses(result)
    assert len(curve) == 40 and all(math.isfinite(x) for x in curve)
    assert curve[0] == pytest.approx(math.log(256), abs=0.2)  # uniform over bytes at init
    # Averages over a few steps: single batches are noisy.
    assert np.mean(curve[-5:]) < np.mean(curve[:5]) - 1.0
    assert result.val_loss is not None and result.val_loss < curve[0] - 1.0


def test_one_seed_reproduces_bit_for_bit() -> None:
    cfg = config("train.steps=8")
    first_trainer, first = train(cfg)
    second_trainer, second = train(cfg)
    assert losses(first) == losses(second)
    assert [r.grad_norm for r in first.steps] == [r.grad_norm for r in second.steps]
    assert first.val_loss == second.val_loss
    for name, p in first_trainer.model.named_parameters():
        np.testing.assert_array_equal(p.data, second_trainer.model.params[name].data, err_msg=name)


def test_another_seed_gives_another_run() -> None:
    _, first = train(config("train.steps=3"))
    _, other = train(config("train.steps=3", "train.seed=1"))
    assert losses(first) != losses(other)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_memory_figures_are_buffer_sizes(dtype: str) -> None:
    trainer, result = train(config("train.steps=2", f"train.dtype={dtype}"))
    params = sum(p.data.nbytes for p in trainer.model.parameters())
    assert params == trainer.model.config.num_parameters() * np.dtype(dtype).itemsize
    assert result.memory["params"] == params
    assert result.memory["grads"] == params
    assert result.memory["optimizer"] == 2 * params  # AdamW: exp_avg and exp_avg_sq
    assert result.memory["activations_peak"] > 0


def test_microbatching_does_not_change_the_losses() -> None:
    common = ["train.dtype=float64", "train.batch_size=16", "train.steps=4"]
    whole_trainer, whole = train(config(*common))
    split_cfg = config(*common, "train.microbatch_size=4")
    assert split_cfg.microbatches == 4
    split_trainer, split = train(split_cfg)
    np.testing.assert_allclose(losses(split), losses(whole), rtol=0, atol=1e-10)
    for name, p in whole_trainer.model.named_parameters():
        np.testing.assert_allclose(
            split_trainer.model.params[name].data, p.data, rtol=0, atol=1e-10, err_msg=name
        )


def civetta_command() -> list[str]:
    """The installed `civetta` script when it sits beside this Python, else `python -m launch`."""
    script = Path(sys.executable).parent / "civetta"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "launch"]


def test_civetta_train_writes_metrics(tmp_path: Path) -> None:
    overrides = ["train.steps=3", "train.batch_size=4"]
    (tmp_path / "tiny.yaml").write_text(
        "model: {n_layer: 1, n_head: 2, n_embd: 16, block_size: 8}\n"
        "data: {source: synthetic}\n"
        "train: {steps: 3, batch_size: 4, eval_batches: 1}\n",
        encoding="utf-8",
    )
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI_", "MPI_"))}
    completed = subprocess.run(
        [*civetta_command(), "train", "tiny.yaml", "--out", str(out)],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))

    assert {"config", "world_size", "layout", "steps", "memory", "comm", "pipeline"} <= set(metrics)
    assert metrics["world_size"] == 1
    assert metrics["config"]["model"]["n_embd"] == 16
    assert metrics["config"]["train"]["steps"] == 3
    assert metrics["config"]["parallel"]["dp"] == 1  # resolved: defaults filled in
    assert {"dp", "tp", "pp", "schedule", "zero"} <= set(metrics["layout"])
    assert [s["step"] for s in metrics["steps"]] == [0, 1, 2]
    for record in metrics["steps"]:
        assert {"step", "loss", "time_s"} <= set(record)
        assert math.isfinite(record["loss"]) and record["time_s"] > 0
    [memory] = metrics["memory"]["per_rank"]
    assert set(memory) >= {"rank", "params", "grads", "optimizer", "activations_peak"}
    assert memory["rank"] == 0 and memory["optimizer"] == 2 * memory["params"] > 0
    [comm] = metrics["comm"]["per_rank"]
    assert comm["rank"] == 0 and isinstance(comm["ops"], list)
    assert {"schedule", "bubble_fraction"} <= set(metrics["pipeline"])

    # The command line runs the same arithmetic as the trainer in this process, bit for bit.
    cfg = load(
        None,
        [
            "data.source=synthetic",
            "model.n_layer=1",
            "model.n_head=2",
            "model.n_embd=16",
            "model.block_size=8",
            "train.eval_batches=1",
            *overrides,
        ],
    )
    _, result = train(cfg)
    assert [s["loss"] for s in metrics["steps"]] == losses(result)
