"""The virtual mesh (parallel/virtual.py) against the arithmetic of the mesh, the ledger rules of
parallel/comm.py, and executed runs.

The key check: one training step of a tiny GPT, run by the real `Trainer` on a virtual mesh for
every rank of a layout in this one process, records the ledger rows, matmul FLOPs and model state
of the same rank in an executed `mpiexec` run of the same config and step. Values computed on a
virtual mesh are meaningless (received buffers are zeros), so losses are never compared. The
same step run data-free (`Trainer(..., data_free=True)`: shape-only parameters and token ids,
`civetta.meta`) must record the same, exactly; tests/test_data_free_run.py checks the rest.

The executed side is tests/mpi_workers/ledger_worker.py, which imports `case_mesh_shape` and
`case_payload` from here: both sides build the trainer with `build_trainer`, the one place that
knows how a Runtime and a Trainer are constructed.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from mpi_helpers import run_worker

from civetta import activation_meter
from launch.config import ExperimentConfig, load
from launch.trainer import Trainer
from parallel.comm import CommError, Ledger
from parallel.mesh import AXES, Mesh, MeshLayout
from parallel.pipeline import PipelineExecutor
from parallel.runtime import Runtime
from parallel.schedules import make_schedule
from parallel.virtual import VirtualComm, VirtualRequest, virtual_mesh

TINY = [
    "model.vocab_size=256",
    "model.block_size=16",
    "model.n_layer=2",
    "model.n_head=4",
    "model.n_embd=32",
    "train.batch_size=8",
    "train.steps=1",
    "train.warmup_steps=0",
    "data.source=synthetic",
    "train.dtype=float32",
]
# An odd hidden size, so dp does not divide the parameters and ZeRO pads its shards.
ODD = ["model.n_embd=36", "model.n_head=3"]
PP_M4 = ["parallel.pp=2", "train.microbatch_size=2"]
# A Llama of the same size: grouped-query attention (2 of 4 heads), SwiGLU 48 wide.
LLAMA = ["model.kind=llama", "model.n_kv_head=2", "model.ffn_hidden=48"]

# name: overrides of TINY (the world size follows from them)
LAYOUTS: dict[str, list[str]] = {
    "dp2": ["parallel.dp=2", "parallel.bucket_mb=0.02"],  # several gradient buckets
    "tp2": ["parallel.tp=2"],
    "tp2-sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "tp2-full-recompute": ["parallel.tp=2", "parallel.recompute=full"],
    "pp2-1f1b-m4": [*PP_M4, "parallel.schedule=1f1b"],
    "pp2-zb-h1-m4": [*PP_M4, "parallel.schedule=zb-h1"],
    "pp2-gpipe-m4": [*PP_M4, "parallel.schedule=gpipe"],
    "pp2-interleaved-v2-m4": [
        *PP_M4,
        "model.n_layer=4",
        "parallel.schedule=interleaved-1f1b",
        "parallel.virtual_stages=2",
    ],
    "dp2xpp2-zero2-zb-h1-bf16": [
        "parallel.dp=2",
        *PP_M4,
        "parallel.schedule=zb-h1",
        "parallel.zero=2",
        "train.dtype=bf16",
    ],
    "dp2-zero1": ["parallel.dp=2", "parallel.zero=1", "parallel.bucket_mb=0.02", *ODD],
    "dp2-zero2": ["parallel.dp=2", "parallel.zero=2", *ODD],
    "dp2-zero3": ["parallel.dp=2", "parallel.zero=3", *ODD],
    "dp2-zero3-full-recompute": [
        "parallel.dp=2",
        "parallel.zero=3",
        "parallel.recompute=full",
        *ODD,
    ],
    "dp2-zero2-bf16": ["parallel.dp=2", "parallel.zero=2", "train.dtype=bf16", *ODD],
    "dp2xtp2": ["parallel.dp=2", "parallel.tp=2"],
    "dp2xtp2-dp-first": ["parallel.dp=2", "parallel.tp=2", "parallel.order=dp-tp-pp"],
    "dp2xpp2-zero3": ["parallel.dp=2", *PP_M4, "parallel.zero=3", *ODD],
    "dp2-fp16": ["parallel.dp=2", "train.dtype=fp16"],  # loss scaling's overflow all-reduce
    "tp2-selective-recompute": ["parallel.tp=2", "parallel.recompute=selective"],
    "pp2-zb-v-m4-untied": [
        *PP_M4,
        "parallel.schedule=zb-v",
        "model.n_layer=4",
        "model.tie_embeddings=false",
    ],
    "pp2-dualpipev-m4-untied": [
        *PP_M4,
        "parallel.schedule=dualpipev",
        "model.n_layer=4",
        "model.tie_embeddings=false",
    ],
    "pp2-zb-h2-m4-uneven": [*PP_M4, "parallel.schedule=zb-h2", "model.n_layer=3"],
    "llama-cp2-ring": [*LLAMA, "parallel.cp=2"],
    "llama-cp2-all-gather-dp2-zero2": [
        *LLAMA,
        "parallel.cp=2",
        "parallel.cp_comm=all_gather",
        "parallel.dp=2",
        "parallel.zero=2",
    ],
    "gpt-cp2-a2a-unbalanced-tp2-sp": [
        "parallel.cp=2",
        "parallel.cp_comm=a2a",
        "parallel.cp_balance=false",
        "parallel.tp=2",
        "parallel.sequence_parallel=true",
    ],
    "llama-dp2xtp2-sp": [
        *LLAMA,
        "parallel.dp=2",
        "parallel.tp=2",
        "parallel.sequence_parallel=true",
    ],
    "llama-dp2xpp2-zero3": [*LLAMA, "parallel.dp=2", *PP_M4, "parallel.zero=3"],
    "llama-tied-pp2-1f1b-m4": [*LLAMA, *PP_M4, "model.tie_embeddings=true"],
}
COLLECTIVES = (2, 2, 1, "tp-dp-pp")  # the mesh of the "collectives" case
MEMORY_KEYS = ("params", "grads", "optimizer", "params_gathered_peak")


# ---- the cases, shared with tests/mpi_workers/ledger_worker.py ---------------------------------
def case_config(name: str) -> ExperimentConfig:
    return load(None, [*TINY, *LAYOUTS[name]])


def case_mesh_shape(name: str) -> tuple[int, int, int, str, int]:
    """(dp, tp, pp, order, cp) of the case's mesh."""
    if name == "collectives":
        return (*COLLECTIVES, 1)
    layout = case_config(name).layout
    return layout.dp, layout.tp, layout.pp, layout.order, layout.cp


def build_trainer(config: ExperimentConfig, mesh: Mesh, data_free: bool = False) -> Trainer:
    """The Runtime and Trainer of `config` on `mesh`: the one place that constructs them."""
    return Trainer(config, Runtime(config.layout, mesh), data_free=data_free)


def ledger_rows(ledger: Ledger) -> list[dict[str, Any]]:
    """The ledger without its wall-clock seconds, which no two runs share."""
    return [{k: v for k, v in row.items() if k != "time_s"} for row in ledger.as_list()]


def trained_payload(
    config: ExperimentConfig, mesh: Mesh, data_free: bool = False
) -> dict[str, Any]:
    """One training step's ledger, matmul FLOPs and model state on this rank."""
    trainer = build_trainer(config, mesh, data_free)
    live = activation_meter.live  # what earlier cases in this process left alive
    activation_meter.reset_peak()
    record = trainer.step(0)
    memory = trainer.memory()
    return {
        "ledger": ledger_rows(mesh.ledger),
        "flops": record.flops,
        "memory": {key: memory[key] for key in MEMORY_KEYS},
        "activations_peak": memory["activations_peak"] - live,
    }


def collective_calls(mesh: Mesh) -> dict[str, Any]:
    """Every Group call once or more, on a dp=2 × tp=2 mesh; the ledger and the result shapes."""
    ledger = mesh.ledger
    tp, dp, world = mesh.group("tp"), mesh.group("dp"), mesh.world
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    results: list[np.ndarray] = []
    with ledger.phase("forward"):
        results.append(tp.all_reduce(x))
        odd = np.ones(7)  # 7 elements over 2 ranks: the ring's chunk is rounded up
        results.append(dp.all_reduce(odd, out=odd))
        results.append(world.all_reduce(x.T, op="max"))  # not contiguous
        results.append(tp.all_gather(x))
        results.append(tp.all_gather(x, axis=1))
    with ledger.phase("backward"):
        results.append(tp.reduce_scatter(np.ones((4, 6), np.float32)))
        results.append(tp.reduce_scatter(np.ones((4, 6), np.float32), axis=1))
        results.append(dp.broadcast(np.zeros(5, np.int64), root=1))
    with ledger.phase("optimizer"):
        ledger.float32_itemsize = 2  # bf16 emulated on float32: counted at 2 bytes
        results.append(world.all_gather(x))
        ledger.float32_itemsize = 4
    if tp.rank == 0:
        tp.send(x, 1, tag=3)
        requests = [tp.isend(x, 1, tag=4)]
        tp.wait_all(requests)
        assert not requests
    else:
        results.append(tp.recv(x.shape, x.dtype, 0, tag=3))
        results.append(tp.recv(x.shape, x.dtype, 0, tag=4))
    return {
        "ledger": ledger_rows(ledger),
        "results": [[list(r.shape), r.dtype.str] for r in results],
    }


def case_payload(name: str, mesh: Mesh, data_free: bool = False) -> dict[str, Any]:
    """What the case records on this rank, as JSON values (what the worker prints); a
    training case runs data-free (`civetta.meta`) when asked."""
    if name == "collectives":
        payload = collective_calls(mesh)
    else:
        payload = trained_payload(case_config(name), mesh, data_free)
    return json.loads(json.dumps(payload))


def virtual_payloads(name: str, data_free: bool = False) -> list[dict[str, Any]]:
    """The case on a virtual mesh, for every world rank in turn, in this process."""
    dp, tp, pp, order, cp = case_mesh_shape(name)
    return [
        case_payload(name, virtual_mesh(dp, tp, pp, order, rank, cp=cp), data_free)
        for rank in range(dp * tp * pp * cp)
    ]


@functools.cache
def executed(world_size: int) -> dict[str, list[dict[str, Any]]]:
    """Every case of `world_size` ranks, executed in one mpiexec launch (once per session)."""
    names = [n for n in LAYOUTS if case_config(n).world_size == world_size]
    if world_size == 4:
        names.append("collectives")
    return run_worker(world_size, "ledger_worker", *names, timeout=90)


# ---- the virtual communicator ------------------------------------------------------------------
ORDERS = ["-".join(p) for p in itertools.permutations(AXES)]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("sizes", [(2, 3, 2), (4, 1, 1), (1, 2, 2), (2, 2, 1), (1, 1, 1)])
def test_groups_have_the_sizes_and_ranks_of_the_layout(
    sizes: tuple[int, int, int], order: str
) -> None:
    dp, tp, pp = sizes
    layout = MeshLayout(dp, tp, pp, order)
    for rank in range(layout.world_size):
        mesh = virtual_mesh(dp, tp, pp, order, rank)
        assert mesh.rank == rank and mesh.world_size == layout.world_size
        assert mesh.coords == layout.coords_of(rank)
        for axis in AXES:
            group = mesh.group(axis)
            assert group.size == layout.size(axis)
            assert group.rank == layout.coords_of(rank)[axis]
            assert group.ranks == layout.group_ranks(axis, rank)
        mesh.close()


def test_split_refuses_what_a_mesh_would_not_ask() -> None:
    with pytest.raises(CommError, match="outside"):
        VirtualComm(4, 4)
    with pytest.raises(CommError, match="without a mesh layout"):
        VirtualComm(4, 0).Split(0, 0)
    comm = VirtualComm(4, 1, MeshLayout(dp=2, tp=2))
    with pytest.raises(CommError, match="names no mesh axis"):
        comm.Split(0, 0)  # rank 1's tp group starts at 0, but its tp index is 1, not 0


def test_collectives_fill_outputs_as_if_every_rank_held_this_ranks_data() -> None:
    mesh = virtual_mesh(tp=4, rank=1)
    tp = mesh.group("tp")
    x = np.arange(8, dtype=np.float64).reshape(4, 2)
    np.testing.assert_array_equal(tp.all_reduce(x), x)
    y = x.copy()
    assert tp.all_reduce(y, out=y) is y
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(tp.all_gather(x), np.concatenate([x] * 4))
    np.testing.assert_array_equal(tp.all_gather(x, axis=1), np.concatenate([x] * 4, axis=1))
    np.testing.assert_array_equal(tp.reduce_scatter(x), x[1:2])  # this rank's chunk
    np.testing.assert_array_equal(tp.reduce_scatter(x.T, axis=1), x.T[:, 1:2])
    np.testing.assert_array_equal(tp.broadcast(x, root=3), x)
    received = tp.recv((3, 5), np.float32, source=0)
    assert received.dtype == np.float32 and not received.any()
    requests = [tp.isend(x, 2), tp.isend(x, 3)]
    tp.wait_all(requests)
    assert requests == []


def test_a_fill_can_be_swapped() -> None:
    calls: list[tuple[tuple[int, ...], bool]] = []

    def fill(out: Any, source: Any) -> None:
        calls.append((out.shape, source is None))

    mesh = virtual_mesh(tp=2, rank=0, fill=fill)
    tp = mesh.group("tp")
    tp.all_gather(np.ones(3))
    tp.recv((2,), np.float64, 1)
    assert calls == [((2, 3), False), ((2,), True)]


@pytest.mark.parametrize("itemsize", [4, 2])
def test_ledger_rows_follow_the_rules_of_parallel_comm(itemsize: int) -> None:
    """The rules of parallel/comm.py's docstring, for a group of n = 3 that does not divide the
    all-reduced buffer (N = 10 elements of e bytes, S = N·e)."""
    n, e = 3, itemsize
    mesh = virtual_mesh(dp=n, rank=1)
    mesh.ledger.float32_itemsize = itemsize
    dp = mesh.group("dp")
    x = np.ones(10, np.float32)
    dp.all_reduce(x)
    dp.all_gather(x)
    dp.reduce_scatter(np.ones((3, 5), np.float32))  # 15 elements, one chunk of 5 each
    dp.broadcast(x)
    dp.send(x, 0)
    dp.wait_all([dp.isend(x, 2)])
    dp.recv((10,), np.float32, 2)
    s = 10 * e  # S, the buffer's bytes
    rows = {r["op"]: (r["bytes"], r["wire_bytes"], r["calls"]) for r in ledger_rows(mesh.ledger)}
    assert rows == {
        "all_reduce": (s, 2 * (n - 1) * -(-10 // n) * e, 1),
        "all_gather": (s, (n - 1) * s, 1),
        "reduce_scatter": (15 * e, (n - 1) * 5 * e, 1),
        "broadcast": (s, s, 1),
        "send": (2 * s, 2 * s, 2),
        "recv": (s, 0, 1),
    }
    assert {r["axis"] for r in ledger_rows(mesh.ledger)} == {"dp"}


def test_groups_of_one_rank_record_nothing() -> None:
    mesh = virtual_mesh(pp=2, rank=0)
    x = np.ones(4)
    assert mesh.group("tp").all_reduce(x) is x
    assert mesh.ledger.as_list() == []


def test_request_completion() -> None:
    requests = [VirtualRequest(), VirtualRequest()]
    VirtualRequest.Waitall(requests)
    assert all(r.completed for r in requests)


def test_a_virtual_mesh_never_imports_mpi4py() -> None:
    """Importing mpi4py initialises MPI and flips `launched_by_mpi()`; a fresh interpreter tells
    whether anything did."""
    code = (
        "import sys, numpy as np\n"
        "from parallel.virtual import virtual_mesh\n"
        "from parallel.comm import launched_by_mpi\n"
        "m = virtual_mesh(dp=2, tp=2, pp=2, rank=5)\n"
        "g = m.group('pp')\n"
        "g.all_reduce(np.ones(3)); g.reduce_scatter(np.ones(4)); g.all_gather(np.ones(2))\n"
        "g.wait_all([g.isend(np.ones(2), 0)]); g.recv((2,), np.float64, 0)\n"
        "print('mpi4py' in sys.modules, launched_by_mpi())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI", "OMPI"))}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize(("schedule", "v"), [("1f1b", 1), ("zb-h1", 1), ("interleaved-1f1b", 2)])
def test_the_executor_runs_one_ranks_schedule_without_peers(schedule: str, v: int) -> None:
    """Receives return zeros at once; every send and receive of the schedule is recorded."""
    from civetta.models.gpt import GPTStage
    from launch.config import model_description

    config = load(None, [*TINY, "model.n_layer=4"])
    model = model_description(config)
    pp, micro, shape = 2, 4, (2, 16, 32)  # (micro, T, C)
    sched = make_schedule(schedule, pp, micro, v)
    layers = [range(s, s + 1) for s in range(pp * v)]
    x = [np.zeros((2, 16), np.int64)] * micro
    for rank in range(pp):
        mesh = virtual_mesh(pp=pp, rank=rank)
        stages = {
            s: GPTStage(model, layers[s], first=s == 0, last=s == pp * v - 1)
            for s in range(rank, pp * v, pp)
        }
        executor = PipelineExecutor(sched, stages, mesh.group("pp"), shape, np.float32)
        losses, _ = executor.run(x, x, 1.0 / micro)
        assert len(losses) == (micro if rank == (pp * v - 1) % pp else 0)
        actions = sched.actions[rank]
        message = int(np.prod(shape)) * 4
        for op, kinds in (("send", ("SEND_F", "SEND_B")), ("recv", ("RECV_F", "RECV_B"))):
            count = sum(a.kind in kinds for a in actions)
            assert mesh.ledger.calls(op, "pp") == count
            assert mesh.ledger.bytes(op, "pp") == count * message


# ---- virtual against executed --------------------------------------------------------------------
def test_collective_ledgers_equal_an_executed_run() -> None:
    assert virtual_payloads("collectives") == executed(4)["collectives"]


# Rank 0 of a pipeline holds no loss: mean_loss divides the 0/0 that a virtual all-reduce of
# [sum, count] = [0, 0] returns (the executed run adds the last stage's numbers). Only the loss is
# wrong; its ledger row is the same.
# Data-free, the same step runs on shapes alone (`Trainer(data_free=True)`): parameters and
# token ids are MetaArrays, nothing is drawn or computed, and the records must still be equal.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("data_free", [False, True], ids=["real", "data-free"])
@pytest.mark.parametrize("name", LAYOUTS)
def test_a_virtual_step_records_what_an_executed_step_records(name: str, data_free: bool) -> None:
    config = case_config(name)
    runs = executed(config.world_size)[name]
    virtual = virtual_payloads(name, data_free)
    for rank, (mine, theirs) in enumerate(zip(virtual, runs, strict=True)):
        assert mine["ledger"] == theirs["ledger"], f"rank {rank}"
        assert mine["flops"] == theirs["flops"], f"rank {rank}"
        assert mine["memory"] == theirs["memory"], f"rank {rank}"
        assert mine["activations_peak"] == theirs["activations_peak"], f"rank {rank}"
    # Nothing vacuous: a layout of more than one rank records traffic on each of its axes.
    axes = {row["axis"] for rank in virtual for row in rank["ledger"]}
    wanted = {a for a in AXES if getattr(config.layout, a) > 1}
    assert wanted <= axes
