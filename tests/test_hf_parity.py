"""civetta's Llama and GPT compute what transformers' LlamaForCausalLM and GPT2LMHeadModel do.

Each test builds a civetta model in float64 with random weights of unit scale (so attention is
far from uniform and every parameter matters), converts its weights and description with
`launch.hf.to_hf` (the export's own conversion: the names, GPT-2's transposed Conv1D weights, the
config.json keys), builds the transformers model from that config in float64 with eager
attention, and compares the loss and every parameter's gradient within 1e-9 relative
(norm-wise). civetta's targets are given already shifted and HF's `labels` are shifted inside the
model, so the loss is compared as the cross-entropy of HF's logits against civetta's targets,
computed in torch; one test checks HF's own `labels=` loss on the same pairs.

transformers' Llama computes three steps in float32 even in a float64 model, where civetta
computes in float64: the rotary cos/sin (`LlamaRotaryEmbedding.forward` calls `.float()` on the
positions and frequencies), `LlamaRMSNorm` (it casts its input to float32, an upcast meant for
half precision that is a downcast here), and the eager attention's softmax (`dtype=
torch.float32`). The Llama parity tests replace each with its float64 form, same call signature
and convention: `model.model.rotary_emb` by `Float64Rotary`, every `LlamaRMSNorm` by
`Float64RMSNorm` (holding the same weight parameter), and `eager_attention_forward` by
`float64_eager_attention` (monkeypatched, for the test only). `test_each_float32_step_of_
transformers_llama_costs_under_1e_6` keeps HF's own steps, one at a time and all three, and
measures what each costs: measurably more than float64 rounding, less than 1e-6 of the logits.
GPT2LMHeadModel computes in the model's dtype throughout and is compared unmodified.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama import modeling_llama

from civetta.models import GPT, GPTConfig, Llama, LlamaConfig
from civetta.nn import Model
from launch import hf

TOLERANCE = 1e-9  # relative, norm-wise, float64 against float64
BATCH = 3
FLOAT32_STEPS = ("rope", "rms_norm", "softmax")  # what transformers' Llama computes in float32


# ---- transformers' Llama with its float32 steps in float64 ---------------------------------------
class Float64Rotary(torch.nn.Module):
    """`LlamaRotaryEmbedding` with its angles in float64: forward(x, position_ids) → (cos, sin),
    each (batch, seq, head_dim) in x's dtype, frequency i = θ^(-2i/head_dim) repeated twice."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
        self.register_buffer("inv_freq", theta**-exponents, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        angles = position_ids[..., None].to(torch.float64) * self.inv_freq
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class Float64RMSNorm(torch.nn.Module):
    """`LlamaRMSNorm` without its cast to float32; the same weight parameter, so it keeps its
    name in the state dict and gets the gradient."""

    def __init__(self, norm: torch.nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = norm.variance_epsilon

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        variance = hidden.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon))


def float64_eager_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`modeling_llama.eager_attention_forward` with the softmax in the inputs' dtype."""
    key = modeling_llama.repeat_kv(key, module.num_key_value_groups)
    value = modeling_llama.repeat_kv(value, module.num_key_value_groups)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.softmax(weights, dim=-1)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def in_float64(
    model: torch.nn.Module,
    description: LlamaConfig,
    monkeypatch: pytest.MonkeyPatch,
    keep: Collection[str] = (),
    module: Any = modeling_llama,
) -> torch.nn.Module:
    """`model` with transformers' float32 steps computed in float64, but those in `keep`;
    `module` is the modeling module whose eager attention is patched (Llama's, Mixtral's,
    Qwen3's: the same decoder, whose per-head q/k norms, where it has them, are replaced too)."""
    if "rope" not in keep:
        model.model.rotary_emb = Float64Rotary(description.head_dim, description.rope_theta)
    if "rms_norm" not in keep:
        for layer in model.model.layers:
            layer.input_layernorm = Float64RMSNorm(layer.input_layernorm)
            layer.post_attention_layernorm = Float64RMSNorm(layer.post_attention_layernorm)
            for name in ("q_norm", "k_norm"):
                if hasattr(layer.self_attn, name):
                    setattr(layer.self_attn, name, Float64RMSNorm(getattr(layer.self_attn, name)))
        model.model.norm = Float64RMSNorm(model.model.norm)
    if "softmax" not in keep:
        monkeypatch.setattr(module, "eager_attention_forward", float64_eager_attention)
    return model


# ---- the two sides -----------------------------------------------------------------------------
def hf_model(description: Any, weights: dict[str, np.ndarray]) -> torch.nn.Module:
    """The transformers model of `description` holding `weights` (civetta names), float64."""
    config, tensors = hf.to_hf(description, weights)
    hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    model = model.to(torch.float64)
    state = {name: torch.from_numpy(array.copy()) for name, array in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected
    assert set(missing) <= ({"lm_head.weight"} if description.tie_embeddings else set())
    if description.tie_embeddings:  # the head is the table itself, as the export leaves it
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    return model.eval()


def randomized(model: Model, seed: int) -> Model:
    """Weights of unit scale: 1/√fan-in for matrices, 0.5 for embeddings, norms' scales and
    biases spread about 1 and 0."""
    rng = np.random.default_rng(seed)
    for name, p in model.params.items():
        if p.data.ndim == 2:
            embedding = "wte" in name or "wpe" in name or "embed_tokens" in name
            scale = 0.5 if embedding else 1.0 / np.sqrt(p.data.shape[1])
            p.data[...] = rng.normal(0.0, scale, p.data.shape)
        else:
            centre = 0.0 if name.endswith(".bias") else 1.0
            p.data[...] = centre + rng.normal(0.0, 0.2, p.data.shape)
    return model


def weights_of(model: Model) -> dict[str, np.ndarray]:
    return {name: p.data for name, p in model.params.items()}


def batch(vocab: int, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.random.default_rng(seed).integers(0, vocab, (BATCH, length + 1))
    return tokens[:, :-1], tokens[:, 1:]  # civetta's targets: the next token, already shifted


def civetta_loss_and_grads(
    model: Model, idx: np.ndarray, targets: np.ndarray
) -> tuple[float, dict[str, np.ndarray]]:
    loss = model(idx, targets)
    loss.backward()
    grads = {}
    for name, p in model.params.items():
        assert p.grad is not None, name
        grads[name] = p.grad
    return float(loss.data), grads


def hf_loss_and_grads(
    model: torch.nn.Module, idx: np.ndarray, targets: np.ndarray
) -> tuple[float, dict[str, np.ndarray]]:
    logits = model(torch.from_numpy(idx)).logits
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), torch.from_numpy(targets).ravel()
    )
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():  # a tied head is listed once, as the table
        assert p.grad is not None, name
        grads[name] = p.grad.numpy()
    return loss.item(), grads


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def assert_parity(description: Any, model: Model, reference: torch.nn.Module) -> None:
    idx, targets = batch(description.vocab_size, description.block_size)
    loss, grads = civetta_loss_and_grads(model, idx, targets)
    hf_loss, hf_grads = hf_loss_and_grads(reference, idx, targets)
    assert abs(loss - hf_loss) <= TOLERANCE * abs(hf_loss), (loss, hf_loss)
    _, grads_in_hf_layout = hf.to_hf(description, grads)  # names and Conv1D transposes
    assert set(grads_in_hf_layout) == set(hf_grads)
    for name, grad in grads_in_hf_layout.items():
        assert relative(grad, hf_grads[name]) <= TOLERANCE, (name, relative(grad, hf_grads[name]))


# ---- Llama ----------------------------------------------------------------------------------
# GQA with one and with two key/value heads and plain multi-head attention; ffn widths that are
# not multiples of the model width (72 and 88 of 32); tied and untied heads.
LLAMAS = {
    "gqa-1kv-untied": LlamaConfig(
        vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=1, n_embd=32, ffn_hidden=72
    ),
    "gqa-2kv-tied": LlamaConfig(
        vocab_size=64,
        block_size=12,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=32,
        ffn_hidden=88,
        rope_theta=500.0,
        norm_eps=1e-6,
        tie_embeddings=True,
    ),
    "mha-3-layers": LlamaConfig(vocab_size=48, block_size=10, n_layer=3, n_head=6, n_embd=48),
}


@pytest.mark.parametrize("description", LLAMAS.values(), ids=LLAMAS.keys())
def test_llama_matches_transformers_loss_and_every_gradient(
    description: LlamaConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = randomized(Llama(description, dtype=np.float64), seed=3)
    reference = in_float64(hf_model(description, weights_of(model)), description, monkeypatch)
    assert_parity(description, model, reference)


def test_transformers_labels_see_the_pairs_civettas_targets_give(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HF shifts `labels` inside: labels=tokens scores position t against token t + 1, which
    is civetta's (tokens[:, :-1], tokens[:, 1:]). HF's `labels=` loss casts the logits to
    float32 (`loss_utils.ForCausalLMLoss`: `logits.float()`), a fourth float32 step, so the
    losses agree to 1e-6 here; pairs off by one position would differ by far more."""
    description = LLAMAS["gqa-2kv-tied"]
    model = randomized(Llama(description, dtype=np.float64), seed=1)
    reference = in_float64(hf_model(description, weights_of(model)), description, monkeypatch)
    tokens = np.random.default_rng(5).integers(0, description.vocab_size, (BATCH, 13))
    with torch.no_grad():
        hf_loss = reference(torch.from_numpy(tokens), labels=torch.from_numpy(tokens)).loss.item()
    loss = float(model(tokens[:, :-1], tokens[:, 1:]).data)
    assert abs(loss - hf_loss) <= 1e-6 * hf_loss
    unshifted = float(model(tokens[:, :-1], tokens[:, :-1]).data)
    assert abs(unshifted - hf_loss) > 1e-2 * hf_loss


@pytest.mark.parametrize("kept", [*[(s,) for s in FLOAT32_STEPS], FLOAT32_STEPS], ids="+".join)
def test_each_float32_step_of_transformers_llama_costs_under_1e_6(
    kept: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With transformers' own float32 step(s) `kept` (all three: the stock model), the float64
    logits still agree to 1e-6, and no longer to float64's precision: that gap is the float32
    step's, which the parity tests compute in float64."""
    description = LLAMAS["gqa-1kv-untied"]
    model = randomized(Llama(description, dtype=np.float64), seed=2)
    idx, _ = batch(description.vocab_size, description.block_size, seed=4)
    logits = model.logits(idx).data
    reference = in_float64(hf_model(description, weights_of(model)), description, monkeypatch, kept)
    with torch.no_grad():
        hf_logits = reference(torch.from_numpy(idx)).logits.numpy()
    assert 1e-12 < relative(logits, hf_logits) <= 1e-6


# ---- GPT ------------------------------------------------------------------------------------
GPTS = {
    "tied": GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32),
    "untied": GPTConfig(
        vocab_size=48, block_size=12, n_layer=3, n_head=2, n_embd=24, tie_embeddings=False
    ),
}


@pytest.mark.parametrize("description", GPTS.values(), ids=GPTS.keys())
def test_gpt_matches_gpt2lmheadmodel_loss_and_every_gradient(description: GPTConfig) -> None:
    """GPT2LMHeadModel's Conv1D layers hold (in, out) weights: `to_hf` transposes civetta's."""
    model = randomized(GPT(description, dtype=np.float64), seed=3)
    assert_parity(description, model, hf_model(description, weights_of(model)))
