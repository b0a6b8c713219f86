"""`civetta train` refuses, before any rank allocates, a run that cannot fit in this machine's
memory, from the cost model's traced projection of what every rank will hold."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch import cli, launcher
from launch.config import load
from launch.memory_check import MemoryCheckError, check_memory, projected_bytes
from launch.trainer import Trainer

QUICK = ["train.steps=1", "train.warmup_steps=0", "train.eval_batches=1"]


@pytest.mark.parametrize(
    "overrides",
    [[], ["train.dtype=float64"], ["parallel.recompute=selective"], ["parallel.recompute=full"],
     ["model.tie_embeddings=false", "model.bias=false"]],
)  # fmt: skip
def test_the_projection_is_what_one_process_holds(overrides: list[str]) -> None:
    """Model state and the activations' peak, byte for byte, as the engine measures them."""
    config = load("configs/quickstart.yaml", [*QUICK, *overrides])
    memory = Trainer(config).run().memory
    held = sum(memory[k] for k in ("params", "grads", "optimizer", "activations_peak"))
    assert projected_bytes(config) == held


def test_emulated_half_precision_counts_the_float32_arrays_and_masters() -> None:
    fp32 = load("configs/quickstart.yaml", QUICK)
    bf16 = load("configs/quickstart.yaml", [*QUICK, "train.dtype=bf16"])
    params = Trainer(fp32).memory()["params"]  # float32 bytes of the weights
    assert projected_bytes(bf16) == projected_bytes(fp32) + params  # + the float32 masters


def test_check_refuses_with_one_line_and_passes_what_fits() -> None:
    config = load("configs/quickstart.yaml", QUICK)
    need = projected_bytes(config)
    check_memory(config, available=need)
    with pytest.raises(MemoryCheckError) as caught:
        check_memory(config, available=need - 1)
    assert "\n" not in str(caught.value) and "GiB are available" in str(caught.value)


def test_a_too_large_model_is_refused_before_any_rank_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_ranks(*args: object, **kwargs: object) -> None:
        raise AssertionError("ranks were started")

    monkeypatch.setattr(launcher, "relaunch", no_ranks)
    out = tmp_path / "out"
    argv = ["train", "configs/quickstart.yaml", "--out", str(out), "--set", "model.n_embd=32768"]
    for extra in ([], ["--set", "parallel.dp=2"]):
        code = cli.main([*argv, *extra])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1
        assert err.startswith("error: the run needs at least ") and "GiB are available" in err
        assert not out.exists()
