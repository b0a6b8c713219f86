"""Mixed precision, emulated: low-precision values at op boundaries, float32 masters,
dynamic loss scaling for float16."""

from __future__ import annotations

from contextlib import nullcontext

import ml_dtypes
import numpy as np
import pytest

from civetta import fused
from civetta.models.gpt import GPT, GPTConfig
from civetta.precision import PRECISIONS, LossScaler, autocast
from civetta.tensor import Tensor, WeightGradStore, defer_weight_grads
from launch.config import load
from launch.trainer import Trainer

QUICK = ["train.steps=60", "train.warmup_steps=6", "train.eval_batches=1"]


def train(*overrides: str) -> Trainer:
    config = load("configs/quickstart.yaml", [*QUICK, *overrides])
    trainer = Trainer(config)
    trainer.records = trainer.run().steps  # type: ignore[attr-defined]
    return trainer


@pytest.fixture(scope="module")
def float32_run() -> Trainer:
    return train()


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_round_matches_the_real_dtype(name: str) -> None:
    policy = PRECISIONS[name]
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 1e3
    low = ml_dtypes.bfloat16 if name == "bf16" else np.float16
    np.testing.assert_array_equal(policy.round(x), x.astype(low).astype(np.float32))
    assert policy.round(np.float64(1.1)) == np.float64(1.1)  # only float32 data is emulated


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_autocast_rounds_outputs_and_gradients(name: str) -> None:
    policy = PRECISIONS[name]
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8))
    idx = np.random.default_rng(1).integers(0, 16, (2, 8))
    with autocast(policy):
        logits = model.logits(idx)
        loss = model(idx, idx)
    loss.backward()
    assert np.array_equal(policy.round(logits.data), logits.data)
    for name_, p in model.params.items():
        if name_ == "transformer.wte.weight":
            continue  # used twice (embedding and tied head): its two parts add up in float32
        assert np.array_equal(policy.round(p.grad), p.grad), name_


def test_deferred_weight_gradients_are_rounded_like_immediate_ones() -> None:
    """Zero-bubble schedules compute weight gradients later, in the weight pass: they are
    rounded then, to the same values an immediate backward gives."""
    policy = PRECISIONS["bf16"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5)).astype(np.float32)
    w = Tensor(rng.standard_normal((3, 5)).astype(np.float32), requires_grad=True)
    b = Tensor(rng.standard_normal(3).astype(np.float32), requires_grad=True)
    immediate = {}
    for deferred in (False, True):
        w.grad = b.grad = None
        store = WeightGradStore()
        with autocast(policy), defer_weight_grads(store) if deferred else nullcontext():
            y = fused.linear(Tensor(x, requires_grad=True), w, b)
            (y * y).sum().backward()
            assert (w.grad is None) == deferred
            store.apply()
        if not deferred:
            immediate = {"w": w.grad.copy(), "b": b.grad.copy()}
    assert np.array_equal(policy.round(w.grad), w.grad)
    np.testing.assert_array_equal(w.grad, immediate["w"])
    np.testing.assert_array_equal(b.grad, immediate["b"])


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_low_precision_trains_like_float32(float32_run: Trainer, name: str) -> None:
    run = train(f"train.dtype={name}")
    final, reference = run.records[-1].loss, float32_run.records[-1].loss
    assert abs(final - reference) / reference < 0.02, (final, reference)
    assert not any(r.skipped for r in run.records)


def test_mixed_precision_adam_holds_2_2_12_bytes_per_parameter() -> None:
    run = train("train.dtype=bf16", "train.steps=1", "train.warmup_steps=0")
    n = run.model.config.num_parameters()
    memory = run.memory()
    assert (memory["params"], memory["grads"], memory["optimizer"]) == (2 * n, 2 * n, 12 * n)


def test_fp16_overflow_skips_the_step_and_lowers_the_scale() -> None:
    run = train(
        "train.dtype=fp16", "train.steps=3", "train.warmup_steps=0", "train.loss_scale=1e30"
    )
    first = run.records[0]
    assert first.skipped and first.loss_scale == 1e30
    assert run.records[1].loss_scale == 5e29
    assert run.loss_scaler.skipped == 3  # 1e30 / 8 still overflows float16
    # Skipped steps leave the weights as they were.
    untouched = Trainer(load("configs/quickstart.yaml", ["train.dtype=fp16"]))
    for name, p in run.model.params.items():
        np.testing.assert_array_equal(p.data, untouched.model.params[name].data, err_msg=name)


def test_loss_scaler_grows_after_a_window_of_good_steps() -> None:
    scaler = LossScaler(initial=8.0, window=2)
    assert scaler.update(False) and scaler.scale == 8.0
    assert scaler.update(False) and scaler.scale == 16.0
    assert not scaler.update(True) and scaler.scale == 8.0
