"""Hugging Face checkpoints: `civetta export RUN --format hf` and `train.init_from`.

An exported run loads in transformers' `AutoModelForCausalLM.from_pretrained` (GPT2LMHeadModel,
LlamaForCausalLM) and gives civetta's logits; a run started with `train.init_from` from the
export begins at the loss the exported weights give on its first batch, on one process and
split over two ranks. What civetta cannot run, or a model that is not the config's, is refused
with one line. The runs are tiny: two training steps each, float64 unless the dtype is the point.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from test_hf_parity import in_float64, relative
from transformers import AutoModelForCausalLM

from civetta.data import load_dataset
from civetta.models import GPT, GPTConfig, Llama, LlamaConfig
from civetta.nn import Model
from launch import checkpoint, cli, hf
from launch.config import load
from launch.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "quickstart.yaml"
TINY = [
    "model.n_layer=2", "model.n_embd=32", "model.block_size=16", "train.batch_size=8",
    "train.warmup_steps=0", "data.source=synthetic", "train.eval_batches=1",
]  # fmt: skip
LLAMA = [
    "model.kind=llama", "model.n_kv_head=2", "model.ffn_hidden=40", "model.tie_embeddings=false",
    "train.dtype=float64",
]  # fmt: skip
GPT_FLOAT32 = ["train.dtype=float32"]
SAVED = ["train.steps=2", "train.checkpoint_every=2"]  # one checkpoint, after the last step


def civetta(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "launch", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)


def train(out: Path, *overrides: str) -> list[float]:
    sets = [item for o in (*TINY, *overrides) for item in ("--set", o)]
    result = civetta("train", str(CONFIG), "--out", str(out), *sets)
    assert result.returncode == 0, result.stderr
    return [s["loss"] for s in json.loads((out / "metrics.json").read_text())["steps"]]


def export_hf(run: Path, out: Path) -> None:
    result = civetta("export", str(run), "--format", "hf", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("wrote config.json and ")


@pytest.fixture(scope="module")
def gpt_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A float32 GPT (tied head) trained two steps, and its export."""
    root = tmp_path_factory.mktemp("gpt")
    train(root / "run", *GPT_FLOAT32, *SAVED)
    export_hf(root / "run", root / "hf")
    return root / "run", root / "hf"


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[float]]:
    """A float64 Llama (GQA, untied head) trained two steps, its export and its losses."""
    root = tmp_path_factory.mktemp("llama")
    losses = train(root / "run", *LLAMA, *SAVED)
    export_hf(root / "run", root / "hf")
    return root / "run", root / "hf", losses


def checkpoint_weights(run: Path) -> dict[str, np.ndarray]:
    _, full = checkpoint.read_full_state(checkpoint.find(run))
    return {k.removeprefix("param/"): a for k, a in full.items() if k.startswith("param/")}


def civetta_model(build: Callable[..., Model], description: object, weights, dtype) -> Model:
    model = build(description, dtype=dtype)
    for name, p in model.params.items():
        p.data[...] = weights[name]
    return model


def tokens(vocab: int, length: int = 16) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, (3, length))


# ---- export ---------------------------------------------------------------------------------
def test_an_exported_gpt_loads_as_gpt2lmheadmodel_with_civettas_logits(gpt_export) -> None:
    run, out = gpt_export
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["dtype"], config["n_positions"]) == ("gpt2", "float32", 16)
    with safe_open(str(out / "model.safetensors"), framework="np") as file:
        assert "lm_head.weight" not in set(file.keys())  # tied: transformers ties it on load
    description, weights = hf.read(out)
    assert description == GPTConfig(block_size=16, n_layer=2, n_embd=32)
    saved = checkpoint_weights(run)
    assert set(weights) == set(saved)
    for name, array in saved.items():  # the checkpoint's dtype, Conv1D transposed back exactly
        assert weights[name].dtype == np.float32
        np.testing.assert_array_equal(weights[name], array)

    idx = tokens(description.vocab_size)
    reference = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(reference).__name__ == "GPT2LMHeadModel"
    assert reference.dtype == torch.float32
    with torch.no_grad():
        hf_logits = reference(torch.from_numpy(idx)).logits.numpy()
    logits = civetta_model(GPT, description, weights, np.float32).logits(idx).data
    assert relative(logits, hf_logits) <= 1e-5  # float32 arithmetic, in two orders
    wide = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float64, attn_implementation="eager"
    )
    with torch.no_grad():
        hf_logits = wide.eval()(torch.from_numpy(idx)).logits.numpy()
    logits = civetta_model(GPT, description, weights, np.float64).logits(idx).data
    assert relative(logits, hf_logits) <= 1e-9


def test_an_exported_llama_loads_as_llamaforcausallm_with_civettas_logits(
    llama_export, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, out, _ = llama_export
    description, weights = hf.read(out)
    expected = LlamaConfig(block_size=16, n_layer=2, n_kv_head=2, n_embd=32, ffn_hidden=40)
    assert description == expected
    saved = checkpoint_weights(run)
    assert set(weights) == set(saved)
    for name, array in saved.items():
        np.testing.assert_array_equal(weights[name], array)

    idx = tokens(description.vocab_size)
    reference = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(reference).__name__ == "LlamaForCausalLM"
    assert reference.dtype == torch.float64  # the run's dtype, from config.json
    logits = civetta_model(Llama, description, weights, np.float64).logits(idx).data
    with torch.no_grad():
        stock = reference(torch.from_numpy(idx)).logits.numpy()
        exact = in_float64(reference, description, monkeypatch)(torch.from_numpy(idx))
    assert relative(logits, stock) <= 1e-6  # transformers' float32 steps (test_hf_parity)
    assert relative(logits, exact.logits.numpy()) <= 1e-9


def _export() -> tuple[dict, dict[str, np.ndarray]]:
    description = LlamaConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8)
    model = Llama(description, dtype=np.float32)
    return hf.to_hf(description, {n: p.data for n, p in model.params.items()})


def test_an_export_replaces_an_earlier_one_and_a_failed_one_leaves_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, tensors = _export()
    out = tmp_path / "hf"
    hf.write(out, config, tensors)
    config["rms_norm_eps"] = 1e-6
    hf.write(out, config, tensors)  # over an earlier export
    assert json.loads((out / "config.json").read_text())["rms_norm_eps"] == 1e-6

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf, "save_file", full_disk)
    with pytest.raises(hf.HFError, match="No space left on device"):
        hf.write(out, {**config, "rms_norm_eps": 1e-4}, tensors)
    assert json.loads((out / "config.json").read_text())["rms_norm_eps"] == 1e-6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no staging left behind


def test_an_export_refuses_a_directory_holding_other_files(tmp_path: Path) -> None:
    config, tensors = _export()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(hf.HFError) as error:
        hf.write(tmp_path, config, tensors)
    assert str(error.value) == (
        f"{str(tmp_path)!r} holds 'notes.txt', which is not part of an export "
        "(give a new directory, or an earlier export's)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_gpt_without_biases_cannot_be_exported_as_gpt2(tmp_path: Path, capsys) -> None:
    run, out = tmp_path / "run", tmp_path / "hf"
    sets = [f"--set={o}" for o in (*TINY, "model.bias=false", "train.steps=1")]
    assert (
        cli.main(["train", str(CONFIG), "--out", str(run), *sets, "--set=train.checkpoint_every=1"])
        == 0
    )
    capsys.readouterr()
    assert cli.main(["export", str(run), "--format", "hf", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        "error: --format hf: model.bias=false cannot be written as GPT2LMHeadModel, which has "
        "biases in every layer (export it with --format npz)\n"
    )
    assert not out.exists()


# ---- reading: what civetta cannot run is one line ----------------------------------------------
def _edited(export: Path, tmp: Path, config_edit=None, tensor_edit=None) -> Path:
    target = tmp / "edited"
    shutil.copytree(export, target)
    if config_edit is not None:
        config = json.loads((target / "config.json").read_text())
        config_edit(config)
        (target / "config.json").write_text(json.dumps(config))
    if tensor_edit is not None:
        tensors = load_file(str(target / "model.safetensors"))
        tensor_edit(tensors)
        save_file(tensors, str(target / "model.safetensors"))
    return target


def _set(key: str, value: object) -> Callable[[dict], None]:
    return lambda mapping: mapping.__setitem__(key, value)


LLAMA_REFUSALS = {
    "model-type": (
        _set("model_type", "mistral"),
        None,
        'model_type expected "gpt2", "llama", "mixtral" or "qwen3", got "mistral"',
    ),
    "rope-scaling": (
        _set("rope_parameters", {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}),
        None,
        'rope_parameters.rope_type expected "default" (civetta runs RoPE unscaled), got "llama3"',
    ),
    "old-rope-scaling": (
        _set("rope_scaling", {"type": "linear", "factor": 2.0}),
        None,
        'rope_scaling.rope_type expected "default" (civetta runs RoPE unscaled), got "linear"',
    ),
    "attention-bias": (
        _set("attention_bias", True),
        None,
        "attention_bias expected false, got true",
    ),
    "mlp-bias": (_set("mlp_bias", True), None, "mlp_bias expected false, got true"),
    "activation": (_set("hidden_act", "gelu"), None, 'hidden_act expected "silu", got "gelu"'),
    "head-dim": (_set("head_dim", 7), None, "head_dim=7 must be even for RoPE"),
    "width": (_set("hidden_size", "32"), None, 'hidden_size expected a positive integer, got "32"'),
}
TENSOR_REFUSALS = {
    "missing": (
        lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
        "tensor 'model.layers.1.mlp.up_proj.weight' is missing",
    ),
    "mis-shaped": (
        lambda t: t.__setitem__("model.norm.weight", np.ones(31)),
        "tensor 'model.norm.weight' expected shape (32,), got (31,)",
    ),
    "unexpected": (
        lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.bias", np.zeros(32)),
        "tensor 'model.layers.0.self_attn.q_proj.bias' is not a parameter of the model "
        "config.json describes",
    ),
    "integer": (
        lambda t: t.__setitem__("model.norm.weight", np.ones(32, dtype=np.int32)),
        "tensor 'model.norm.weight' expected F16, F32 or F64, got I32",
    ),
}


@pytest.mark.parametrize("case", LLAMA_REFUSALS.values(), ids=LLAMA_REFUSALS.keys())
def test_a_llama_config_civetta_cannot_run_is_one_line(llama_export, tmp_path, case) -> None:
    config_edit, _, message = case
    target = _edited(llama_export[1], tmp_path, config_edit)
    with pytest.raises(hf.HFError) as error:
        hf.read(target)
    assert str(error.value) == f"{target / 'config.json'}: {message}"


@pytest.mark.parametrize("case", TENSOR_REFUSALS.values(), ids=TENSOR_REFUSALS.keys())
def test_a_weights_file_that_does_not_fit_is_one_line(llama_export, tmp_path, case) -> None:
    tensor_edit, message = case
    target = _edited(llama_export[1], tmp_path, tensor_edit=tensor_edit)
    with pytest.raises(hf.HFError) as error:
        hf.read(target)
    assert str(error.value) == f"{target / 'model.safetensors'}: {message}"


def test_a_gpt2_with_another_activation_is_one_line(gpt_export, tmp_path) -> None:
    target = _edited(gpt_export[1], tmp_path, _set("activation_function", "relu"))
    with pytest.raises(hf.HFError) as error:
        hf.read(target)
    assert str(error.value) == (
        f'{target / "config.json"}: activation_function expected "gelu_new" or '
        '"gelu_pytorch_tanh", got "relu"'
    )


def test_the_rope_theta_of_older_configs_is_read(llama_export, tmp_path) -> None:
    def older(config: dict) -> None:  # as transformers 4 wrote it
        del config["rope_parameters"]
        config["rope_theta"] = 500000.0

    description, _ = hf.read(_edited(llama_export[1], tmp_path, older), load=False)
    assert description.rope_theta == 500000.0


# ---- train.init_from --------------------------------------------------------------------------
def first_batch_loss(export: Path) -> float:
    """The loss of the exported weights on the batch a run's step 0 trains on (one process)."""
    description, weights = hf.read(export)
    x, y = load_dataset("synthetic", 0, block_size=16).batch("train", 0, 0, 8, 16)
    return float(civetta_model(Llama, description, weights, np.float64)(x, y).data)


def test_init_from_starts_at_the_loss_of_the_exported_weights(llama_export) -> None:
    _, out, losses = llama_export
    expected = first_batch_loss(out)
    assert abs(expected - losses[0]) > 1e-3  # trained weights, not the fresh ones of step 0
    config = load(CONFIG, [*TINY, *LLAMA, "train.steps=1", f"train.init_from={out}"])
    trainer = Trainer(config)
    assert trainer.update.optimizer.state_dict()["step"] == 0  # fresh optimizer state
    assert trainer.step(0).loss == pytest.approx(expected, rel=1e-12, abs=0)


@pytest.mark.parametrize(
    "layout", [["parallel.tp=2"], ["parallel.dp=2", "parallel.zero=1"]], ids=["tp2", "dp2-zero1"]
)
def test_init_from_loads_into_two_ranks(llama_export, tmp_path, layout) -> None:
    """tp=2 cuts each weight as the sharding places it; ZeRO-1 leaves each rank the optimizer
    state of its own pieces (a rank may own none of a parameter)."""
    _, out, _ = llama_export
    losses = train(tmp_path, *LLAMA, "train.steps=1", f"train.init_from={out}", *layout)
    assert losses[0] == pytest.approx(first_batch_loss(out), rel=1e-10, abs=0)


def test_init_from_under_bf16_keeps_the_weights_as_float32_masters(llama_export) -> None:
    _, out, _ = llama_export
    _, weights = hf.read(out)
    overrides = [*TINY, *LLAMA, "train.dtype=bf16", f"train.init_from={out}"]
    trainer = Trainer(load(CONFIG, overrides))
    masters = trainer.update.masters
    assert masters is not None
    for name, p in trainer.model.params.items():
        np.testing.assert_array_equal(masters.master[name].data, weights[name].astype(np.float32))
        np.testing.assert_array_equal(p.data, masters.policy.round(masters.master[name].data))


# ---- init_from errors: one line before anything runs -----------------------------------------
def test_an_init_from_that_is_not_a_directory_is_one_line(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope"
    code = cli.main(["train", str(CONFIG), f"--set=train.init_from={missing}"])
    assert (code, capsys.readouterr().err) == (
        2,
        "error: train.init_from expected a Hugging Face checkpoint directory (config.json and "
        f"model.safetensors), got {str(missing)!r}, which is not a directory\n",
    )


def test_an_init_from_without_config_json_is_one_line(tmp_path: Path, capsys) -> None:
    code = cli.main(["train", str(CONFIG), f"--set=train.init_from={tmp_path}"])
    assert (code, capsys.readouterr().err) == (
        2,
        f"error: train.init_from: {str(tmp_path)!r} holds no config.json\n",
    )


@pytest.mark.parametrize(
    ("overrides", "differs"),
    [
        (["model.n_layer=1"], "model.n_layer is 2 in {dir}, the config says 1"),
        (
            ["model.kind=gpt", "model.n_kv_head=null", "model.ffn_hidden=null"],
            "model.kind is llama in {dir}, the config says gpt",
        ),
        (["model.n_kv_head=4"], "model.n_kv_head is 2 in {dir}, the config says 4"),
    ],
    ids=["n_layer", "kind", "n_kv_head"],
)
def test_an_init_from_of_another_model_is_one_line(llama_export, capsys, overrides, differs):
    _, out, _ = llama_export
    sets = [f"--set={o}" for o in (*TINY, *LLAMA, *overrides, f"train.init_from={out}")]
    assert cli.main(["train", str(CONFIG), *sets]) == 2
    message = differs.format(dir=repr(str(out)))
    assert capsys.readouterr().err == f"error: train.init_from: {message}\n"


def test_an_init_from_error_is_one_line_from_the_command_line(llama_export, tmp_path) -> None:
    _, out, _ = llama_export
    target = _edited(out, tmp_path, _set("rope_parameters", {"rope_type": "yarn", "factor": 4.0}))
    sets = [f"--set={o}" for o in (*TINY, *LLAMA, f"train.init_from={target}")]
    result = civetta("train", str(CONFIG), *sets)
    assert result.returncode == 2
    assert result.stderr == (
        f"error: train.init_from: {target / 'config.json'}: rope_parameters.rope_type expected "
        '"default" (civetta runs RoPE unscaled), got "yarn"\n'
    )
