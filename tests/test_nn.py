"""Modules and models: names, layout, initialisation, state dicts, gradients, causality.

GPT must be nanoGPT-compatible by name and PyTorch-compatible by weight layout, so a checkpoint
moves between the two without renaming; its initialisation must depend only on a parameter's
name and the run seed, so that every parallel layout builds the same full weights.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from civetta import Tensor
from civetta.gradcheck import check_tensor_gradients
from civetta.models.gpt import GPT, GPTConfig, MLPModel
from civetta.nn import Linear, Module, StateDictError
from civetta.optim import make_optimizer

TINY = GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=8)


def tiny(**changes: object) -> GPTConfig:
    return GPTConfig(**{**TINY.__dict__, **changes})


def batch(config: GPTConfig, rows: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (rows, config.block_size)
    return rng.integers(0, config.vocab_size, shape), rng.integers(0, config.vocab_size, shape)


def nanogpt_names(n_layer: int, tied: bool = True) -> list[str]:
    """nanoGPT's `named_parameters()` (PyTorch lists a tied lm_head once, as wte)."""
    names = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(n_layer):
        for part in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            names += [f"transformer.h.{i}.{part}.weight", f"transformer.h.{i}.{part}.bias"]
    names += ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    return names if tied else [*names, "lm_head.weight"]


# ---- names and layout -------------------------------------------------------------------------
def test_gpt_parameter_names_are_nanogpt_names() -> None:
    model = GPT(TINY)
    assert [name for name, _ in model.named_parameters()] == nanogpt_names(2)


def test_gpt_weights_use_pytorch_layout() -> None:
    c, v, t = TINY.n_embd, TINY.vocab_size, TINY.block_size
    shapes = {name: p.shape for name, p in GPT(TINY).named_parameters()}
    assert shapes["transformer.wte.weight"] == (v, c)
    assert shapes["transformer.wpe.weight"] == (t, c)
    for i in range(TINY.n_layer):
        block = f"transformer.h.{i}"
        # nn.Linear stores (out_features, in_features).
        assert shapes[f"{block}.attn.c_attn.weight"] == (3 * c, c)
        assert shapes[f"{block}.attn.c_attn.bias"] == (3 * c,)
        assert shapes[f"{block}.attn.c_proj.weight"] == (c, c)
        assert shapes[f"{block}.mlp.c_fc.weight"] == (4 * c, c)
        assert shapes[f"{block}.mlp.c_fc.bias"] == (4 * c,)
        assert shapes[f"{block}.mlp.c_proj.weight"] == (c, 4 * c)
        assert shapes[f"{block}.mlp.c_proj.bias"] == (c,)
        for ln in ("ln_1", "ln_2"):
            assert shapes[f"{block}.{ln}.weight"] == shapes[f"{block}.{ln}.bias"] == (c,)
    assert shapes["transformer.ln_f.weight"] == (c,)


def test_untied_head_is_its_own_parameter() -> None:
    model = GPT(tiny(tie_embeddings=False))
    assert [name for name, _ in model.named_parameters()] == nanogpt_names(2, tied=False)
    head, wte = model.params["lm_head.weight"], model.params["transformer.wte.weight"]
    assert head.shape == wte.shape == (16, 8)
    assert head.data is not wte.data
    assert not np.array_equal(head.data, wte.data)


def test_without_bias_there_are_no_bias_parameters() -> None:
    names = [name for name, _ in GPT(tiny(bias=False)).named_parameters()]
    expected = [n for n in nanogpt_names(2) if not n.endswith(".bias")]
    assert names == expected


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_num_parameters_counts_parameter_elements(tied: bool, bias: bool) -> None:
    config = GPTConfig(
        vocab_size=40, block_size=12, n_layer=3, n_head=2, n_embd=10, tie_embeddings=tied, bias=bias
    )
    model = GPT(config)
    assert config.num_parameters() == sum(p.size for p in model.parameters())


# ---- tied embeddings --------------------------------------------------------------------------
def test_tied_head_is_the_token_embedding() -> None:
    model = GPT(TINY)
    state = model.state_dict()
    assert state["lm_head.weight"] is state["transformer.wte.weight"]
    assert "lm_head.weight" not in model.params
    names = [name for name, _ in model.named_parameters()]
    assert len(names) == len(set(names))
    # No tensor is listed twice either: an optimizer would update it twice per step.
    assert len({id(p) for p in model.parameters()}) == len(names)
    make_optimizer("adamw", model.params, 1e-3)  # refuses a tensor listed under two names


# ---- state dicts ------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
def test_state_dict_round_trip(tied: bool) -> None:
    config = tiny(tie_embeddings=tied)
    idx, _ = batch(config)
    source = GPT(config, seed=0)
    target = GPT(config, seed=1)
    assert not np.array_equal(source.logits(idx).data, target.logits(idx).data)

    target.load_state_dict(source.state_dict())
    np.testing.assert_array_equal(target.logits(idx).data, source.logits(idx).data)
    # Loading copies: the two models do not share buffers afterwards.
    for (name, p), q in zip(source.named_parameters(), target.parameters(), strict=True):
        assert not np.shares_memory(p.data, q.data), name


def test_load_state_dict_names_every_problem() -> None:
    model = GPT(TINY, seed=0)
    before = {name: p.data.copy() for name, p in model.named_parameters()}
    state = dict(GPT(TINY, seed=5).state_dict())
    del state["transformer.wpe.weight"], state["transformer.ln_f.bias"]
    state["transformer.h.9.attn.c_attn.weight"] = np.zeros((24, 8))
    state["extra"] = np.zeros(1)
    state["transformer.h.0.attn.c_attn.weight"] = np.zeros((8, 24))  # transposed layout
    state["transformer.h.1.mlp.c_fc.bias"] = np.zeros(31)

    with pytest.raises(StateDictError) as info:
        model.load_state_dict(state)
    assert str(info.value) == (
        "missing keys: transformer.ln_f.bias, transformer.wpe.weight; "
        "unexpected keys: extra, transformer.h.9.attn.c_attn.weight; "
        "transformer.h.0.attn.c_attn.weight: expected shape (24, 8), got (8, 24); "
        "transformer.h.1.mlp.c_fc.bias: expected shape (32,), got (31,)"
    )
    # Checked before anything is copied: a failed load leaves the model as it was.
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(p.data, before[name], err_msg=name)


@pytest.mark.parametrize(
    ("remove", "add", "message"),
    [
        ("transformer.h.0.ln_1.weight", {}, "missing keys: transformer.h.0.ln_1.weight"),
        (None, {"bogus": np.zeros(2)}, "unexpected keys: bogus"),
        (
            None,
            {"transformer.wte.weight": np.zeros((17, 8))},
            "transformer.wte.weight: expected shape (16, 8), got (17, 8)",
        ),
    ],
    ids=["missing", "unexpected", "mis-shaped"],
)
def test_load_state_dict_single_problem(
    remove: str | None, add: dict[str, np.ndarray], message: str
) -> None:
    model = GPT(TINY)
    state = {**model.state_dict(), **add}
    if remove is not None:
        del state[remove]
    with pytest.raises(StateDictError) as info:
        model.load_state_dict(state)
    assert str(info.value) == message


def test_load_state_dict_reports_a_mis_shaped_tied_head() -> None:
    """`lm_head.weight` is a key of a tied model's state dict, so a wrong shape under it is an
    error like any other (today it is silently ignored)."""
    model = GPT(TINY)
    state = dict(model.state_dict())
    state["lm_head.weight"] = np.zeros((8, 16))
    with pytest.raises(StateDictError, match=r"lm_head\.weight: expected shape \(16, 8\)"):
        model.load_state_dict(state)


# ---- initialisation ---------------------------------------------------------------------------
def test_initialisation_statistics() -> None:
    config = GPTConfig(vocab_size=256, block_size=64, n_layer=3, n_head=4, n_embd=256)
    params = GPT(config, seed=0, dtype=np.float64).params
    proj_std = 0.02 / math.sqrt(2 * config.n_layer)
    for name, p in params.items():
        if name.endswith(".bias"):
            assert np.all(p.data == 0.0), name
        elif ".ln_" in name:
            assert np.all(p.data == 1.0), name
        else:
            std = proj_std if name.endswith("c_proj.weight") else 0.02
            # ≥ 16k draws per tensor: the sample std is within 2% of the true one.
            assert p.data.std() == pytest.approx(std, rel=0.02), name
            assert abs(p.data.mean()) < 4 * std / math.sqrt(p.size), name


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    first, again, other = GPT(TINY, seed=3), GPT(TINY, seed=3), GPT(TINY, seed=4)
    for name, p in first.named_parameters():
        np.testing.assert_array_equal(p.data, again.params[name].data, err_msg=name)
        if name.endswith("weight") and ".ln_" not in name:  # the random ones
            assert not np.array_equal(p.data, other.params[name].data), name


def test_initialisation_depends_only_on_name_and_seed() -> None:
    """The same names get the same values whatever else the model contains."""
    two = GPT(tiny(n_layer=2), seed=7, dtype=np.float64).params
    three = GPT(tiny(n_layer=3), seed=7, dtype=np.float64).params
    untied = GPT(tiny(tie_embeddings=False), seed=7, dtype=np.float64).params
    for name, p in two.items():
        if "c_proj" in name:
            continue
        np.testing.assert_array_equal(p.data, three[name].data, err_msg=name)
        np.testing.assert_array_equal(p.data, untied[name].data, err_msg=name)
    # c_proj's std scales with 1/sqrt(2·n_layer); the underlying draw is the same.
    for name in ("transformer.h.1.attn.c_proj.weight", "transformer.h.0.mlp.c_proj.weight"):
        np.testing.assert_allclose(
            two[name].data * math.sqrt(4), three[name].data * math.sqrt(6), rtol=1e-14
        )
    # A lone Linear of the same name draws the very same matrix.
    alone = Linear("transformer.h.1.mlp.c_fc", 8, 32, seed=7, dtype=np.float64)
    np.testing.assert_array_equal(
        alone.params["transformer.h.1.mlp.c_fc.weight"].data,
        two["transformer.h.1.mlp.c_fc.weight"].data,
    )


def test_float32_weights_are_the_rounded_float64_weights() -> None:
    single, double = GPT(TINY, seed=1).params, GPT(TINY, seed=1, dtype=np.float64).params
    for name, p in single.items():
        assert p.dtype == np.float32, name
        np.testing.assert_array_equal(p.data, double[name].data.astype(np.float32), err_msg=name)


# ---- gradients ---------------------------------------------------------------------------------
def _randomised(config: GPTConfig, seed: int) -> Module:
    """A float64 GPT at a random point with O(1) weights: at the 0.02-std init most gradients
    are ~1e-3 and the check's absolute floor would not notice a wrong one."""
    model = GPT(config, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        p.data[...] = rng.standard_normal(p.shape) * 0.5
    return model


GRAD_CONFIGS = {
    "1-layer-tied": tiny(n_layer=1),
    "2-layer-untied": tiny(tie_embeddings=False),
    "2-layer-nobias": tiny(bias=False),
}


@pytest.mark.parametrize("config", GRAD_CONFIGS.values(), ids=GRAD_CONFIGS.keys())
def test_gpt_gradients_match_finite_differences(config: GPTConfig) -> None:
    """A few seeded random entries of every parameter tensor (a full check takes seconds)."""
    model = _randomised(config, seed=11)
    idx, targets = batch(config, rows=2, seed=12)
    params = model.parameters()
    check_tensor_gradients(lambda: model(idx, targets), params, seed=13, rtol=1e-8, max_elements=4)


@pytest.mark.parametrize("config", GRAD_CONFIGS.values(), ids=GRAD_CONFIGS.keys())
def test_gpt_gradients_along_random_directions(config: GPTConfig) -> None:
    """Complements the sampled check: for each tensor, one central difference along a random
    direction tests ⟨grad, d⟩, which involves every entry of the gradient."""
    model = _randomised(config, seed=21)
    idx, targets = batch(config, rows=2, seed=22)
    loss = model(idx, targets)
    loss.backward()
    rng = np.random.default_rng(23)
    eps = 1e-6
    for name, p in model.named_parameters():
        direction = rng.standard_normal(p.shape)
        original = p.data.copy()
        p.data[...] = original + eps * direction
        plus = model(idx, targets).item()
        p.data[...] = original - eps * direction
        minus = model(idx, targets).item()
        p.data[...] = original
        numeric = (plus - minus) / (2 * eps)
        analytic = float(np.sum(p.grad * direction))
        assert analytic == pytest.approx(numeric, rel=1e-7, abs=1e-9), name


# ---- forward -----------------------------------------------------------------------------------
def test_logits_shape_and_sequence_length_limit() -> None:
    model = GPT(TINY)
    assert model.logits(np.zeros((3, 8), dtype=np.int64)).shape == (3, 8, 16)
    assert model.logits(np.zeros((2, 5), dtype=np.int64)).shape == (2, 5, 16)
    with pytest.raises(ValueError, match="sequence length 9 exceeds block_size=8"):
        model.logits(np.zeros((1, 9), dtype=np.int64))
    loss = model(*batch(TINY))
    assert loss.shape == () and loss.dtype == np.float32
    # At init the logits are nearly uniform: the loss is close to ln(vocab).
    assert loss.item() == pytest.approx(math.log(16), abs=0.1)


@pytest.mark.parametrize("position", [0, 3, 7])
def test_changing_a_future_token_leaves_earlier_logits_unchanged(position: int) -> None:
    model = _randomised(TINY, seed=31)
    idx, _ = batch(TINY, rows=2, seed=32)
    changed = idx.copy()
    changed[:, position] = (idx[:, position] + 1) % TINY.vocab_size
    before, after = model.logits(idx).data, model.logits(changed).data
    np.testing.assert_allclose(after[:, :position], before[:, :position], rtol=0, atol=1e-12)
    assert np.all(np.abs(after[:, position:] - before[:, position:]).max(axis=-1) > 1e-6)


def test_mlp_model_learns_xor() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-1.0, 1.0, (128, 2))
    labels = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).astype(np.int64)  # not linearly separable
    model = MLPModel((2, 32, 2), seed=0, dtype=np.float64)
    assert [name for name, _ in model.named_parameters()] == [
        "layers.0.weight",
        "layers.0.bias",
        "layers.1.weight",
        "layers.1.bias",
    ]
    optimizer = make_optimizer("adamw", model.params, 0.03, weight_decay=0.0)
    losses = []
    for _ in range(150):
        loss = model(x, labels)
        loss.backward()
        optimizer.step()
        model.zero_grad()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(2), abs=0.05)
    assert losses[-1] < 0.1 * losses[0]
    accuracy = np.mean(model.logits(Tensor(x)).data.argmax(axis=-1) == labels)
    assert accuracy > 0.95
