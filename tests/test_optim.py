"""Optimizers against hand-written references, sharding equivalence, state, clipping, schedules."""

from __future__ import annotations

import io
import itertools
import math

import numpy as np
import pytest

from civetta.optim import (
    SGD,
    AdamW,
    StateDictError,
    clip_coefficient,
    clip_grad_norm,
    constant_lr,
    cosine_with_warmup,
    default_no_decay,
    grad_sq_norm,
    make_optimizer,
)
from civetta.tensor import Tensor


def make_params(dtype: type = np.float64, seed: int = 0) -> dict[str, Tensor]:
    rng = np.random.default_rng(seed)
    shapes = {"h.0.mlp.weight": (4, 3), "h.0.mlp.bias": (3,), "ln_f.weight": (3,)}
    return {
        name: Tensor(rng.standard_normal(shape).astype(dtype), requires_grad=True)
        for name, shape in shapes.items()
    }


def grads_for(params: dict[str, Tensor], step: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, step])
    return {name: rng.standard_normal(p.shape).astype(p.dtype) for name, p in params.items()}


def copy_params(params: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: Tensor(p.data.copy(), requires_grad=True) for name, p in params.items()}


# ---- AdamW ------------------------------------------------------------------------------------
def adamw_reference(p, grads, lr, b1, b2, eps, wd):
    """Algorithm 2 of Loshchilov & Hutter, written out plainly in float64."""
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        p = p - lr * wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


def test_adamw_matches_reference_with_bias_correction_and_decoupled_decay():
    params = make_params()
    start = {name: p.data.copy() for name, p in params.items()}
    lr, betas, eps, wd = 1e-2, (0.8, 0.9), 1e-8, 0.3
    opt = AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    all_grads = [grads_for(params, step) for step in range(4)]
    for grads in all_grads:
        opt.step(grads)
    for name, p in params.items():
        decay = 0.0 if name in ("h.0.mlp.bias", "ln_f.weight") else wd
        expected = adamw_reference(
            start[name], [g[name] for g in all_grads], lr, *betas, eps, decay
        )
        np.testing.assert_allclose(p.data, expected, rtol=1e-12, atol=1e-14)


def test_adamw_first_step_moves_each_entry_by_about_lr():
    # Bias correction makes the first step sign(g) * lr whatever the gradient's scale.
    p = Tensor(np.zeros(5), requires_grad=True)
    g = np.array([1e-3, -2.0, 50.0, -1e-2, 3.0])
    AdamW({"w": p}, lr=0.1, weight_decay=0.0).step({"w": g})
    np.testing.assert_allclose(p.data, -0.1 * np.sign(g), rtol=1e-4)


def test_default_no_decay_names():
    skipped = [
        "h.0.attn.c_attn.bias",
        "transformer.ln_f.weight",
        "transformer.h.1.ln_2.weight",
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "embed.weight",
        "layers.0.norm.weight",
    ]
    decayed = ["transformer.h.0.attn.c_attn.weight", "lm_head.weight", "fc1.weight"]
    assert all(default_no_decay(n) for n in skipped)
    assert not any(default_no_decay(n) for n in decayed)


@pytest.mark.parametrize("make", [lambda ps: AdamW(ps, lr=0.1), lambda ps: SGD(ps, lr=0.1)])
def test_weight_decay_skips_bias_layernorm_and_embeddings(make):
    names = ["fc.weight", "fc.bias", "ln_1.weight", "transformer.wte.weight"]
    params = {n: Tensor(np.ones(3), requires_grad=True) for n in names}
    opt = make(params)
    opt.weight_decay = 0.5
    opt.step({n: np.zeros(3) for n in names})  # zero gradient: only decay can move a weight
    np.testing.assert_allclose(params["fc.weight"].data, 1 - 0.1 * 0.5)
    for name in names[1:]:
        assert np.array_equal(params[name].data, np.ones(3)), name


def test_no_decay_can_be_replaced():
    p = Tensor(np.ones(2), requires_grad=True)
    AdamW({"fc.bias": p}, lr=0.1, weight_decay=0.5, no_decay=lambda n: False).step(
        {"fc.bias": np.zeros(2)}
    )
    np.testing.assert_allclose(p.data, 0.95)


# ---- SGD --------------------------------------------------------------------------------------
def test_sgd_momentum_and_weight_decay_match_reference():
    params = make_params()
    start = params["h.0.mlp.weight"].data.copy()
    lr, mu, wd = 0.05, 0.9, 0.01
    opt = SGD(params, lr=lr, momentum=mu, weight_decay=wd)
    p, buf = start.copy(), np.zeros_like(start)
    for step in range(4):
        grads = grads_for(params, step)
        opt.step(grads)
        d = grads["h.0.mlp.weight"] + wd * p
        buf = mu * buf + d
        p = p - lr * buf
    np.testing.assert_allclose(params["h.0.mlp.weight"].data, p, rtol=1e-12)


def test_plain_sgd_uses_param_grad_and_skips_missing_grads():
    params = make_params()
    before = {name: p.data.copy() for name, p in params.items()}
    params["h.0.mlp.weight"].grad = np.full((4, 3), 2.0)
    opt = SGD(params, lr=0.5)
    opt.step()
    np.testing.assert_array_equal(params["h.0.mlp.weight"].data, before["h.0.mlp.weight"] - 1.0)
    np.testing.assert_array_equal(params["ln_f.weight"].data, before["ln_f.weight"])
    assert opt.state_bytes() == 0


def test_lr_attribute_is_read_at_each_step():
    p = Tensor(np.zeros(1), requires_grad=True)
    opt = SGD({"w": p}, lr=1.0)
    opt.lr = 0.25
    opt.step({"w": np.ones(1)})
    assert p.data[0] == -0.25


# ---- properties shared by both ----------------------------------------------------------------
OPTIMIZERS = {
    "adamw": lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.1),
    "sgd": lambda ps: SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.1),
}


@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize("axis", [0, 1])
def test_update_of_halves_is_bitwise_the_update_of_the_whole(kind, axis):
    rng = np.random.default_rng(3)
    full = rng.standard_normal((6, 8)).astype(np.float32)
    whole = {"w": Tensor(full.copy(), requires_grad=True)}
    halves = {
        f"w{i}": Tensor(np.ascontiguousarray(h), requires_grad=True)
        for i, h in enumerate(np.split(full, 2, axis=axis))
    }
    opt_whole, opt_halves = OPTIMIZERS[kind](whole), OPTIMIZERS[kind](halves)
    for step in range(5):
        g = np.random.default_rng(step).standard_normal((6, 8)).astype(np.float32)
        opt_whole.step({"w": g})
        # Views into g, as a rank would hold them: must not be written to.
        opt_halves.step(dict(zip(halves, np.split(g, 2, axis=axis), strict=True)))
    joined = np.concatenate([halves["w0"].data, halves["w1"].data], axis=axis)
    assert np.array_equal(joined, whole["w"].data)


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_gradients_are_never_written_to(kind):
    params = make_params()
    opt = OPTIMIZERS[kind](params)
    grads = grads_for(params, 0)
    kept = {name: g.copy() for name, g in grads.items()}
    for _ in range(2):
        opt.step(grads)
    for name in grads:
        assert np.array_equal(grads[name], kept[name])


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_float32_params_keep_float32_state(kind):
    params = make_params(np.float32)
    opt = OPTIMIZERS[kind](params)
    opt.step(grads_for(params, 0))
    assert all(p.dtype == np.float32 for p in params.values())
    state = opt.state_dict()
    assert all(a.dtype == np.float32 for key, a in state.items() if key != "step")
    n_buffers = 2 if kind == "adamw" else 1
    assert opt.state_bytes() == n_buffers * sum(p.data.nbytes for p in params.values())


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_state_dict_round_trip_through_npz(kind):
    params = make_params()
    opt = OPTIMIZERS[kind](params)
    for step in range(2):
        opt.step(grads_for(params, step))
    buffer = io.BytesIO()
    np.savez(buffer, **opt.state_dict())
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as npz:
        loaded = dict(npz)

    params_copy = copy_params(params)
    resumed = OPTIMIZERS[kind](params_copy)
    resumed.load_state_dict(loaded)
    assert resumed.step_count == 2
    for step in range(2, 4):
        opt.step(grads_for(params, step))
        resumed.step(grads_for(params, step))
    for name in params:
        assert np.array_equal(params[name].data, params_copy[name].data)


def test_state_dict_keys_are_flat_and_named():
    params = make_params()
    keys = set(AdamW(params, lr=1.0).state_dict())
    assert keys == {"step"} | {f"{k}.{n}" for k in ("exp_avg", "exp_avg_sq") for n in params}
    assert set(SGD(params, lr=1.0, momentum=0.5).state_dict()) == {"step"} | {
        f"momentum.{n}" for n in params
    }


def test_load_state_dict_names_missing_unexpected_and_misshaped_keys():
    opt = AdamW(make_params(), lr=1.0)
    state = opt.state_dict()
    del state["exp_avg.h.0.mlp.bias"]
    state["exp_avg.nope"] = np.zeros(1)
    state["exp_avg_sq.ln_f.weight"] = np.zeros(7)
    with pytest.raises(StateDictError) as info:
        opt.load_state_dict(state)
    message = str(info.value)
    assert "exp_avg.h.0.mlp.bias" in message
    assert "exp_avg.nope" in message
    assert "exp_avg_sq.ln_f.weight" in message


def test_gradient_shape_mismatch_changes_nothing():
    params = make_params()
    before = {name: p.data.copy() for name, p in params.items()}
    grads = grads_for(params, 0)
    grads["ln_f.weight"] = np.zeros(5)
    opt = AdamW(params, lr=1.0)
    with pytest.raises(ValueError, match=r"ln_f\.weight"):
        opt.step(grads)
    assert opt.step_count == 0
    assert all(np.array_equal(p.data, before[n]) for n, p in params.items())


def test_tied_parameter_listed_twice_is_refused():
    p = Tensor(np.zeros(2), requires_grad=True)
    with pytest.raises(ValueError, match="same Tensor"):
        SGD({"wte.weight": p, "lm_head.weight": p}, lr=1.0)


def test_make_optimizer():
    params = make_params()
    adamw = make_optimizer("adamw", params, lr=1e-3, weight_decay=0.2, betas=(0.9, 0.99))
    assert isinstance(adamw, AdamW) and adamw.weight_decay == 0.2 and adamw.betas == (0.9, 0.99)
    assert make_optimizer("adamw", params, lr=1e-3).weight_decay == 0.1
    sgd = make_optimizer("sgd", params, lr=1e-3, momentum=0.9)
    assert isinstance(sgd, SGD) and sgd.momentum == 0.9 and sgd.weight_decay == 0.0
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        make_optimizer("lion", params, lr=1e-3)


# ---- clipping ---------------------------------------------------------------------------------
def test_grad_sq_norm_accumulates_in_float64():
    grads = [np.full(1000, 1e20, dtype=np.float32), np.array([3.0, 4.0], dtype=np.float32)]
    assert grad_sq_norm(grads) == pytest.approx(1000 * 1e40 + 25.0, rel=1e-6)  # > float32 max
    assert grad_sq_norm([np.array([3.0]), None, np.array([4.0])]) == 25.0


def test_clip_coefficient():
    assert clip_coefficient(0.5, 1.0) == 1.0
    assert clip_coefficient(10.0, 1.0) == pytest.approx(0.1)


def test_clip_grad_norm_scales_grads_into_new_arrays():
    a = Tensor(np.zeros(2), requires_grad=True)
    b = Tensor(np.zeros(1), requires_grad=True)
    c = Tensor(np.zeros(1), requires_grad=True)  # no grad: ignored
    shared = np.array([3.0, 0.0])
    a.grad, b.grad = shared, np.array([4.0])
    norm = clip_grad_norm({"a": a, "b": b, "c": c}, max_norm=1.0)
    assert norm == pytest.approx(5.0)
    coef = 1.0 / (5.0 + 1e-6)
    np.testing.assert_allclose(a.grad, [3.0 * coef, 0.0])
    np.testing.assert_allclose(b.grad, [4.0 * coef])
    assert c.grad is None
    assert np.array_equal(shared, [3.0, 0.0])  # the old array is untouched
    # Below the threshold nothing changes.
    assert clip_grad_norm({"a": a, "b": b}, max_norm=10.0) == pytest.approx(1.0)
    np.testing.assert_allclose(b.grad, [4.0 * coef])


# ---- schedules --------------------------------------------------------------------------------
def test_constant_lr():
    schedule = constant_lr(3e-4)
    assert schedule(0) == schedule(10_000) == 3e-4


def test_cosine_with_warmup_values():
    schedule = cosine_with_warmup(1.0, warmup_steps=10, total_steps=110, min_lr=0.1)
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(4) == pytest.approx(0.5)
    assert schedule(9) == pytest.approx(1.0)  # the last warmup step reaches the peak
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.55)  # halfway down the cosine
    assert schedule(110) == pytest.approx(0.1)
    assert schedule(500) == pytest.approx(0.1)
    values = [schedule(s) for s in range(10, 111)]
    assert all(x >= y for x, y in itertools.pairwise(values))


def test_cosine_without_warmup_and_bad_arguments():
    schedule = cosine_with_warmup(2.0, warmup_steps=0, total_steps=4)
    assert [schedule(s) for s in range(5)] == pytest.approx(
        [2.0, 1 + math.cos(math.pi / 4), 1.0, 1 - math.cos(math.pi / 4), 0.0]
    )
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_with_warmup(1.0, warmup_steps=5, total_steps=3)
