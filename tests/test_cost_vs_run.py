"""The cost model's counts against executed runs, exactly: FLOPs, bytes per axis, model state.

Each layout trains a tiny GPT for two steps through the trainer `civetta train` uses
(tests/mpi_workers/cost_worker.py: the same Trainer, Runtime and metrics.json builder, without the
evaluation that follows training), and the analytic projection of the same config must give:

- FLOPs: `model_flops_per_step` = the matmul FLOPs the engine's meter counts without
  recomputation (and the trainer's `flops.model_per_step`); `hardware_flops_per_step` = the
  meter's count summed over ranks (`flops.hardware_per_step`), recomputation included;
- bytes per axis: `comm_bytes[axis]` = max over ranks of the ledger's `bytes` on that axis, per
  step, summed over every row except receives (a message is counted by its sender) and phase
  "other" (the loss averaged for the log: bookkeeping outside the step's arithmetic);
- model state: params, grads and optimizer bytes of `memory.per_rank`, rank by rank (pipeline
  position by position), and the projection's busiest GPU equal to the largest rank.

Float32 throughout except two mixed-precision runs, one of them under ZeRO-2 (bf16 is emulated
on float32 arrays, which the ledger counts at 2 bytes an element, as it counts the model state:
2 + 2 + 12 bytes per parameter, sharded as ZeRO says).
No wall-clock time is asserted here: predicted against measured step times is
benchmarks/bench_cost_local.py.
"""

from __future__ import annotations

import functools
import itertools
import re
from typing import Any

import closed_forms as closed
import pytest
from mpi_helpers import WORKERS, run_mpi_json

from civetta.models.gpt import GPTStage
from civetta.nn import merge
from launch.config import load, model_description
from launch.profiles import load_profile
from launch.simulate import framework_of, workload_of
from parallel.cost.projection import device_memory_of, project
from parallel.cost.stages import StagedModel
from parallel.layout import Layout

PROFILE = load_profile("a100-dgx")  # counts do not depend on the profile
STEPS = 2
TINY = [
    "model.vocab_size=256",
    "model.block_size=16",
    "model.n_layer=2",
    "model.n_head=4",
    "model.n_embd=32",
    "train.batch_size=8",
    f"train.steps={STEPS}",
    "train.warmup_steps=0",
    "data.source=synthetic",
    "train.dtype=float32",
]
# An odd hidden size, so dp does not divide the parameters and ZeRO pads its shards.
ODD = ["model.n_embd=36", "model.n_head=3"]

# A Llama of the same size: grouped-query attention (2 of 4 heads), SwiGLU 48 wide, untied.
LLAMA = ["model.kind=llama", "model.n_kv_head=2", "model.ffn_hidden=48"]

# A mixture of experts in the same Llama: 4 SwiGLU experts 24 wide, top-2, dropless, with the
# load-balancing loss (pooled over the microbatch).
MOE = [*LLAMA, "model.moe={experts: 4, top_k: 2, ffn_hidden: 24, aux_loss_coef: 0.01}"]

# name: (ranks, overrides)
LAYOUTS: dict[str, tuple[int, list[str]]] = {
    "single": (1, []),
    "single-full-recompute": (1, ["parallel.recompute=full"]),
    "single-selective-recompute": (1, ["parallel.recompute=selective"]),
    "single-bf16": (1, ["train.dtype=bf16"]),
    # civetta's flash kernel: causal tiles of 128 (the tiny block of 8 is one tile)
    "single-flash": (1, ["framework.attention=flash"]),
    "tp2-flash-full-recompute": (
        2,
        ["parallel.tp=2", "framework.attention=flash", "parallel.recompute=full"],
    ),
    "dp2": (2, ["parallel.dp=2", "parallel.bucket_mb=0.02"]),  # several gradient buckets
    "tp2": (2, ["parallel.tp=2"]),
    "tp2-full-recompute": (2, ["parallel.tp=2", "parallel.recompute=full"]),
    "tp2-sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "tp2-sp-untied-nobias": (
        2,
        [
            "parallel.tp=2",
            "parallel.sequence_parallel=true",
            "model.tie_embeddings=false",
            "model.bias=false",
        ],
    ),
    "pp2-1f1b-m4": (2, ["parallel.pp=2", "parallel.schedule=1f1b", "train.microbatch_size=2"]),
    "pp2-zb-h1-m4": (2, ["parallel.pp=2", "parallel.schedule=zb-h1", "train.microbatch_size=2"]),
    "pp2-interleaved-v2": (
        2,
        [
            "parallel.pp=2",
            "parallel.schedule=interleaved-1f1b",
            "parallel.virtual_stages=2",
            "model.n_layer=4",
            "train.microbatch_size=2",
        ],
    ),
    "dp2xtp2": (4, ["parallel.dp=2", "parallel.tp=2"]),
    "dp2-zero1": (2, ["parallel.dp=2", "parallel.zero=1", "parallel.bucket_mb=0.02", *ODD]),
    "dp2-zero2": (2, ["parallel.dp=2", "parallel.zero=2", *ODD]),
    "dp2-zero3-full-recompute": (
        2,
        ["parallel.dp=2", "parallel.zero=3", "parallel.recompute=full", *ODD],
    ),
    "dp2xtp2-zero3": (4, ["parallel.dp=2", "parallel.tp=2", "parallel.zero=3"]),
    "dp2-zero2-bf16": (2, ["parallel.dp=2", "parallel.zero=2", "train.dtype=bf16", *ODD]),
    "dp2xpp2-zero3": (
        4,
        ["parallel.dp=2", "parallel.pp=2", "parallel.zero=3", "train.microbatch_size=2", *ODD],
    ),
    # Zero-bubble and V-shaped schedules, uneven stages (untied: a V puts both ends on rank 0).
    "pp2-zb-h2-m4": (2, ["parallel.pp=2", "parallel.schedule=zb-h2", "train.microbatch_size=2"]),
    "pp2-zb-v-m4": (
        2,
        [
            "parallel.pp=2",
            "parallel.schedule=zb-v",
            "train.microbatch_size=2",
            "model.tie_embeddings=false",
            "model.n_layer=4",
        ],
    ),
    "pp2-dualpipev-m4": (
        2,
        [
            "parallel.pp=2",
            "parallel.schedule=dualpipev",
            "train.microbatch_size=2",
            "model.tie_embeddings=false",
            "model.n_layer=4",
        ],
    ),
    "pp2-uneven-3-layers": (2, ["parallel.pp=2", "model.n_layer=3", "train.microbatch_size=2"]),
    "pp2-zb-v-tied-m4": (
        2,
        ["parallel.pp=2", "parallel.schedule=zb-v", "train.microbatch_size=2", "model.n_layer=4"],
    ),
    # Context parallelism: a ring, all-gathered keys and values, all-to-all (block 16: 2·cp
    # chunks of 4 tokens), and with dp (gradients averaged over dp × cp).
    "llama-cp2-ring": (2, [*LLAMA, "parallel.cp=2"]),
    "llama-cp2-all-gather-unbalanced": (
        2,
        [*LLAMA, "parallel.cp=2", "parallel.cp_comm=all_gather", "parallel.cp_balance=false"],
    ),
    "gpt-cp2-a2a-dp2-zero1": (
        4,
        ["parallel.cp=2", "parallel.cp_comm=a2a", "parallel.dp=2", "parallel.zero=1"],
    ),
    "llama-single-selective-recompute": (1, [*LLAMA, "parallel.recompute=selective"]),
    "llama-tp2-sp": (2, [*LLAMA, "parallel.tp=2", "parallel.sequence_parallel=true"]),
    "llama-pp2-1f1b-m4": (2, [*LLAMA, "parallel.pp=2", "train.microbatch_size=2"]),
    "llama-dp2-zero3": (2, [*LLAMA, "parallel.dp=2", "parallel.zero=3"]),
    # Expert parallelism: all-to-all over ep, expert gradients over edp, ZeRO over both groups.
    "moe-single": (1, MOE),
    "moe-dp2-ep2": (2, [*MOE, "parallel.dp=2", "parallel.ep=2"]),
    "moe-dp4-ep2-zero1": (4, [*MOE, "parallel.dp=4", "parallel.ep=2", "parallel.zero=1"]),
    "moe-dp2-ep2-zero3": (2, [*MOE, "parallel.dp=2", "parallel.ep=2", "parallel.zero=3"]),
    "moe-dp4-ep2-zero3": (4, [*MOE, "parallel.dp=4", "parallel.ep=2", "parallel.zero=3"]),
    "moe-dp2-ep2-tp2-sp": (
        4,
        [
            *MOE,
            "parallel.dp=2",
            "parallel.ep=2",
            "parallel.tp=2",
            "parallel.sequence_parallel=true",
        ],
    ),
    "moe-dp2-ep2-pp2": (
        4,
        [*MOE, "parallel.dp=2", "parallel.ep=2", "parallel.pp=2", "train.microbatch_size=2"],
    ),
}


@functools.cache
def executed(name: str) -> dict[str, Any]:
    """metrics.json of the layout's run (each layout runs once per session)."""
    ranks, overrides = LAYOUTS[name]
    return run_mpi_json(ranks, [str(WORKERS / "cost_worker.py"), *TINY, *overrides], timeout=90)


def projected(name: str) -> tuple[Any, Any]:
    config = load(None, [*TINY, *LAYOUTS[name][1]])
    framework = framework_of(config, PROFILE)  # civetta's executor, its attention kernel
    return config, project(
        model_description(config), config.layout, PROFILE, framework, workload_of(config)
    )


def ledger_bytes(metrics: dict[str, Any], axis: str, busiest: bool = True) -> float:
    """The ledger convention of `Projection.comm_bytes`: per step, the busiest rank (or the
    mean over ranks)."""
    per_rank = [
        sum(
            row["bytes"]
            for row in rank["ops"]
            if row["axis"] == axis and row["op"] != "recv" and row["phase"] != "other"
        )
        for rank in metrics["comm"]["per_rank"]
    ]
    total = max(per_rank) if busiest else sum(per_rank) / len(per_rank)
    return total / len(metrics["steps"])


@pytest.mark.parametrize("name", LAYOUTS)
def test_flops_equal_the_engines_meter(name: str) -> None:
    metrics = executed(name)
    config, projection = projected(name)
    assert projection.hardware_flops_per_step == metrics["flops"]["hardware_per_step"]
    assert projection.model_flops_per_step == metrics["flops"]["model_per_step"]
    ring = config.parallel.cp > 1 and config.parallel.cp_comm == "ring"
    ring = ring or config.framework.attention == "flash"
    if ring:  # the ring's backward recomputes each block's scores, as flash attention does
        assert projection.hardware_flops_per_step > projection.model_flops_per_step
    elif config.parallel.recompute == "none":
        assert projection.model_flops_per_step == projection.hardware_flops_per_step
    else:
        assert projection.hardware_flops_per_step > projection.model_flops_per_step


@pytest.mark.parametrize("name", LAYOUTS)
def test_bytes_per_axis_equal_the_ledger(name: str) -> None:
    metrics = executed(name)
    _, projection = projected(name)
    measured = {axis: ledger_bytes(metrics, axis) for axis in ("tp", "pp", "dp", "cp", "ep")}
    # The projection routes evenly (its routing assumption): each rank sends and receives the
    # mean, which is what the ranks moved on average; a real router loads some ranks more.
    measured["ep"] = ledger_bytes(metrics, "ep", busiest=False)
    assert projection.comm_bytes == measured
    # What the convention leaves out: the loss mean for the log, 16 bytes (sum and count) a call.
    for rank in metrics["comm"]["per_rank"]:
        for row in rank["ops"]:
            if row["phase"] == "other":
                assert row["op"] == "all_reduce" and row["bytes"] == 16 * row["calls"]


@pytest.mark.parametrize("name", LAYOUTS)
def test_model_state_bytes_equal_the_run(name: str) -> None:
    metrics = executed(name)
    config, projection = projected(name)
    layout, work, model = config.layout, workload_of(config), model_description(config)
    keys = ("params", "grads", "optimizer")
    ranks = metrics["memory"]["per_rank"]
    if layout.zero == 0:  # replicas are identical: compare every rank with its position
        for rank in ranks:
            position = layout.mesh.coords_of(rank["rank"])["pp"]
            expected = device_memory_of(model, layout, position, work).as_dict()
            assert {k: rank[k] for k in keys} == {k: expected[k] for k in keys}
    else:  # ZeRO shards differ by their padding: the busiest rank of each pipeline position
        for position in range(layout.pp):
            here = [r for r in ranks if layout.mesh.coords_of(r["rank"])["pp"] == position]
            busiest = max(here, key=lambda r: sum(r[k] for k in keys))
            expected = device_memory_of(model, layout, position, work).as_dict()
            assert {k: busiest[k] for k in keys} == {k: expected[k] for k in keys}
        if layout.pp == 1:
            assert {k: projection.memory_per_gpu[k] for k in keys} == {k: expected[k] for k in keys}


def schedule(v: int) -> str:
    return "interleaved-1f1b" if v > 1 else "1f1b"


@pytest.mark.parametrize(
    ("tie", "bias", "pp", "v"),
    [(t, b, pp, v) for t, b in itertools.product([True, False], repeat=2) for pp, v in
     ((1, 1), (2, 1), (2, 2))],
)  # fmt: skip
def test_gradient_buckets_see_the_models_parameters_in_order(
    tie: bool, bias: bool, pp: int, v: int
) -> None:
    """The traced model (what the projection plans buckets and ZeRO shards from) lists each
    pipeline rank's parameters as the trainer merges them: same names, sizes and order; and so
    does the papers' closed form."""
    config = load(
        None, [*TINY, "model.n_layer=4", f"model.tie_embeddings={str(tie).lower()}",
               f"model.bias={str(bias).lower()}"],
    )  # fmt: skip
    model = model_description(config)
    stages = pp * v
    layout = Layout(pp=pp, virtual_stages=v, microbatches=pp, schedule=schedule(v))
    layers = layout.stage_layers(model.n_layer)
    for rank in range(pp):
        mine = [
            GPTStage(model, layers[s], first=s == 0, last=s == stages - 1)
            for s in range(rank, stages, pp)
        ]
        actual = [(name, t.data.size) for name, t in merge(*mine).items()]
        layout = Layout(pp=pp, virtual_stages=v, microbatches=pp, schedule=schedule(v))
        traced = StagedModel(model, layout, "float32", model.block_size).device_params(rank)
        # One block is traced (as transformer.h.0) and stands for each of the stage's blocks.
        unnumbered = [(re.sub(r"\.h\.\d+\.", ".h.0.", name), n) for name, n in actual]
        assert [(x.name, x.elements) for x in traced] == unnumbered
        assert closed.device_tensors(model, 1, pp, rank, v) == actual


@pytest.mark.parametrize("name", [n for n in LAYOUTS if "zero3" in n])
def test_zero3_collectives_per_op_equal_the_ledger_calls(name: str) -> None:
    """The time of ZeRO-3 counts one latency per op: as many collectives as the run makes."""
    metrics = executed(name)
    config, _ = projected(name)
    layout, model = config.layout, model_description(config)
    staged = StagedModel(model, layout, config.train.dtype, model.block_size)
    for rank in metrics["comm"]["per_rank"]:
        position = rank["rank"] // (layout.tp * layout.dp)  # order tp-dp-pp
        edp = layout.dp * layout.cp // layout.ep  # the experts' group: one rank issues none
        ops = [
            (piece_op, count)
            for piece, count in staged.device_pieces(position)
            for piece_op, _, _, group in piece.sharded_ops
            if group == "dp" or edp > 1
        ]
        m = layout.microbatches
        expected = {
            op: m * sum(count for piece_op, count in ops if piece_op == op)
            for op in ("all_gather", "reduce_scatter")
        }
        calls = dict.fromkeys(expected, 0)
        for row in rank["ops"]:
            if row["axis"] == "dp" and row["op"] in expected:
                calls[row["op"]] += row["calls"] // len(metrics["steps"])
        assert calls == expected


@pytest.mark.parametrize(
    ("tp", "extra"),
    [(1, []), (1, ["model.bias=false"]), (2, []), (2, ["parallel.sequence_parallel=true"]),
     (2, ["model.bias=false", "model.tie_embeddings=false"])],
)  # fmt: skip
def test_engine_nodes_equal_the_graph_the_run_builds(tp: int, extra: list[str]) -> None:
    """The fixed cost of op dispatch scales with the graph nodes a layout builds (one microbatch
    per step here: the whole batch)."""
    counts = {}
    for layers in (1, 2):
        overrides = [*TINY, f"model.n_layer={layers}", f"parallel.tp={tp}", *extra]
        worker = str(WORKERS / "nodes_worker.py")
        counts[layers] = run_mpi_json(tp, [worker, *overrides], timeout=90)["nodes"]
    config = model_description(load(None, [*TINY, *extra]))
    layout = Layout(tp=tp, sequence_parallel="parallel.sequence_parallel=true" in extra)
    staged = StagedModel(config, layout, "float32", config.block_size)
    block = staged.piece("block").forward.nodes
    rest = staged.piece("whole").forward.nodes
    assert counts[1] == [block + rest] * tp
    assert counts[2] == [2 * block + rest] * tp
