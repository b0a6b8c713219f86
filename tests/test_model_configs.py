"""The shipped model configs (configs/models/) describe what they say, and every one of them is
accepted by `simulate` and `tune`: projected through the traced path like any other model."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from civetta.models import LlamaConfig
from launch.config import load, model_description
from launch.simulate import simulate_command
from launch.tune import tune_command

MODELS = Path(__file__).resolve().parent.parent / "configs" / "models"
SHIPPED = sorted(p.stem for p in MODELS.glob("*.yaml"))

# Published totals (Llama 3 model card, "Params"; Dubey et al. 2024, Table 3).
PUBLISHED_BILLIONS = {"llama3.1-8b": 8.0, "llama3.1-70b": 70.6, "llama3.1-405b": 405.9}
# Published (total, active) billions, the unit of their last digit and how they were cut to it:
# Mixtral's paper (Jiang et al. 2024) and Mistral's 8x22B announcement round (46.7B, 12.9B;
# 141B, 39B), the Qwen3 model cards truncate (30.5B and 3.3B activated for 30.53B and 3.35B; 235B
# and 22B). Active: a token's top_k experts, the router, attention, norms, the embedding table
# and the head (`LlamaConfig.active_parameters`).
PUBLISHED_MOE_BILLIONS = {
    "mixtral-8x7b": (46.7, 12.9, 0.1, "rounded"),
    "mixtral-8x22b": (141.0, 39.0, 1.0, "rounded"),
    "qwen3-30b-a3b": (30.5, 3.3, 0.1, "truncated"),
    "qwen3-235b-a22b": (235.0, 22.0, 1.0, "truncated"),
}


def published_as(count: int, unit: float, cut: str) -> float:
    """`count` parameters in billions cut to `unit` as the publisher cuts it."""
    billions = count / 1e9 / unit
    return (round(billions) if cut == "rounded" else int(billions)) * unit


# GPUs that `tune` lays each out on (small models on few GPUs, large ones on many).
TUNE_GPUS = {
    "llama3.1-8b": 16,
    "llama3.1-70b": 128,
    "llama3.1-405b": 1024,
    "mixtral-8x7b": 16,
    "mixtral-8x22b": 64,
    "qwen3-30b-a3b": 16,
    "qwen3-235b-a22b": 256,
}
MOE_TUNE = [
    "model.block_size=4096",
    "train.microbatch_size=1",
    "parallel.cp=1",
    "parallel.recompute=full",
]


def experiment(tmp_path: Path, name: str) -> Path:
    """An experiment file that includes the shipped model and sets a bf16 training run."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"include: {MODELS / (name + '.yaml')}\n"
        "data: {source: synthetic}\n"
        "train: {batch_size: 64, microbatch_size: 1, dtype: bf16, steps: 10}\n"
    )
    return path


def test_every_model_config_is_shipped() -> None:
    assert {"llama3.1-8b", "llama3.1-70b", "llama3.1-405b", "llama-tiny"} <= set(SHIPPED)
    assert set(PUBLISHED_MOE_BILLIONS) <= set(SHIPPED)


@pytest.mark.parametrize("name", sorted(PUBLISHED_BILLIONS))
def test_llama_shapes_have_their_published_parameter_counts(tmp_path, name: str) -> None:
    model = model_description(load(experiment(tmp_path, name)))
    assert model.vocab_size == 128256 and model.rope_theta == 500000.0
    assert model.num_parameters() / 1e9 == pytest.approx(PUBLISHED_BILLIONS[name], abs=0.06)


@pytest.mark.parametrize("name", sorted(PUBLISHED_MOE_BILLIONS))
def test_moe_shapes_have_their_published_total_and_active_counts(tmp_path, name: str) -> None:
    total, active, unit, cut = PUBLISHED_MOE_BILLIONS[name]
    model = model_description(load(experiment(tmp_path, name)))
    assert isinstance(model, LlamaConfig) and model.moe is not None
    assert published_as(model.num_parameters(), unit, cut) == pytest.approx(total)
    assert published_as(model.active_parameters(), unit, cut) == pytest.approx(active)


@pytest.mark.parametrize("name", SHIPPED)
def test_simulate_and_tune_accept_every_shipped_model(tmp_path, name: str) -> None:
    path = experiment(tmp_path, name)
    model = model_description(load(path))
    large = model.n_embd >= 4096
    tp = math.gcd(8, getattr(model, "n_kv_head", 8))  # whole key/value heads per rank
    overrides = [f"parallel.tp={tp}", "parallel.sequence_parallel=true"] if large else []
    if name in PUBLISHED_MOE_BILLIONS:  # each expert is traced: 4K-token sequences keep it quick
        overrides.append("model.block_size=4096")
    out = tmp_path / "simulate.json"
    console = Console(file=io.StringIO(), width=100)
    assert simulate_command(str(path), "h100-dgx", overrides, None, out, console) == 0
    projection = json.loads(out.read_text())
    assert projection["step_time_s"] > 0
    gpus = TUNE_GPUS.get(name, 8)
    ranked = tmp_path / "tune.json"
    # A mixture of experts traces each of its experts: its search is held to 4K-token
    # sequences, microbatch 1, full recomputation and no context parallelism (the suite stays
    # fast).
    held = MOE_TUNE if name in PUBLISHED_MOE_BILLIONS else []
    assert (
        tune_command(str(path), "h100-dgx", gpus, None, held, json_out=ranked, console=console) == 0
    )
    layouts = json.loads(ranked.read_text())
    assert layouts["layouts"], f"tune found no layout for {name} on {gpus} GPUs"


EXPERIMENTS = Path(__file__).resolve().parent.parent / "configs"
PROJECTED = ["gpt3-175b", "llama3.1-405b", "llama3.1-405b-128k"]


@pytest.mark.parametrize("name", PROJECTED)
def test_the_shipped_cluster_experiments_project_and_fit(tmp_path, name: str) -> None:
    """The experiments shipped for the simulator (GPT-3's Megatron layout, Llama 3.1 405B's
    8K and 128K layouts) project, and fit an H100's or A100's memory as their comments say."""
    out = tmp_path / "simulate.json"
    hardware = "a100-dgx" if name.startswith("gpt3") else "h100-dgx"
    console = Console(file=io.StringIO(), width=100)
    path = str(EXPERIMENTS / f"{name}.yaml")
    assert simulate_command(path, hardware, (), None, out, console) == 0
    projection = json.loads(out.read_text())
    assert projection["fits"]
    if name.endswith("128k"):
        assert projection["comm_bytes"]["cp"] > 0
