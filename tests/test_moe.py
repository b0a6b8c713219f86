"""The mixture-of-experts block (`civetta.models.moe`) on its own: routing, capacity dropping
against a hand-computed case, the load-balancing loss against its closed form, the counts,
the config section, training through the trainer and a data-free step."""

from __future__ import annotations

import math

import numpy as np
import pytest

from civetta import meta
from civetta.meta import MetaArray
from civetta.models import Llama, LlamaConfig
from civetta.models.moe import (
    MoEConfig,
    SparseMoE,
    aux_loss_weight,
    recording_routing,
    route,
    top_k_experts,
)
from civetta.nn import DENSE
from civetta.tensor import Tensor
from launch.config import ConfigError, load
from launch.trainer import Trainer


def block(moe: MoEConfig, n_embd: int = 4) -> object:
    return SparseMoE("moe", n_embd, moe, seed=0, dtype=np.float64, sharding=DENSE)


def test_ties_go_to_the_lowest_expert_index() -> None:
    probs = np.array([[0.25, 0.25, 0.25, 0.25], [0.1, 0.4, 0.1, 0.4]])
    assert top_k_experts(probs, 2).tolist() == [[0, 1], [1, 3]]


def test_capacity_drops_the_latest_tokens_of_a_full_expert() -> None:
    # 4 tokens, top-1, 2 experts, factor 1: capacity ceil(4 · 1 · 1 / 2) = 2. Tokens 0, 1, 3
    # pick expert 0: token 3 is its third and is dropped; token 2 goes to expert 1.
    routing = route(np.array([[0], [0], [1], [0]]), experts=2, capacity=2)
    assert [m.tolist() for m in routing.members] == [[0, 1], [2]]
    assert routing.position.ravel().tolist() == [0, 1, 2, 3]  # 3: the zero row after 3 kept
    assert routing.counts.tolist() == [3, 1]


def test_capacity_factor_output_matches_a_hand_computed_reference() -> None:
    """A top-2 block of 3 experts on 5 tokens, capacity ceil(5·2·0.6/3) = 2: the output is
    Σ over kept slots of weight · expert(x), computed here with numpy slot by slot."""
    moe = MoEConfig(experts=3, top_k=2, ffn_hidden=6, capacity_factor=0.6)
    assert moe.capacity(5) == 2
    module = block(moe)
    rng = np.random.default_rng(0)
    for p in module.params.values():
        p.data[...] = rng.normal(0, 1, p.shape)
    x = rng.normal(0, 1, (1, 5, 4))
    y = module(Tensor(x)).data.reshape(5, 4)

    w = {n.removeprefix("moe."): p.data for n, p in module.params.items()}
    flat = x.reshape(5, 4)
    logits = flat @ w["gate.weight"].T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected, used, dropped = np.zeros((5, 4)), [0, 0, 0], 0
    for t in range(5):  # token order: the first two slots of each expert are kept
        top = np.argsort(-probs[t], kind="stable")[:2]
        weights = probs[t, top] / probs[t, top].sum()
        for e, weight in zip(top, weights, strict=True):
            if used[e] == 2:
                dropped += 1
                continue
            used[e] += 1
            g, u = flat[t] @ w[f"experts.{e}.w1.weight"].T, flat[t] @ w[f"experts.{e}.w3.weight"].T
            expected[t] += weight * ((g / (1 + np.exp(-g)) * u) @ w[f"experts.{e}.w2.weight"].T)
    assert dropped > 0  # the case drops something
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


def test_dropless_equals_a_large_capacity() -> None:
    x = Tensor(np.random.default_rng(1).normal(0, 1, (2, 6, 4)))
    dropless = block(MoEConfig(experts=4, top_k=2, ffn_hidden=8))(x).data
    roomy = block(MoEConfig(experts=4, top_k=2, ffn_hidden=8, capacity_factor=4.0))(x).data
    np.testing.assert_array_equal(dropless, roomy)


def test_aux_loss_equals_the_closed_form() -> None:
    moe = MoEConfig(experts=4, top_k=2, ffn_hidden=8, aux_loss_coef=0.5)
    module = block(moe)
    rng = np.random.default_rng(2)
    module.params["moe.gate.weight"].data[...] = rng.normal(0, 1, (4, 4))
    x = rng.normal(0, 1, (3, 5, 4))
    with recording_routing() as log:
        module(Tensor(x))
    logits = x.reshape(15, 4) @ module.params["moe.gate.weight"].data.T
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    chosen = np.argsort(-probs, axis=-1, kind="stable")[:, :2]
    f = np.bincount(chosen.ravel(), minlength=4) / (15 * 2)  # fraction of routed slots
    closed = 4 * np.sum(f * probs.mean(0))
    assert log.aux["moe"] == [pytest.approx(closed, rel=1e-12)]  # unweighted


def test_aux_loss_is_one_when_routing_is_uniform() -> None:
    """A zero router: every probability 1/E and (ties to the lowest index) every slot at
    experts 0..k-1, so f = (1/k, ..., 0) and aux = E · Σ f_e / E = 1."""
    module = block(MoEConfig(experts=4, top_k=2, ffn_hidden=8, aux_loss_coef=1.0))
    module.params["moe.gate.weight"].data[...] = 0
    with recording_routing() as log:
        module(Tensor(np.ones((2, 3, 4))))
    assert log.aux["moe"] == [pytest.approx(1.0, rel=1e-14)]


def test_the_aux_term_trains_the_router_as_if_added_to_the_loss() -> None:
    """The aux term rides on the layer's output (`attach_aux_loss`): the loss value is the LM
    loss alone, and the gradients are those of loss + coef · Σ aux, which the same model with
    the terms added explicitly gives (the aux weight follows `aux_loss_weight`)."""
    moe = MoEConfig(experts=4, top_k=2, ffn_hidden=8, aux_loss_coef=0.1)
    c = LlamaConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16, moe=moe)
    idx = np.random.default_rng(3).integers(0, 32, (2, 8))
    plain = LlamaConfig(**{**c.__dict__, "moe": MoEConfig(experts=4, top_k=2, ffn_hidden=8)})
    with_aux, without = Llama(c, dtype=np.float64), Llama(plain, dtype=np.float64)
    with recording_routing() as log:
        loss = with_aux(idx, idx)
    assert float(loss.data) == float(without(idx, idx).data)
    assert len(log.aux) == 2 and all(0.0 < v[0] <= 4 for v in log.aux.values())
    with aux_loss_weight(2.0):  # the seed of the backward: aux gets the same weight
        loss.backward(np.asarray(2.0))
    router = with_aux.params["model.layers.0.block_sparse_moe.gate.weight"].grad
    reference = Llama(plain, dtype=np.float64)
    _explicit_aux_loss(reference, idx, 0.1).backward(np.asarray(2.0))
    expected = reference.params["model.layers.0.block_sparse_moe.gate.weight"].grad
    assert router is not None and expected is not None
    np.testing.assert_allclose(router, expected, rtol=1e-12, atol=1e-16)
    assert np.abs(router).max() > 0


def _explicit_aux_loss(model: object, idx: np.ndarray, coef: float) -> Tensor:
    """loss + coef · Σ_layers aux, with aux written out from each layer's router (no attach)."""
    from civetta import axioms as ax
    from civetta import fused
    from civetta.models.moe import load_balancing_loss, route, top_k_experts

    hidden_inputs: list[Tensor] = []
    original = fused.softmax

    def spy(x: Tensor, *args: object, **kw: object) -> Tensor:
        out = original(x, *args, **kw)
        if x.shape[-1] == 4:  # the routers' logits (E = 4); attention scores are wider
            hidden_inputs.append(out)
        return out

    fused.softmax = spy
    try:
        loss = model(idx, idx)
    finally:
        fused.softmax = original
    moe = MoEConfig(experts=4, top_k=2, ffn_hidden=8)
    for probs in hidden_inputs:
        counts = route(top_k_experts(probs.data, 2), 4, None).counts
        loss = ax.add(loss, ax.mul(load_balancing_loss(probs, counts, moe), coef))
    return loss


def test_counts_are_the_active_parameters() -> None:
    moe = MoEConfig(experts=8, top_k=2, ffn_hidden=24)
    c = LlamaConfig(vocab_size=64, block_size=8, n_layer=2, n_head=4, n_embd=32, moe=moe)
    model = Llama(c, dtype=np.float32)
    assert c.num_parameters() == sum(p.data.size for p in model.params.values())
    dense = LlamaConfig(**{**c.__dict__, "moe": None, "ffn_hidden": 24})
    # A token meets top_k experts' matrices and the router: 2 · (3·32·24) + 32·8 per layer.
    extra = 2 * 6 * (2 * 3 * 32 * 24 + 32 * 8 - 3 * 32 * 24)
    assert c.flops_per_token() == dense.flops_per_token() + extra


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"experts": 4, "top_k": 5, "ffn_hidden": 8}, "top_k=5"),
        ({"experts": 4, "top_k": 0, "ffn_hidden": 8}, "top_k=0"),
        ({"experts": 4, "top_k": 1, "ffn_hidden": 8, "capacity_factor": 0.0}, "capacity"),
        ({"experts": 4, "top_k": 1, "ffn_hidden": 8, "shared_experts": 1}, "not implemented"),
    ],
)
def test_moe_config_is_validated(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MoEConfig(**kwargs)


MOE = "model.moe={experts: 4, top_k: 2, ffn_hidden: 32, capacity_factor: 1.25, aux_loss_coef: 0.01}"
TINY = [
    "model.kind=llama",
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=16",
    "data.source=synthetic",
    "train.batch_size=8",
    "train.lr=1.0e-2",
    "train.eval_batches=1",
    "train.warmup_steps=0",
]


def test_config_errors_are_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^model.moe is not a key of model.kind=gpt"):
        load(None, ["model.kind=gpt", MOE])
    shared = "model.moe={experts: 4, top_k: 1, ffn_hidden: 8, shared_experts: 2}"
    with pytest.raises(ConfigError, match=r"^model.moe.shared_experts=2: .*not implemented yet$"):
        load(None, ["model.kind=llama", shared])
    with pytest.raises(ConfigError, match=r"^model.moe.top_k=9 must be between 1 and experts=4$"):
        load(None, ["model.kind=llama", "model.moe={experts: 4, top_k: 9, ffn_hidden: 8}"])
    with pytest.raises(ConfigError, match=r"^model.moe.ffn_hidden is missing$"):
        load(None, ["model.kind=llama", "model.moe={experts: 4, top_k: 1}"])


def test_trains_single_process_with_decreasing_loss() -> None:
    config = load(None, [*TINY, MOE, "train.steps=30"])
    assert config.model.moe == MoEConfig(4, 2, 32, capacity_factor=1.25, aux_loss_coef=0.01)
    result = Trainer(config).run()
    curve = [record.loss for record in result.steps]
    assert all(math.isfinite(x) for x in curve)
    assert np.mean(curve[-5:]) < np.mean(curve[:5]) - 0.5


def test_a_data_free_forward_and_backward_runs() -> None:
    moe = MoEConfig(experts=4, top_k=2, ffn_hidden=24, capacity_factor=1.0, aux_loss_coef=0.01)
    c = LlamaConfig(vocab_size=64, block_size=8, n_layer=2, n_head=4, n_embd=32, moe=moe)
    with meta.data_free():
        model = Llama(c, dtype=np.float32)
        loss = model(meta.token_ids((2, 8)), meta.token_ids((2, 8)))
        loss.backward()
    assert isinstance(loss.data, MetaArray) and loss.data.shape == ()
    for name, p in model.params.items():
        assert isinstance(p.grad, MetaArray) and p.grad.shape == p.shape, name


def test_a_data_free_trainer_step_runs() -> None:
    trainer = Trainer(load(None, [*TINY, MOE, "train.steps=2"]), data_free=True)
    trainer.step(0)
    assert all(isinstance(p.data, MetaArray) for p in trainer.model.params.values())
