"""Damaged checkpoints: checksums, fallback to the newest intact one, crashes and full disks
while a checkpoint is written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from launch import checkpoint, cli

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
TINY = [
    "model.n_layer=1", "model.n_embd=32", "model.block_size=16", "train.batch_size=4",
    "train.steps=6", "train.warmup_steps=0", "train.dtype=float64", "data.source=synthetic",
    "train.eval_batches=1", "train.checkpoint_every=2",
]  # fmt: skip
DP2 = ["parallel.dp=2"]


def civetta(*args: str, fault: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "CIVETTA_FAULT": fault} if fault else None
    command = [sys.executable, "-m", "launch", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)


def train_args(out: Path, *overrides: str, resume: Path | None = None) -> list[str]:
    args = ["train", str(CONFIG), "--out", str(out)]
    for item in (*TINY, *overrides):
        args += ["--set", item]
    return args + (["--resume", str(resume)] if resume is not None else [])


def losses_of(out: Path) -> list[float]:
    return [s["loss"] for s in json.loads((out / "metrics.json").read_text())["steps"]]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[float]]:
    """dp=2, 6 steps, checkpoints after steps 1, 3 and 5."""
    out = tmp_path_factory.mktemp("run")
    result = civetta(*train_args(out, *DP2))
    assert result.returncode == 0, result.stderr
    return out, losses_of(out)


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir / "checkpoints", copy / "checkpoints")
    return copy


def step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step{step:06d}"


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def flip_a_byte_of(file: Path, key: str) -> None:
    """Flip one byte inside the stored bytes of array `key`."""
    raw = bytearray(file.read_bytes())
    with np.load(file, allow_pickle=False) as data:
        tail = data[key].tobytes()[-64:]
    at = raw.find(tail)  # the npz is stored uncompressed
    assert at > 0
    raw[at + 32] ^= 0x01
    file.write_bytes(bytes(raw))


# ---- detection --------------------------------------------------------------------------------
def test_each_array_has_a_checksum_in_meta(run) -> None:
    with np.load(step_dir(run[0], 5) / "rank0.npz", allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        arrays = {key: data[key] for key in data.files if key != "meta"}
    assert meta["format"] == checkpoint.FORMAT
    assert set(meta["checksums"]) == set(arrays) and arrays
    assert all(checkpoint.checksum(a) == meta["checksums"][k] for k, a in arrays.items())
    assert checkpoint.verify(step_dir(run[0], 5)) == 5


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_damaged_newest_checkpoint_is_skipped_with_one_warning(run, tmp_path, damage) -> None:
    out = copy_of(run[0], tmp_path)
    file = step_dir(out, 5) / "rank0.npz"
    if damage == "truncated":
        truncate(file)
    else:
        flip_a_byte_of(file, "param/transformer.wte.weight")
    warnings: list[str] = []
    assert checkpoint.find(out, warnings.append) == step_dir(out, 3)
    assert len(warnings) == 1
    assert warnings[0].startswith(f"{str(file)!r} (checkpoint of step 5) is damaged: ")
    chosen = f"; using {str(step_dir(out, 3))!r} (step 3), the newest intact checkpoint"
    assert warnings[0].endswith(chosen)


def test_an_array_that_fails_its_checksum_is_detected(run, tmp_path) -> None:
    """A well-formed file whose array differs from the one its meta describes."""
    out = copy_of(run[0], tmp_path)
    file = step_dir(out, 5) / "rank0.npz"
    with np.load(file, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    arrays["param/transformer.wte.weight"][0, 0] += 1.0
    np.savez(file, **arrays)
    with pytest.raises(checkpoint.DamagedCheckpointError) as error:
        checkpoint.verify(step_dir(out, 5))
    assert str(error.value) == (
        f"{str(file)!r} (checkpoint of step 5) is damaged: "
        "'param/transformer.wte.weight' does not match its checksum"
    )


def test_a_missing_rank_file_is_detected(run, tmp_path) -> None:
    out = copy_of(run[0], tmp_path)
    (step_dir(out, 5) / "rank1.npz").unlink()
    warnings: list[str] = []
    assert checkpoint.find(out, warnings.append) == step_dir(out, 3)
    assert "rank1.npz' (checkpoint of step 5) is damaged: the file is missing" in warnings[0]


def test_without_an_intact_checkpoint_resume_is_one_error_line(run, tmp_path, capsys) -> None:
    out = copy_of(run[0], tmp_path)
    for step in (1, 3, 5):
        truncate(step_dir(out, step) / "rank0.npz")
    args = train_args(tmp_path / "again", *DP2, resume=out)
    assert cli.main(args) == 2
    lines = capsys.readouterr().err.splitlines()
    newest = step_dir(out, 5) / "rank0.npz"
    assert len(lines) == 1
    assert lines[0].startswith(
        f"error: --resume {str(out)!r} holds no intact checkpoint: {str(newest)!r} "
        "(checkpoint of step 5) is damaged: it cannot be read (truncated or corrupt: "
    )
    assert lines[0].endswith(" (and 2 older ones are damaged too)")


def test_a_damaged_checkpoint_named_itself_is_an_error(run, tmp_path, capsys) -> None:
    out = copy_of(run[0], tmp_path)
    flip_a_byte_of(step_dir(out, 3) / "rank0.npz", "param/transformer.wte.weight")
    args = train_args(tmp_path / "again", *DP2, resume=step_dir(out, 3))
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"error: {str(step_dir(out, 3) / 'rank0.npz')!r} (checkpoint of step 3)")


def test_export_skips_a_damaged_checkpoint_too(run, tmp_path) -> None:
    out = copy_of(run[0], tmp_path)
    flip_a_byte_of(step_dir(out, 5) / "rank0.npz", "param/transformer.wte.weight")
    target = tmp_path / "model.npz"
    result = civetta("export", str(out), "--out", str(target))
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(f"warning: {str(step_dir(out, 5) / 'rank0.npz')!r}")
    assert result.stderr.count("\n") == 1
    _, older = checkpoint.read_full_state(step_dir(out, 3))
    with np.load(target, allow_pickle=False) as data:
        np.testing.assert_array_equal(
            data["transformer.wte.weight"], older["param/transformer.wte.weight"]
        )


# ---- resuming from the older checkpoint, under mpiexec ----------------------------------------
def test_resume_falls_back_and_reproduces_the_uninterrupted_run(run, tmp_path) -> None:
    out = copy_of(run[0], tmp_path)
    truncate(step_dir(out, 5) / "rank1.npz")
    result = civetta(*train_args(tmp_path / "resumed", *DP2, resume=out))
    assert result.returncode == 0, result.stderr
    warning = (
        f"warning: {str(step_dir(out, 5) / 'rank1.npz')!r} (checkpoint of step 5) is damaged: "
    )
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1  # once, not once per rank
    assert warnings[0].startswith(warning)
    assert losses_of(tmp_path / "resumed") == run[1][4:]  # bitwise, from step 3's state


def test_a_rank_killed_while_writing_a_checkpoint_leaves_the_previous_one(run, tmp_path) -> None:
    result = civetta(*train_args(tmp_path, *DP2), fault="rank=1,step=3,kind=kill,at=checkpoint")
    assert result.returncode != 0
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step000001"
    assert not step_dir(tmp_path, 3).exists()  # only its .partial directory
    assert checkpoint.verify(step_dir(tmp_path, 1)) == 1
    resumed = civetta(*train_args(tmp_path / "again", *DP2, resume=tmp_path))
    assert resumed.returncode == 0, resumed.stderr
    assert "warning" not in resumed.stderr
    assert losses_of(tmp_path / "again") == run[1][2:]


def test_a_full_disk_while_writing_a_checkpoint_is_one_line(tmp_path) -> None:
    (tmp_path / "metrics.json").write_text("an earlier run's\n")
    result = civetta(*train_args(tmp_path), fault="rank=0,step=3,kind=enospc,at=checkpoint")
    assert result.returncode == 1
    partial = tmp_path / "checkpoints" / "step000003.partial" / "rank0.npz"
    assert result.stderr.splitlines() == [
        "error: rank 0 failed: CheckpointError: could not write the checkpoint of step 3 to "
        f"{str(partial)!r}: No space left on device "
        f"(traceback: {tmp_path / 'logs' / 'rank0.log'})"
    ]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step000001"
    assert checkpoint.verify(step_dir(tmp_path, 1)) == 1
    assert list(partial.parent.iterdir()) == []  # the half-written file is removed
    assert (tmp_path / "metrics.json").read_text() == "an earlier run's\n"
