"""Hugging Face checkpoints of civetta's mixture-of-experts Llama: MixtralForCausalLM.

`civetta export --format hf` writes a model with `moe` as a MixtralForCausalLM directory under
the classic Mixtral tensor names (`block_sparse_moe.gate`, `block_sparse_moe.experts.{j}.w1|w2|
w3`); transformers 5's `from_pretrained` fuses them on load (its `conversion_mapping`) and gives
civetta's logits: within 1e-12 in float64 once its float32 steps are replaced by their float64
forms (`test_hf_parity`, `test_moe_parity`), within 1e-6 as it stands. Reading accepts both those
names and the fused ones transformers 5 writes with `save_pretrained(save_original_format=
False)`. What Mixtral cannot hold (capacity dropping) is refused with one line, as is a config
that is not the directory's.

The experts run with transformers' "eager" implementation: the default "grouped_mm" has no
float64 kernel on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from test_hf_parity import (
    in_float64,
    randomized,
    relative,
)
from test_moe_parity import float64_router_forward
from transformers import AutoModelForCausalLM
from transformers.models.mixtral import modeling_mixtral

from civetta.models import Llama, LlamaConfig
from civetta.models.moe import MoEConfig
from civetta.nn import Model
from launch import cli, hf
from launch.config import load
from launch.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "quickstart.yaml"
MOE = MoEConfig(experts=4, top_k=2, ffn_hidden=40, aux_loss_coef=0.01)
DESCRIPTION = LlamaConfig(
    vocab_size=64, block_size=12, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, moe=MOE
)
# The same model as a config's model section, for train.init_from.
SECTION = [
    "model.kind=llama", "model.vocab_size=64", "model.block_size=12", "model.n_layer=2",
    "model.n_head=4", "model.n_kv_head=2", "model.n_embd=32", "model.tie_embeddings=false",
    "model.moe={experts: 4, top_k: 2, ffn_hidden: 40, aux_loss_coef: 0.01}",
    "data.source=synthetic", "train.batch_size=4", "train.steps=1", "train.eval_batches=1",
    "train.dtype=float64", "train.warmup_steps=0",
]  # fmt: skip


def weights_of(model: Model) -> dict[str, np.ndarray]:
    return {name: p.data for name, p in model.params.items()}


def exported(directory: Path, dtype: type = np.float64, seed: int = 3) -> Model:
    """A randomized civetta MoE model, written into `directory` as `civetta export` writes."""
    model = randomized(Llama(DESCRIPTION, dtype=np.float64), seed=seed)
    for p in model.params.values():
        p.data = p.data.astype(dtype)
    hf.write(directory, *hf.to_hf(DESCRIPTION, weights_of(model)))
    return model


def civetta_logits(weights: dict[str, np.ndarray], dtype: type, idx: np.ndarray) -> np.ndarray:
    model = Llama(DESCRIPTION, dtype=dtype)
    for name, p in model.params.items():
        p.data[...] = weights[name]
    assert model.logits is not None
    return model.logits(idx).data


def from_pretrained(directory: Path) -> Any:  # torch's stubs type submodules loosely
    return AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation="eager", experts_implementation="eager"
    ).eval()


def mixtral_in_float64(model: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """`model` with transformers' float32 steps (rotary, RMSNorm, attention and router
    softmax) computed in float64."""
    in_float64(model, DESCRIPTION, monkeypatch, module=modeling_mixtral)
    monkeypatch.setattr(modeling_mixtral.MixtralTopKRouter, "forward", float64_router_forward)
    return model


def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, DESCRIPTION.vocab_size, (3, 12))


def hf_logits(model: Any, idx: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(idx)).logits.numpy()


# ---- export -----------------------------------------------------------------------------------
def test_the_export_is_a_mixtral_directory_under_the_classic_names(tmp_path: Path) -> None:
    exported(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert config["model_type"] == "mixtral"
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (4, 2)
    assert (config["intermediate_size"], config["router_aux_loss_coef"]) == (40, 0.01)
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert (config["head_dim"], config["num_key_value_heads"], config["rms_norm_eps"]) == (
        8,
        2,
        1e-5,
    )
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="np") as file:
        names = set(file.keys())
    assert "model.layers.1.block_sparse_moe.gate.weight" in names
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names
    assert not any(".mlp." in n for n in names)


def test_an_exported_moe_loads_in_from_pretrained_with_civettas_logits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = exported(tmp_path)
    reference = from_pretrained(tmp_path)
    assert type(reference).__name__ == "MixtralForCausalLM"
    assert reference.dtype == torch.float64
    idx = tokens()
    assert model.logits is not None
    logits = model.logits(idx).data
    stock = hf_logits(reference, idx)
    assert 1e-12 < relative(logits, stock) <= 1e-6  # transformers' float32 steps
    exact = hf_logits(mixtral_in_float64(reference, monkeypatch), idx)
    assert relative(logits, exact) <= 1e-12


def test_a_float32_export_loads_with_civettas_float32_logits(tmp_path: Path) -> None:
    model = exported(tmp_path, dtype=np.float32)
    reference = from_pretrained(tmp_path)
    assert reference.dtype == torch.float32
    idx = tokens()
    logits = civetta_logits(weights_of(model), np.float32, idx)
    assert relative(logits, hf_logits(reference, idx)) <= 1e-6


@pytest.mark.parametrize(
    ("moe", "message"),
    [
        (
            MoEConfig(experts=4, top_k=2, ffn_hidden=40, capacity_factor=1.25),
            "model.moe.capacity_factor=1.25 cannot be written as MixtralForCausalLM, which "
            "routes every token (dropless); export it with --format npz",
        ),
    ],
    ids=["capacity"],
)
def test_what_mixtral_cannot_hold_is_refused_with_one_line(moe: MoEConfig, message: str) -> None:
    description = LlamaConfig(**{**DESCRIPTION.__dict__, "moe": moe})
    with pytest.raises(hf.HFError) as error:
        hf.hf_config(description, np.dtype(np.float64))
    assert str(error.value) == message


def test_a_moe_with_qk_norm_is_refused_with_one_line() -> None:
    description = LlamaConfig(**{**DESCRIPTION.__dict__, "qk_norm": True})
    with pytest.raises(hf.HFError) as error:
        hf.hf_config(description, np.dtype(np.float64))
    assert str(error.value) == (
        "model.qk_norm with model.moe (Qwen3MoeForCausalLM) cannot be written yet "
        "(export it with --format npz)"
    )


# ---- reading ----------------------------------------------------------------------------------
def test_export_then_read_gives_the_same_model_and_weights_bitwise(tmp_path: Path) -> None:
    model = exported(tmp_path)
    description, weights = hf.read(tmp_path)
    assert hf.differences(DESCRIPTION, description) is None
    assert isinstance(description, LlamaConfig) and description.moe == MOE
    assert set(weights) == set(model.params)
    for name, p in model.params.items():
        assert weights[name].dtype == np.float64
        np.testing.assert_array_equal(weights[name], p.data)


def test_init_from_an_export_starts_from_its_weights_bitwise(tmp_path: Path) -> None:
    model = exported(tmp_path / "hf")
    trainer = Trainer(load(CONFIG, [*SECTION, f"train.init_from={tmp_path / 'hf'}"]))
    for name, p in trainer.model.params.items():
        np.testing.assert_array_equal(p.data, model.params[name].data)


def test_the_fused_names_transformers_saves_are_read_back_equal(tmp_path: Path) -> None:
    model = exported(tmp_path / "classic")
    fused = tmp_path / "fused"
    from_pretrained(tmp_path / "classic").save_pretrained(fused, save_original_format=False)
    with safe_open(str(fused / "model.safetensors"), framework="np") as file:
        names = set(file.keys())
    assert "model.layers.0.mlp.experts.gate_up_proj" in names
    assert not any("block_sparse_moe" in n for n in names)
    description, weights = hf.read(fused)
    assert hf.differences(DESCRIPTION, description) is None
    assert set(weights) == set(model.params)
    for name, p in model.params.items():
        np.testing.assert_array_equal(weights[name], p.data)


def test_a_mis_shaped_fused_tensor_is_one_line(tmp_path: Path) -> None:
    exported(tmp_path / "classic")
    fused = tmp_path / "fused"
    from_pretrained(tmp_path / "classic").save_pretrained(fused, save_original_format=False)
    tensors = load_file(str(fused / "model.safetensors"))
    key = "model.layers.1.mlp.experts.down_proj"
    tensors[key] = tensors[key][:, :, :39].copy()
    save_file(tensors, str(fused / "model.safetensors"))
    with pytest.raises(hf.HFError) as error:
        hf.read(fused)
    assert str(error.value) == (
        f"{fused / 'model.safetensors'}: tensor {key!r} expected shape (4, 32, 40), got (4, 32, 39)"
    )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("router_jitter_noise", 0.1, "router_jitter_noise expected 0.0 (civetta routes without "
         "noise), got 0.1"),
        ("sliding_window", 4096, "sliding_window expected null, got 4096"),
        ("num_experts_per_tok", 5, "moe.top_k=5 must be between 1 and experts=4"),
    ],
    ids=["jitter", "sliding-window", "top-k"],
)  # fmt: skip
def test_a_mixtral_config_civetta_cannot_run_is_one_line(tmp_path, key, value, message) -> None:
    exported(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(hf.HFError) as error:
        hf.read(tmp_path)
    assert str(error.value) == f"{tmp_path / 'config.json'}: {message}"


@pytest.mark.parametrize(
    ("override", "differs"),
    [
        ("model.moe={experts: 4, top_k: 1, ffn_hidden: 40, aux_loss_coef: 0.01}",
         "model.moe.top_k is 2 in {dir}, the config says 1"),
        ("model.moe={experts: 4, top_k: 2, ffn_hidden: 40}",
         "model.moe.aux_loss_coef is 0.01 in {dir}, the config says 0.0"),
        ("model.moe=null", "model.moe is {{experts: 4, top_k: 2, ffn_hidden: 40, "
         "capacity_factor: null, aux_loss_coef: 0.01, shared_experts: 0, aux_loss_scope: "
         "microbatch}} in {dir}, the config says null"),
    ],
    ids=["top-k", "aux-loss", "dense"],
)  # fmt: skip
def test_an_init_from_of_another_model_is_one_line(tmp_path, capsys, override, differs) -> None:
    exported(tmp_path / "hf")
    sets = [f"--set={o}" for o in (*SECTION, override, f"train.init_from={tmp_path / 'hf'}")]
    assert cli.main(["train", str(CONFIG), *sets]) == 2
    message = differs.format(dir=repr(str(tmp_path / "hf")))
    assert capsys.readouterr().err == f"error: train.init_from: {message}\n"
