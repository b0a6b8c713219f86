"""Checkpoints: exact resume, resharding to another layout, crash safety, export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from civetta.models.gpt import GPT, GPTConfig

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
TINY = [
    "model.n_layer=2", "model.n_embd=32", "model.block_size=16", "train.batch_size=8",
    "train.steps=6", "train.warmup_steps=0", "train.dtype=float64", "data.source=synthetic",
    "train.eval_batches=1",
]  # fmt: skip


def train(out: Path, *overrides: str, resume: Path | None = None, fault: str = "") -> list[float]:
    command = [sys.executable, "-m", "launch", "train", str(CONFIG), "--out", str(out)]
    for item in (*TINY, *overrides):
        command += ["--set", item]
    if resume is not None:
        command += ["--resume", str(resume)]
    env = {**os.environ, "CIVETTA_FAULT": fault} if fault else None
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    if fault:
        assert result.returncode != 0
        return []
    assert result.returncode == 0, result.stderr
    return [s["loss"] for s in json.loads((out / "metrics.json").read_text())["steps"]]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[float]]:
    """dp=2 × tp=2 with a checkpoint every 3 steps."""
    out = tmp_path_factory.mktemp("full")
    losses = train(out, "parallel.dp=2", "parallel.tp=2", "train.checkpoint_every=3")
    return out, losses


def test_resume_reproduces_the_uninterrupted_run_exactly(uninterrupted, tmp_path) -> None:
    out, losses = uninterrupted
    checkpoint = out / "checkpoints" / "step000002"
    resumed = train(tmp_path, "parallel.dp=2", "parallel.tp=2", resume=checkpoint)
    assert resumed == losses[3:]  # bitwise: same layout, same state, same batches


@pytest.mark.parametrize(
    "layout",
    [
        ["parallel.pp=2", "train.microbatch_size=2"],  # dp2·tp2 → pp2
        [],  # dp2·tp2 → one process
        ["parallel.tp=4", "parallel.sequence_parallel=true"],  # dp2·tp2 → tp4 with SP
    ],
    ids=["pp2", "single", "tp4-sp"],
)
def test_a_checkpoint_loads_under_another_layout(uninterrupted, tmp_path, layout) -> None:
    out, losses = uninterrupted
    resumed = train(tmp_path, *layout, resume=out / "checkpoints" / "step000002")
    np.testing.assert_allclose(resumed, losses[3:], rtol=1e-10, atol=0)


def test_a_killed_run_keeps_its_last_checkpoint(uninterrupted, tmp_path) -> None:
    _, losses = uninterrupted
    layout = ["parallel.dp=2", "train.checkpoint_every=2"]
    train(tmp_path, *layout, fault="rank=1,step=5,kind=kill")
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step000003"
    assert sorted(p.name for p in (root / "step000003").iterdir()) == ["rank0.npz", "rank1.npz"]
    assert not (tmp_path / "metrics.json").exists()
    resumed = train(tmp_path / "again", *layout, resume=tmp_path)  # the run dir: its latest
    np.testing.assert_allclose(resumed, losses[4:], rtol=1e-10, atol=0)


def test_export_writes_full_nanogpt_weights(uninterrupted, tmp_path) -> None:
    out, _ = uninterrupted
    target = tmp_path / "model.npz"
    result = subprocess.run(
        [sys.executable, "-m", "launch", "export", str(out), "--out", str(target)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    with np.load(target, allow_pickle=False) as data:
        weights = {key: data[key] for key in data.files}
    model = GPT(GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=4, n_embd=32))
    assert set(weights) == set(model.state_dict())  # includes the tied lm_head.weight
    model.load_state_dict(weights)  # shapes in PyTorch's layout, nothing missing
    np.testing.assert_array_equal(weights["lm_head.weight"], weights["transformer.wte.weight"])


def test_resume_from_a_directory_without_checkpoint_is_one_line(tmp_path) -> None:
    command = [sys.executable, "-m", "launch", "train", str(CONFIG), "--resume", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr == f"error: --resume {str(tmp_path)!r} holds no complete checkpoint\n"


# ---- ZeRO: the state is gathered over dp when saved and cut again when loaded ----------------
@pytest.fixture(scope="module")
def zero3(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[float]]:
    """ZeRO-3 over dp=2 with a checkpoint every 3 steps."""
    out = tmp_path_factory.mktemp("zero3")
    losses = train(out, "parallel.dp=2", "parallel.zero=3", "train.checkpoint_every=3")
    return out, losses


def test_zero3_resume_reproduces_the_uninterrupted_run(zero3, tmp_path) -> None:
    out, losses = zero3
    checkpoint = out / "checkpoints" / "step000002"
    with np.load(checkpoint / "rank1.npz", allow_pickle=False) as data:
        assert data.files == ["meta"]  # the gathered state is written by dp rank 0 only
        assert json.loads(str(data["meta"]))["zero"] == 3
    resumed = train(tmp_path, "parallel.dp=2", "parallel.zero=3", resume=checkpoint)
    assert resumed == losses[3:]  # bitwise: same layout, same state, same batches


@pytest.mark.parametrize("zero", ["1", "3"])
def test_zero_with_bf16_resumes_exactly_and_keeps_its_masters(tmp_path, zero: str) -> None:
    """The float32 masters are gathered beside the Adam state: resuming rounds the same."""
    layout = ["parallel.dp=2", f"parallel.zero={zero}", "train.dtype=bf16"]
    losses = train(tmp_path / "full", *layout, "train.checkpoint_every=3")
    checkpoint = tmp_path / "full" / "checkpoints" / "step000002"
    with np.load(checkpoint / "rank0.npz", allow_pickle=False) as data:
        masters = [k for k in data.files if k.startswith("master/")]
        params = [k for k in data.files if k.startswith("param/")]
        assert len(masters) == len(params) > 0
    resumed = train(tmp_path / "resumed", *layout, resume=checkpoint)
    assert resumed == losses[3:]


def test_a_zero1_checkpoint_resumes_as_one_process(tmp_path) -> None:
    layout = ["parallel.dp=2", "parallel.zero=1"]
    losses = train(tmp_path / "full", *layout, "train.checkpoint_every=3")
    resumed = train(tmp_path / "single", resume=tmp_path / "full" / "checkpoints" / "step000002")
    np.testing.assert_allclose(resumed, losses[3:], rtol=1e-10, atol=0)


def test_export_from_a_zero3_run_writes_full_nanogpt_weights(zero3, uninterrupted, tmp_path):
    weights = {}
    for name, (out, _) in {"zero3": zero3, "plain": uninterrupted}.items():
        target = tmp_path / f"{name}.npz"
        command = [sys.executable, "-m", "launch", "export", str(out), "--out", str(target)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        with np.load(target, allow_pickle=False) as data:
            weights[name] = {key: data[key] for key in data.files}
    model = GPT(GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=4, n_embd=32))
    assert set(weights["zero3"]) == set(model.state_dict())
    model.load_state_dict(weights["zero3"])  # whole tensors: the shards' padding is cut off
    for key, value in weights["plain"].items():  # same shapes as a dp2·tp2 run's export
        assert weights["zero3"][key].shape == value.shape, key
