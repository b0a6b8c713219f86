"""Context parallelism reproduces one process: the sequence of every microbatch split over cp
ranks, attention reaching the other chunks through each back end (ring, all-gathered keys and
values, all-to-all), with and without causal load balancing, alone and with dp, tp (+SP), pp and
ZeRO, for the GPT (learned positions) and the Llama (RoPE at each chunk's global positions).
Each trains 3 AdamW steps in float64 under mpiexec; every step's loss and gradient norm within
1e-10 relative of one process, gradients within 1e-9.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mpi_helpers import assert_same_run, train_worker_run

from launch.config import ConfigError, load

LLAMA = [
    "model.kind=llama",
    "model.block_size=32",
    "model.n_layer=2",
    "model.n_head=4",
    "model.n_kv_head=2",
    "model.n_embd=32",
    "model.ffn_hidden=48",
]
GPT = ["model.block_size=32", "model.n_layer=2", "model.n_head=4", "model.n_embd=32"]
COMMON = [
    "train.batch_size=4",
    "train.steps=3",
    "train.eval_batches=1",
    "data.source=synthetic",
    "train.dtype=float64",
]


def run(tmp: Path, model: list[str], *overrides: str, ranks: int = 1) -> dict[str, np.ndarray]:
    return train_worker_run(tmp, [*model, *COMMON, *overrides], ranks)


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, np.ndarray]]:
    tmp = tmp_path_factory.mktemp("reference")
    return {"llama": run(tmp / "llama", LLAMA), "gpt": run(tmp / "gpt", GPT)}


def cp(n: int, comm: str, balance: bool = True) -> list[str]:
    return [f"parallel.cp={n}", f"parallel.cp_comm={comm}",
            f"parallel.cp_balance={str(balance).lower()}"]  # fmt: skip


CASES = {  # label: (model, ranks, overrides)
    **{
        f"llama-cp{n}-{comm}-{'balanced' if balance else 'contiguous'}": (
            "llama", n, cp(n, comm, balance)
        )
        for n in (2, 4)
        for comm in ("ring", "all_gather")
        for balance in (True, False)
    },
    "llama-cp2-a2a": ("llama", 2, cp(2, "a2a")),
    "llama-cp2-a2a-contiguous": ("llama", 2, cp(2, "a2a", False)),
    "gpt-cp2-ring": ("gpt", 2, cp(2, "ring")),
    "gpt-cp4-a2a": ("gpt", 4, cp(4, "a2a")),
    "gpt-cp2-all-gather-dp2": ("gpt", 4, [*cp(2, "all_gather"), "parallel.dp=2"]),
    "llama-cp2-ring-dp2-zero3": ("llama", 4, [*cp(2, "ring"), "parallel.dp=2", "parallel.zero=3"]),
    "llama-cp2-ring-tp2-sp": (
        "llama", 4, [*cp(2, "ring"), "parallel.tp=2", "parallel.sequence_parallel=true"]
    ),
    "llama-cp2-ring-pp2": (
        "llama", 4, [*cp(2, "ring"), "parallel.pp=2", "train.microbatch_size=1"]
    ),
    "gpt-cp2-ring-pp2-zb-h1": (
        "gpt", 4, [*cp(2, "ring"), "parallel.pp=2", "parallel.schedule=zb-h1",
                   "train.microbatch_size=1"]
    ),
    "llama-cp2-ring-selective-recompute": (
        "llama", 2, [*cp(2, "ring"), "parallel.recompute=selective"]
    ),
}  # fmt: skip


@pytest.mark.parametrize("label", list(CASES))
def test_context_parallel_layout_matches_single_process(references, tmp_path, label) -> None:
    model, ranks, overrides = CASES[label]
    shape = LLAMA if model == "llama" else GPT
    assert_same_run(run(tmp_path, shape, *overrides, ranks=ranks), references[model])


def test_the_ring_sends_each_key_value_block_once_per_step_and_direction(tmp_path) -> None:
    """Per microbatch and layer, the forward ring passes cp − 1 blocks of k and v; the ledger
    records them under the cp axis."""
    got = run(tmp_path, LLAMA, *cp(2, "ring"), ranks=2)
    rows = json.loads(str(got["ledger"]))
    forward = [r for r in rows if r["axis"] == "cp" and r["phase"] == "forward"]
    assert forward and all(r["op"] == "sendrecv" for r in forward)


def test_a2a_refuses_a_cp_that_splits_a_key_value_head() -> None:
    with pytest.raises(ConfigError) as caught:
        load(None, [*LLAMA, *COMMON, *cp(4, "a2a")])
    assert str(caught.value) == (
        "parallel.cp_comm=a2a splits the key/value heads over cp: parallel.cp=4 × "
        "parallel.tp=1 does not divide model.n_kv_head=2"
    )


def test_balanced_chunks_must_divide_the_sequence() -> None:
    with pytest.raises(ConfigError) as caught:
        load(None, [*LLAMA, *COMMON, "model.block_size=24", *cp(8, "ring")])
    assert str(caught.value) == (
        "the 16 sequence chunks of parallel.cp=8 (2·cp chunks: parallel.cp_balance) do not "
        "divide model.block_size=24"
    )


def train_cli(out: Path, *overrides: str, resume: Path | None = None) -> list[float]:
    config = Path(__file__).resolve().parent.parent / "configs" / "llama-quickstart.yaml"
    command = [sys.executable, "-m", "launch", "train", str(config), "--out", str(out)]
    settings = (*LLAMA, *COMMON, "train.steps=6", "train.warmup_steps=0", *overrides)
    for item in settings:
        command += ["--set", item]
    if resume is not None:
        command += ["--resume", str(resume)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    return [s["loss"] for s in json.loads((out / "metrics.json").read_text())["steps"]]


def test_a_context_parallel_checkpoint_reshards_to_other_layouts(tmp_path) -> None:
    losses = train_cli(tmp_path / "cp", *cp(2, "ring"), "parallel.dp=2",
                       "train.checkpoint_every=3")  # fmt: skip
    checkpoint = tmp_path / "cp" / "checkpoints" / "step000002"
    for label, layout in {"single": [], "cp2-a2a": cp(2, "a2a")}.items():
        resumed = train_cli(tmp_path / label, *layout, resume=checkpoint)
        np.testing.assert_allclose(resumed, losses[3:], rtol=1e-10, atol=0, err_msg=label)
