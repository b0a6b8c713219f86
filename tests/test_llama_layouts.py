"""A tiny Llama (grouped-query attention, SwiGLU, RoPE, RMSNorm) reproduces one process under
every layout: data, tensor (query and key/value heads split) and sequence parallelism, every
pipeline schedule, ZeRO 1–3, recomputation, the 3D layout, and a tied table across pipeline
stages. Each trains 3 AdamW steps in float64 under mpiexec (with a timeout); every step's loss
and gradient norm within 1e-10 relative of one process, gradients within 1e-9. Mixed precision
compares against one process in the same emulated dtype; checkpoints reshard across layouts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mpi_helpers import assert_same_run as same_run
from mpi_helpers import train_worker_run

from launch.config import ConfigError, load

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "llama-quickstart.yaml"
TINY = [
    "model.kind=llama",
    "model.block_size=16",
    "model.n_layer=4",
    "model.n_head=4",
    "model.n_kv_head=2",
    "model.n_embd=32",
    "model.ffn_hidden=48",  # not a multiple of the width
    "train.batch_size=8",
    "train.steps=3",
    "train.eval_batches=1",
    "data.source=synthetic",
]

LAYOUTS = {  # label: (ranks, overrides)
    "dp2": (2, ["parallel.dp=2"]),
    "tp2": (2, ["parallel.tp=2"]),
    "tp2-sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "dp2-tp2-sp": (4, ["parallel.dp=2", "parallel.tp=2", "parallel.sequence_parallel=true"]),
    "pp2-gpipe": (2, ["parallel.pp=2", "parallel.schedule=gpipe", "train.microbatch_size=2"]),
    "pp2-1f1b": (2, ["parallel.pp=2", "parallel.schedule=1f1b", "train.microbatch_size=1"]),
    "pp2-interleaved": (
        2,
        [
            "parallel.pp=2",
            "parallel.schedule=interleaved-1f1b",
            "parallel.virtual_stages=2",
            "train.microbatch_size=1",
        ],
    ),
    "pp2-zb-h1": (2, ["parallel.pp=2", "parallel.schedule=zb-h1", "train.microbatch_size=1"]),
    "pp4-1f1b": (4, ["parallel.pp=4", "train.microbatch_size=1"]),
    "zero1": (2, ["parallel.dp=2", "parallel.zero=1"]),
    "zero2": (2, ["parallel.dp=2", "parallel.zero=2"]),
    "zero3": (2, ["parallel.dp=2", "parallel.zero=3"]),
    "zero3-tp2": (4, ["parallel.dp=2", "parallel.tp=2", "parallel.zero=3"]),
    "tp2-full-recompute": (2, ["parallel.tp=2", "parallel.recompute=full"]),
    "pp2-selective-recompute": (
        2,
        ["parallel.pp=2", "parallel.recompute=selective", "train.microbatch_size=2"],
    ),
    "dp2-tp2-pp2-sp": (
        8,
        [
            "parallel.dp=2",
            "parallel.tp=2",
            "parallel.pp=2",
            "parallel.sequence_parallel=true",
            "train.microbatch_size=2",
        ],
    ),
}


def run(tmp: Path, *overrides: str, ranks: int = 1) -> dict[str, np.ndarray]:
    return train_worker_run(tmp, [*TINY, *overrides], ranks)


def assert_same_run(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    same_run(got, ref)
    assert np.any(ref["grad_norm"] > 1.0)  # clipping is exercised
    assert any(".self_attn.k_proj." in k for k in ref)
    for key in (k for k in ref if k.startswith("param.")):  # the weights after 3 steps
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-10, atol=1e-13, err_msg=key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    return run(tmp_path_factory.mktemp("reference"), "train.dtype=float64")


@pytest.mark.parametrize("label", list(LAYOUTS))
def test_llama_layout_matches_single_process(reference, tmp_path, label: str) -> None:
    ranks, overrides = LAYOUTS[label]
    assert_same_run(run(tmp_path, "train.dtype=float64", *overrides, ranks=ranks), reference)


QWEN3 = ("train.dtype=float64", "model.qk_norm=true", "model.head_dim=16")  # 4 · 16 ≠ 32


@pytest.fixture(scope="module")
def qwen3_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    return run(tmp_path_factory.mktemp("qwen3"), *QWEN3)


@pytest.mark.parametrize(
    "layout",
    [
        ("parallel.tp=2",),
        ("parallel.tp=2", "parallel.sequence_parallel=true"),
        ("parallel.dp=2", "parallel.tp=2", "parallel.zero=3"),
    ],
    ids=["tp2", "tp2-sp", "dp2-tp2-zero3"],
)
def test_qwen3_attention_under_tensor_parallelism(qwen3_reference, tmp_path, layout) -> None:
    """Qwen3's per-head q/k norms (one weight shared by the heads each tp rank holds part of)
    and a head size that is not n_embd/n_head, under tp with and without sequence parallelism
    and under ZeRO-3: equal to one process."""
    ranks = 4 if "parallel.dp=2" in layout else 2
    got = run(tmp_path, *QWEN3, *layout, ranks=ranks)
    assert any(".self_attn.q_norm." in k for k in qwen3_reference)
    assert_same_run(got, qwen3_reference)


def test_tied_llama_across_pipeline_stages_matches_single_process(tmp_path) -> None:
    tied = ("train.dtype=float64", "model.tie_embeddings=true")
    ref = run(tmp_path / "one", *tied)
    assert "param.lm_head.weight" not in ref  # the head is the embedding table
    pp = ("parallel.pp=2", "parallel.tp=2", "train.microbatch_size=2")
    assert_same_run(run(tmp_path / "pp", *tied, *pp, ranks=4), ref)


@pytest.mark.parametrize(
    ("dtype", "overrides"),
    [("bf16", ["parallel.tp=2", "parallel.sequence_parallel=true"]),
     ("fp16", ["parallel.dp=2", "parallel.zero=1"])],
    ids=["bf16-tp2-sp", "fp16-zero1"],
)  # fmt: skip
def test_mixed_precision_llama_matches_one_process_in_its_dtype(tmp_path, dtype, overrides):
    """Sums over other shards round in another order, so a weight may land one bf16 step away;
    the losses stay within 1e-3 of one process in the same dtype (as the GPT's do)."""
    ref = run(tmp_path / "one", f"train.dtype={dtype}")
    got = run(tmp_path / "many", f"train.dtype={dtype}", *overrides, ranks=2)
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-3, atol=0)
    assert np.all(np.isfinite(got["loss"]))


def test_tp_larger_than_the_key_value_heads_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        load(None, [*TINY, "parallel.tp=4"])
    assert str(caught.value) == (
        "parallel.tp=4 does not divide model.n_kv_head=2 (tensor parallelism splits whole "
        "key/value heads)"
    )


def test_a_gpt_key_on_a_llama_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        load(None, [*TINY, "model.bias=true"])
    assert str(caught.value) == "model.bias is not a key of model.kind=llama (it is one of gpt)"


def test_llama_defaults_fill_the_model_section() -> None:
    model = load(None, ["model.kind=llama", "model.n_embd=96", "model.n_head=6"]).model
    assert (model.n_kv_head, model.ffn_hidden, model.rope_theta) == (6, 256, 10000.0)
    assert (model.norm_eps, model.tie_embeddings, model.bias) == (1e-5, False, None)


def train_cli(out: Path, *overrides: str, resume: Path | None = None) -> list[float]:
    command = [sys.executable, "-m", "launch", "train", str(CONFIG), "--out", str(out)]
    for item in (*TINY, "train.dtype=float64", "train.steps=6", "train.warmup_steps=0", *overrides):
        command += ["--set", item]
    if resume is not None:
        command += ["--resume", str(resume)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    return [s["loss"] for s in json.loads((out / "metrics.json").read_text())["steps"]]


def test_a_llama_checkpoint_reshards_to_other_layouts(tmp_path) -> None:
    losses = train_cli(
        tmp_path / "full", "parallel.dp=2", "parallel.tp=2", "train.checkpoint_every=3"
    )
    checkpoint = tmp_path / "full" / "checkpoints" / "step000002"
    for label, layout in {
        "pp2": ["parallel.pp=2", "train.microbatch_size=2"],
        "zero3": ["parallel.dp=2", "parallel.zero=3"],
    }.items():
        resumed = train_cli(tmp_path / label, *layout, resume=checkpoint)
        np.testing.assert_allclose(resumed, losses[3:], rtol=1e-10, atol=0, err_msg=label)
