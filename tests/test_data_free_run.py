"""A training step run data-free (`civetta.meta`) through the runtime of parallel/.

The cost model projects a layout by running the model's own code on shape-only arrays for one
rank of a virtual mesh (`parallel.virtual`). tests/test_virtual_mesh.py checks that such a step,
`Trainer(..., data_free=True)`, records exactly the ledger, FLOPs and model state of the
executed `mpiexec` run, for every layout it executes. The checks here are what that comparison
cannot see: the collectives themselves on data-free buffers, that a data-free trainer really
holds no values, that ZeRO-3's own matmuls log the GEMMs `fused.linear` logs, and that a
GPT-3-sized step costs almost no memory.
"""

from __future__ import annotations

import math
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from test_virtual_mesh import ODD, PP_M4, TINY, build_trainer, case_config, ledger_rows

from civetta import activation_meter, meta
from civetta.meta import MetaArray
from civetta.meters import Gemm, recording_gemms
from launch.config import load
from launch.trainer import Trainer
from parallel.mesh import Mesh
from parallel.virtual import virtual_mesh


def like(x: np.ndarray) -> MetaArray:
    """A MetaArray with `x`'s shape, dtype and strides."""
    return MetaArray(x.shape, x.dtype, x.strides)


def group_calls(wrap: Callable[[np.ndarray], Any]) -> tuple[list[Any], list[dict[str, Any]]]:
    """Every kind of Group call, on dp=2 × tp=2 virtual rank 0, on arrays made by `wrap`
    (identity, or `like`); the results and the ledger."""
    mesh = virtual_mesh(dp=2, tp=2, rank=0)
    tp, dp, world = mesh.group("tp"), mesh.group("dp"), mesh.world
    x = wrap(np.arange(12, dtype=np.float32).reshape(3, 4))
    odd = wrap(np.ones(7))
    results = [
        tp.all_reduce(x),
        world.all_reduce(x.T, op="max"),  # not contiguous: copied first
        dp.all_reduce(odd, out=odd),
        tp.all_gather(x),
        tp.all_gather(x.T, axis=1),
        tp.reduce_scatter(wrap(np.ones((4, 6), np.float32))),
        tp.reduce_scatter(wrap(np.ones((4, 6), np.float32)), axis=1),
        dp.broadcast(wrap(np.zeros(5, np.int64)), root=1),
        dp.broadcast(wrap(np.zeros((), np.int64))),  # 0-d: sent as one element
        tp.recv((2, 3), np.float32, 1, like=x),
    ]
    tp.send(x.T, 1)
    tp.wait_all([tp.isend(x, 1)])
    return results, ledger_rows(mesh.ledger)


def test_collectives_on_data_free_buffers_return_data_free_results_and_the_same_ledger() -> None:
    real, real_rows = group_calls(lambda a: a)
    free, free_rows = group_calls(like)
    assert free_rows == real_rows
    for r, f in zip(real, free, strict=True):
        assert isinstance(r, np.ndarray) and isinstance(f, MetaArray), type(f)
        assert (f.shape, f.dtype, f.flags.c_contiguous) == (r.shape, r.dtype, True)


def holds_no_values(trainer: Trainer) -> None:
    """Every array of the model state is a MetaArray: nothing was drawn or allocated."""
    update = trainer.update
    arrays = {f"param/{n}": p.data for n, p in trainer.model.params.items()}
    arrays.update(
        {f"optim/{k}": a for k, a in update.optimizer.state_dict().items() if k != "step"}
    )
    arrays.update({f"grad/{n}": g for n, g in update.last_grads.items() if g is not None})
    if update.masters is not None:
        arrays.update({f"master/{n}": t.data for n, t in update.masters.master.items()})
    assert any(k.startswith("optim/") for k in arrays) and any(
        k.startswith("grad/") for k in arrays
    )
    for key, a in arrays.items():
        assert meta.is_meta(a), key


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("name", ["dp2-zero2-bf16", "dp2xpp2-zero3", "tp2-sp", "dp2-fp16"])
def test_a_data_free_trainer_holds_no_values(name: str) -> None:
    config = case_config(name)
    layout = config.layout
    last = config.world_size - 1  # the last pipeline stage, which holds the loss
    trainer = build_trainer(
        config, virtual_mesh(layout.dp, layout.tp, layout.pp, layout.order, last), data_free=True
    )
    record = trainer.step(0)
    holds_no_values(trainer)
    # The values a step reports do not exist: NaN, and the update is taken (no overflow).
    assert math.isnan(record.loss) and math.isnan(record.grad_norm) and not record.skipped


# ---- ZeRO-3's own matmuls in the GEMM log ----------------------------------------------------
def step_gemms(overrides: list[str], data_free: bool) -> list[Gemm]:
    """The GEMM log of one step on dp rank 0 (pipeline rank 0) of the layout."""
    config = load(None, [*TINY, *overrides])
    layout = config.layout
    mesh: Mesh = virtual_mesh(layout.dp, layout.tp, layout.pp, layout.order, rank=0)
    trainer = build_trainer(config, mesh, data_free)
    with recording_gemms() as log:
        record = trainer.step(0)
    assert log.flops() == record.flops  # every matmul of the step is in the log
    return list(log.gemms)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize(
    "extra",
    [[], [*PP_M4, "parallel.schedule=zb-h1"], ["train.dtype=bf16"]],
    ids=["dp2", "dp2xpp2-zb-h1", "dp2-bf16"],
)
@pytest.mark.parametrize("data_free", [False, True], ids=["real", "data-free"])
def test_zero3_linears_log_the_gemms_of_the_whole_store(extra: list[str], data_free: bool) -> None:
    """`ShardedStore.linear` logs what `fused.linear` logs under plain data parallelism, in the
    same phases and order (the zero-bubble weight pass included) and dtypes."""
    layout = ["parallel.dp=2", *ODD, *extra]
    dense = step_gemms(layout, data_free)
    assert {g.phase for g in dense} == {"forward", "backward-input", "backward-weight"}
    assert step_gemms([*layout, "parallel.zero=3"], data_free) == dense


# ---- GPT-3 sizes -------------------------------------------------------------------------------
GPT3_TP8 = [
    "model.vocab_size=50304",  # GPT-3's vocabulary padded to a multiple of tp, as Megatron pads it
    "model.block_size=2048",
    "model.n_layer=2",
    "model.n_head=96",
    "model.n_embd=12288",
    "train.batch_size=1",
    "train.steps=1",
    "train.warmup_steps=0",
    "train.dtype=bf16",
    "data.source=synthetic",
    "parallel.tp=8",
]


def test_a_gpt3_sized_step_at_tp8_runs_data_free_in_a_few_mib() -> None:
    config = load(None, GPT3_TP8)
    tracemalloc.start()
    try:
        mesh = virtual_mesh(tp=8, rank=3)
        trainer = build_trainer(config, mesh, data_free=True)
        live = activation_meter.live
        activation_meter.reset_peak()
        record = trainer.step(0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak} bytes traced"
    holds_no_values(trainer)
    # Every weight, head and attention matmul is split 8 ways: an eighth of the model's FLOPs.
    tokens = config.train.batch_size * config.model.block_size
    assert record.flops * 8 == trainer.model.config.flops_per_token() * tokens
    memory = trainer.memory()
    closed = trainer.memory_closed_form()
    assert {k: memory[k] for k in closed} == closed
    # Simulated, not allocated: about a gigabyte of weights and of activations.
    assert memory["params"] > 10**9 and memory["activations_peak"] - live > 5 * 10**8
    assert mesh.ledger.calls("all_reduce", "tp", "forward") > 0
