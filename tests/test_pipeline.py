"""Pipeline layouts reproduce the single-process run, and keep the activations they should.

Every schedule at pp in {2, 4}, and the 3D layout dp=2 × tp=2 × pp=2, train a tiny 8-layer GPT
for 3 AdamW steps in float64 under mpiexec: every step's loss within 1e-10 relative of one
process, gradients within 1e-9 (gathered over every stage).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mpi_helpers import assert_same_run, train_worker_run

TINY = [
    "model.block_size=16",
    "model.n_layer=8",
    "model.n_head=4",
    "model.n_embd=32",
    "train.batch_size=8",
    "train.steps=3",
    "train.eval_batches=1",
    "data.source=synthetic",
    "train.dtype=float64",
]

PIPELINES = [  # (pp, schedule, virtual stages)
    (2, "gpipe", 1),
    (2, "1f1b", 1),
    (2, "interleaved-1f1b", 2),
    (2, "zb-h1", 1),
    (4, "gpipe", 1),
    (4, "1f1b", 1),
    (4, "interleaved-1f1b", 2),
    (4, "zb-h1", 1),
]


def run(tmp: Path, *overrides: str, ranks: int = 1) -> dict[str, np.ndarray]:
    return train_worker_run(tmp, [*TINY, *overrides], ranks)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    return run(tmp_path_factory.mktemp("reference"))


@pytest.mark.parametrize(("pp", "schedule", "v"), PIPELINES, ids=str)
def test_pipeline_matches_single_process(reference, tmp_path, pp, schedule, v) -> None:
    micro = "train.microbatch_size=1"  # 8 microbatches per step
    got = run(
        tmp_path,
        f"parallel.pp={pp}",
        f"parallel.schedule={schedule}",
        f"parallel.virtual_stages={v}",
        micro,
        ranks=pp,
    )
    assert_same_run(got, reference)
    peaks = got["peak_in_flight"]
    if schedule == "gpipe":
        assert list(peaks) == [8] * pp  # every microbatch's activations live at once
    elif schedule in ("1f1b", "zb-h1"):
        assert all(peak <= pp for peak in peaks), peaks


def test_3d_layout_matches_single_process(reference, tmp_path) -> None:
    got = run(
        tmp_path,
        "parallel.dp=2",
        "parallel.tp=2",
        "parallel.pp=2",
        "parallel.sequence_parallel=true",
        "train.microbatch_size=2",
        ranks=8,
    )
    assert_same_run(got, reference)
