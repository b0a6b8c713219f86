"""Activation recomputation: the same gradients, fewer live activations, counted extra FLOPs."""

from __future__ import annotations

import numpy as np
import pytest

from civetta import activation_meter, flop_meter
from civetta.models.gpt import GPT, GPTConfig
from civetta.recompute import checkpoint
from civetta.tensor import Tensor

CONFIG = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16)
BATCH = 3


def run(recompute: str) -> tuple[float, dict[str, np.ndarray], int, int, int]:
    """Loss, gradients, peak live activation bytes, forward and total FLOPs of one step."""
    model = GPT(CONFIG, seed=1, dtype=np.float64, recompute=recompute)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, CONFIG.vocab_size, (BATCH, CONFIG.block_size))
    targets = rng.integers(0, CONFIG.vocab_size, (BATCH, CONFIG.block_size))
    activation_meter.reset_peak()
    start_live = activation_meter.live
    flop_meter.reset()
    loss = model(idx, targets)
    forward_flops = flop_meter.forward
    loss.backward()
    grads = {name: p.grad.copy() for name, p in model.params.items()}
    return (
        float(loss.data),
        grads,
        activation_meter.peak - start_live,
        forward_flops,
        (flop_meter.total),
    )


@pytest.fixture(scope="module")
def baseline() -> tuple[float, dict[str, np.ndarray], int, int, int]:
    return run("none")


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_gives_identical_loss_and_gradients(baseline, mode: str) -> None:
    loss, grads, *_ = run(mode)
    assert loss == baseline[0]
    for name, g in baseline[1].items():
        np.testing.assert_array_equal(grads[name], g, err_msg=name)


def test_recompute_lowers_peak_activations(baseline) -> None:
    selective, full = run("selective")[2], run("full")[2]
    assert full < selective < baseline[2]


def model_forward_flops() -> tuple[int, int, int]:
    """Matmul FLOPs of one forward: (blocks' linears, attention core, head)."""
    tokens, c, t = BATCH * CONFIG.block_size, CONFIG.n_embd, CONFIG.block_size
    linears = CONFIG.n_layer * 2 * tokens * (3 * c * c + c * c + 4 * c * c + 4 * c * c)
    attention = CONFIG.n_layer * 2 * 2 * tokens * t * c  # q·kᵀ and p·v over the full T×T
    head = 2 * tokens * c * CONFIG.vocab_size
    return linears, attention, head


def test_flop_meter_counts_model_and_recomputed_work(baseline) -> None:
    linears, attention, head = model_forward_flops()
    forward = linears + attention + head
    assert baseline[3] == forward
    assert baseline[4] == 3 * forward  # backward: one GEMM for each input and weight gradient
    assert run("selective")[4] == 3 * forward + attention
    assert run("full")[4] == 3 * forward + linears + attention


def test_checkpoint_passes_through_without_grad() -> None:
    x = Tensor(np.ones((2, 2)))
    assert checkpoint(lambda t: t * 2.0, x).requires_grad is False
