"""civetta's Llama with `qk_norm` and its own `head_dim` computes what transformers'
Qwen3ForCausalLM does, in float64, and round-trips through a Hugging Face directory.

As `test_hf_parity` for Llama: unit-scale random weights, the config.json and tensors of the
export's own conversion (`launch.hf.to_hf`: model_type qwen3), loss and every gradient within
1e-9 relative. Qwen3 has Llama's float32 steps (rotary angles, RMSNorm, attention softmax), plus
q_norm and k_norm, which are RMSNorms too: each is replaced by its float64 form here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_hf_parity import (
    BATCH,
    assert_parity,
    hf_model,
    in_float64,
    randomized,
    relative,
    weights_of,
)
from transformers import AutoModelForCausalLM
from transformers.models.qwen3 import modeling_qwen3

from civetta.models import Llama, LlamaConfig
from launch import hf

# head_dim 16 where n_embd / n_head is 8 (q_proj 32 → 64, o_proj 64 → 32), GQA, tied and not.
QWEN3S = {
    "wide-heads-gqa": LlamaConfig(
        vocab_size=64,
        block_size=12,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=32,
        head_dim=16,
        ffn_hidden=72,
        rope_theta=1e6,
        norm_eps=1e-6,
        qk_norm=True,
    ),
    "narrow-heads-tied": LlamaConfig(
        vocab_size=48,
        block_size=10,
        n_layer=2,
        n_head=6,
        n_kv_head=3,
        n_embd=48,
        head_dim=4,
        ffn_hidden=40,
        tie_embeddings=True,
        qk_norm=True,
    ),
}


def qwen3_in_float64(model: Any, c: LlamaConfig, monkeypatch: pytest.MonkeyPatch) -> Any:
    """`model` with every float32 step of transformers' Qwen3 computed in float64."""
    return in_float64(model, c, monkeypatch, module=modeling_qwen3)


@pytest.mark.parametrize("description", QWEN3S.values(), ids=QWEN3S.keys())
def test_qk_norm_matches_qwen3_loss_and_every_gradient(
    description: LlamaConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = randomized(Llama(description, dtype=np.float64), seed=3)
    reference: Any = hf_model(description, weights_of(model))
    assert type(reference).__name__ == "Qwen3ForCausalLM"
    q_proj = reference.model.layers[0].self_attn.q_proj.weight
    assert tuple(q_proj.shape) == (description.n_head * description.head_size, description.n_embd)
    assert_parity(description, model, qwen3_in_float64(reference, description, monkeypatch))


def test_an_exported_qwen3_loads_with_civettas_logits_and_reads_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    description = QWEN3S["wide-heads-gqa"]
    model = randomized(Llama(description, dtype=np.float64), seed=1)
    hf.write(tmp_path, *hf.to_hf(description, weights_of(model)))
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("qwen3", ["Qwen3ForCausalLM"])
    assert config["head_dim"] == 16
    reference: Any = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    idx = np.random.default_rng(4).integers(0, description.vocab_size, (BATCH, 12))
    assert model.logits is not None
    logits = model.logits(idx).data
    with torch.no_grad():
        stock = reference.eval()(torch.from_numpy(idx)).logits.numpy()
        exact = qwen3_in_float64(reference, description, monkeypatch)(torch.from_numpy(idx))
    assert relative(logits, stock) <= 1e-6
    assert relative(logits, exact.logits.numpy()) <= 1e-12
    read, weights = hf.read(tmp_path)
    assert read == description
    for name, p in model.params.items():
        np.testing.assert_array_equal(weights[name], p.data)


def test_qwen3s_default_head_dim_is_128_when_config_json_has_none(tmp_path: Path) -> None:
    description = LlamaConfig(
        vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8, head_dim=128, qk_norm=True
    )
    hf.write(tmp_path, *hf.to_hf(description, weights_of(Llama(description))))
    config = json.loads((tmp_path / "config.json").read_text())
    del config["head_dim"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    read, _ = hf.read(tmp_path, load=False)
    assert read == description


def test_a_qwen3_with_sliding_windows_is_one_line(tmp_path: Path) -> None:
    description = QWEN3S["narrow-heads-tied"]
    hf.write(tmp_path, *hf.to_hf(description, weights_of(Llama(description))))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "use_sliding_window": True}))
    with pytest.raises(hf.HFError) as error:
        hf.read(tmp_path)
    assert str(error.value) == (
        f"{tmp_path / 'config.json'}: use_sliding_window expected false, got true"
    )
