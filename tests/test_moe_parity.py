"""civetta's Llama with `moe` computes what transformers' MixtralForCausalLM does, in float64.

A civetta model with unit-scale random weights (`test_hf_parity.randomized`) is loaded into a
MixtralForCausalLM built from the dense Llama's config.json (`launch.hf.hf_config`) plus the
Mixtral keys; loss and every gradient (router included) agree within 1e-9 relative.

transformers 5 stores Mixtral's experts fused, not as the classic checkpoint's
``block_sparse_moe.experts.{j}.w1|w2|w3.weight``: ``model.layers.{i}.mlp.gate.weight`` is the
router (experts, n_embd), ``mlp.experts.gate_up_proj`` (experts, 2·ffn, n_embd) holds each
expert's w1 then w3 (the forward `chunk`s it into gate and up) and ``mlp.experts.down_proj``
(experts, n_embd, ffn) each w2. (Its loader converts classic checkpoints the same way, in
`conversion_mapping`.) `to_mixtral` / `from_mixtral_grads` convert here, in the test.

Besides `test_hf_parity`'s float64 replacements (rotary, RMSNorm, the attention softmax, here
patched in `modeling_mixtral`), two more float32 steps of HF's Mixtral are replaced: the router
softmax (`MixtralTopKRouter.forward` calls `.float()` on the logits) and, in the aux test, the
slot counts of `load_balancing_loss_func` (float32 `histc`, divided in float32).

The load-balancing loss differs from HF's in two documented ways, and the aux test accounts for
both: HF's f_e counts per token (Σ_e f_e = top_k) where civetta's counts per routed slot
(Σ_e f_e = 1, Switch's and Megatron-LM's normalisation), so civetta's term is HF's / top_k; and
HF pools all layers' router logits into one product of layer means where civetta adds one term
per layer. The reference is therefore HF's per-layer formula, summed over layers, / top_k.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from test_hf_parity import (
    BATCH,
    TOLERANCE,
    batch,
    civetta_loss_and_grads,
    in_float64,
    randomized,
    relative,
)
from transformers import MixtralConfig, MixtralForCausalLM
from transformers.models.mixtral import modeling_mixtral

from civetta.models import Llama, LlamaConfig
from civetta.models.moe import MoEConfig, recording_routing
from launch import hf


def description(experts: int, top_k: int, aux: float = 0.0) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=64,
        block_size=12,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=32,
        moe=MoEConfig(experts=experts, top_k=top_k, ffn_hidden=40, aux_loss_coef=aux),
    )


def to_mixtral(weights: dict[str, np.ndarray], c: LlamaConfig) -> dict[str, torch.Tensor]:
    """civetta's (classic Mixtral) names → transformers 5's fused expert tensors."""
    assert c.moe is not None
    out: dict[str, np.ndarray] = {}
    for name, array in weights.items():
        if ".block_sparse_moe." not in name:
            out[name] = array
    for i in range(c.n_layer):
        moe = f"model.layers.{i}.block_sparse_moe"
        out[f"model.layers.{i}.mlp.gate.weight"] = weights[f"{moe}.gate.weight"]
        expert = [f"{moe}.experts.{e}" for e in range(c.moe.experts)]
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = np.stack(
            [np.concatenate([weights[f"{p}.w1.weight"], weights[f"{p}.w3.weight"]]) for p in expert]
        )
        out[f"model.layers.{i}.mlp.experts.down_proj"] = np.stack(
            [weights[f"{p}.w2.weight"] for p in expert]
        )
    return {name: torch.from_numpy(np.array(a)) for name, a in out.items()}


def from_mixtral_grads(grads: dict[str, np.ndarray], c: LlamaConfig) -> dict[str, np.ndarray]:
    """transformers 5's gradients under civetta's names (the inverse of `to_mixtral`)."""
    assert c.moe is not None
    f = c.moe.ffn_hidden
    out = {}
    for name, grad in grads.items():
        if ".mlp.gate." in name:
            out[name.replace(".mlp.", ".block_sparse_moe.")] = grad
        elif name.endswith("gate_up_proj") or name.endswith("down_proj"):
            moe = name.rsplit(".mlp.", 1)[0] + ".block_sparse_moe.experts"
            for e in range(c.moe.experts):
                if name.endswith("gate_up_proj"):
                    out[f"{moe}.{e}.w1.weight"] = grad[e, :f]
                    out[f"{moe}.{e}.w3.weight"] = grad[e, f:]
                else:
                    out[f"{moe}.{e}.w2.weight"] = grad[e]
        else:
            out[name] = grad
    return out


def float64_router_forward(self: Any, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`MixtralTopKRouter.forward` with the softmax in the logits' dtype (not float32)."""
    hidden = hidden.reshape(-1, self.hidden_dim)
    logits = torch.nn.functional.linear(hidden, self.weight)
    probs = torch.softmax(logits, dim=-1)
    top, index = torch.topk(probs, self.top_k, dim=-1)
    return logits, top / top.sum(dim=-1, keepdim=True), index


def mixtral(c: LlamaConfig, weights: dict[str, np.ndarray], monkeypatch: Any) -> torch.nn.Module:
    """MixtralForCausalLM holding `weights`, float64, every float32 step in float64."""
    assert c.moe is not None
    dense = LlamaConfig(**{**c.__dict__, "moe": None})
    config = hf.hf_config(dense, np.dtype(np.float64))
    for key in ("architectures", "model_type", "mlp_bias", "dtype"):
        config.pop(key)
    config.update(
        intermediate_size=c.moe.ffn_hidden,
        num_local_experts=c.moe.experts,
        num_experts_per_tok=c.moe.top_k,
        router_aux_loss_coef=c.moe.aux_loss_coef,
        router_jitter_noise=0.0,
        sliding_window=None,
    )
    model = MixtralForCausalLM(MixtralConfig(**config)).to(torch.float64)
    # transformers 5 defaults to "grouped_mm" on CPU; the eager loop over experts is the reference.
    model.config._experts_implementation = "eager"
    assert model.model.layers[0].mlp.experts.config._experts_implementation == "eager"
    missing, unexpected = model.load_state_dict(to_mixtral(weights, c), strict=True)
    assert not missing and not unexpected
    in_float64(model, c, monkeypatch, module=modeling_mixtral)
    monkeypatch.setattr(modeling_mixtral.MixtralTopKRouter, "forward", float64_router_forward)
    model.config._attn_implementation = "eager"
    return model.eval()


def float64_load_balancing(logits: torch.Tensor, experts: int, top_k: int) -> torch.Tensor:
    """`modeling_mixtral.load_balancing_loss_func` of one layer with its counts in float64:
    experts · Σ_e (slots of e / tokens) · mean probability of e."""
    probs = torch.softmax(logits, dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices.reshape(-1)
    counts = torch.bincount(chosen, minlength=experts).to(logits.dtype)
    return experts * torch.sum(counts / logits.shape[0] * probs.mean(dim=0))


def mixtral_loss_and_grads(
    model: torch.nn.Module, c: LlamaConfig, idx: np.ndarray, targets: np.ndarray
) -> tuple[float, dict[str, np.ndarray]]:
    assert c.moe is not None
    out = model(torch.from_numpy(idx), output_router_logits=bool(c.moe.aux_loss_coef))
    logits = out.logits
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), torch.from_numpy(targets).ravel()
    )
    if c.moe.aux_loss_coef:
        for layer_logits in out.router_logits:
            hf_term = modeling_mixtral.load_balancing_loss_func(
                (layer_logits,), c.moe.experts, c.moe.top_k
            )
            ours = float64_load_balancing(layer_logits, c.moe.experts, c.moe.top_k)
            assert abs(hf_term.item() - ours.item()) <= 1e-6 * ours.item()  # HF's, bar float32
            loss = loss + c.moe.aux_loss_coef / c.moe.top_k * ours
    loss.backward()
    grads = {name: p.grad.numpy() for name, p in model.named_parameters()}
    return loss.item(), from_mixtral_grads(grads, c)


CASES = {
    f"top{k}-of-{e}" + ("-aux" if aux else ""): (e, k, aux)
    for e, k, aux in [
        (4, 1, 0.0),
        (4, 2, 0.0),
        (8, 1, 0.0),
        (8, 2, 0.0),
        (4, 2, 0.05),
        (8, 1, 0.05),
    ]
}


@pytest.mark.parametrize(("experts", "top_k", "aux"), CASES.values(), ids=CASES.keys())
def test_moe_matches_mixtral_loss_and_every_gradient(
    experts: int, top_k: int, aux: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = description(experts, top_k, aux)
    model = randomized(Llama(c, dtype=np.float64), seed=3)
    reference = mixtral(c, {n: p.data for n, p in model.params.items()}, monkeypatch)
    idx, targets = batch(c.vocab_size, c.block_size)
    with recording_routing() as log:  # the aux terms ride on the layers' outputs, not the loss
        loss, grads = civetta_loss_and_grads(model, idx, targets)
    loss += aux * sum(v for values in log.aux.values() for v in values)
    hf_loss, hf_grads = mixtral_loss_and_grads(reference, c, idx, targets)
    assert abs(loss - hf_loss) <= TOLERANCE * abs(hf_loss), (loss, hf_loss)
    assert set(grads) == set(hf_grads)
    # Top-1 renormalises the one weight to exactly 1: the LM loss gives the router no gradient
    # (both sides hold rounding noise, ~1e-18), so only the aux loss would train it.
    routerless = top_k == 1 and not aux
    for name, grad in grads.items():
        if routerless and name.endswith(".gate.weight"):
            assert np.abs(grad).max() < 1e-15 and np.abs(hf_grads[name]).max() < 1e-15
            continue
        assert relative(grad, hf_grads[name]) <= TOLERANCE, (name, relative(grad, hf_grads[name]))
    worst = max(
        relative(g, hf_grads[n])
        for n, g in grads.items()
        if not (routerless and n.endswith(".gate.weight"))
    )
    print(f"\n{c.moe}: loss error {abs(loss - hf_loss) / abs(hf_loss):.1e}, worst grad {worst:.1e}")


def test_every_expert_is_used_so_the_parity_covers_the_routing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The parity batch routes slots to every expert of every layer, with non-uniform weights
    (so a wrong weight or a wrong expert would show)."""
    c = description(8, 2)
    model = randomized(Llama(c, dtype=np.float64), seed=3)
    idx, targets = batch(c.vocab_size, c.block_size)
    _, grads = civetta_loss_and_grads(model, idx, targets)
    for i in range(c.n_layer):
        for e in range(8):
            assert (
                np.abs(grads[f"model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight"]).max() > 0
            )
    assert BATCH * c.block_size * 2 > 8 * 4  # enough slots for each expert to see several
