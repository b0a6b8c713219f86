"""Layouts reproduce one process with the compiled kernels running (`civetta.compiled`).

The layout suites train models 32 wide, whose rows stay on numpy. Here a GPT and a Llama 128
wide (LayerNorm/RMSNorm rows at `compiled.MIN_WIDTH`, GELU, SwiGLU, RoPE, attention and AdamW
arrays past `compiled.MIN_ELEMENTS` in one process, some of them below it on a tensor-parallel
rank) train under data, tensor and sequence parallelism, in float64 within 1e-10 of one process
as every layout must, and in float32 within 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mpi_helpers import assert_same_run, train_worker_run

from civetta import compiled

pytest.importorskip("numba")

WIDE = [
    "model.block_size=32",
    "model.n_layer=2",
    "model.n_head=4",
    f"model.n_embd={compiled.MIN_WIDTH}",
    "train.batch_size=8",
    "train.steps=3",
    "train.eval_batches=1",
    "data.source=synthetic",
]
MODELS = {"gpt": [], "llama": ["model.kind=llama", "model.n_kv_head=2", "model.ffn_hidden=256"]}
LAYOUTS = {
    "dp2": (2, ["parallel.dp=2"]),
    "tp2-sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
}


def test_the_wide_models_take_the_compiled_kernels() -> None:
    rows = np.zeros((8 * 32, compiled.MIN_WIDTH))
    hidden = np.zeros((8, 32, 4 * compiled.MIN_WIDTH))
    assert compiled.used_for(rows) and compiled.elementwise_for(hidden)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("label", list(LAYOUTS))
def test_float64_layout_with_compiled_kernels_matches_one_process(
    tmp_path: Path, model: str, label: str
) -> None:
    ranks, overrides = LAYOUTS[label]
    base = [*WIDE, *MODELS[model], "train.dtype=float64"]
    reference = train_worker_run(tmp_path / "one", base)
    assert_same_run(train_worker_run(tmp_path / label, [*base, *overrides], ranks), reference)


def test_float32_layout_with_compiled_kernels_matches_one_process(tmp_path: Path) -> None:
    base = [*WIDE, "train.dtype=float32"]
    reference = train_worker_run(tmp_path / "one", base)
    got = train_worker_run(tmp_path / "tp2", [*base, "parallel.tp=2"], 2)
    np.testing.assert_allclose(got["loss"], reference["loss"], rtol=1e-5, atol=0)
