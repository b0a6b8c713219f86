"""ZeRO stages 1–3 compute what plain data parallelism computes, and cost what the paper says.

Each layout trains a tiny GPT for 3 AdamW steps in float64 under `mpiexec` (with a timeout);
ZeRO's per-step losses, gradient norms, gradients (gathered from the shards) and final
parameters must match plain DP on the same mesh. Every rank's model-state bytes must equal the
closed forms of `parallel.zero.model_state_bytes`, and those must be DeepSpeed's Ψ/dp figures
where dp divides every bucket and parameter. The ledger's ring wire bytes on the dp axis must be
plain DP's for stages 1 and 2 and 1.5 times plain DP's for stage 3.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest
from mpi_helpers import WORKERS, run_mpi

from civetta.models.gpt import GPT
from civetta.tensor import Tensor
from launch.config import load
from launch.trainer import Trainer, model_description
from parallel.runtime import Runtime
from parallel.virtual import virtual_mesh
from parallel.zero import model_state_bytes

TINY = [
    "model.block_size=16",
    "model.n_layer=2",
    "model.n_head=4",
    "model.n_embd=32",
    "train.batch_size=8",
    "train.steps=3",
    "train.eval_batches=1",
    "train.dtype=float64",
    "data.source=synthetic",
]
UNTIED = ("model.tie_embeddings=false",)
PHASES = ("forward", "backward", "optimizer")  # a step's traffic ("other": the loss report)

Run = Callable[..., dict]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """`run(dp, tp=1, pp=1, zero=0, *extra)`: the worker's outputs, each layout run once."""
    tmp = tmp_path_factory.mktemp("zero")
    cache: dict[tuple, dict] = {}

    def launch(dp: int, tp: int = 1, pp: int = 1, zero: int = 0, *extra: str) -> dict:
        key = (dp, tp, pp, zero, *extra)
        if key not in cache:
            out = tmp / f"run{len(cache)}.npz"
            sizes = [f"parallel.dp={dp}", f"parallel.tp={tp}", f"parallel.pp={pp}"]
            overrides = [*TINY, *sizes, f"parallel.zero={zero}", *extra]
            args = [str(WORKERS / "train_worker.py"), str(out), *overrides]
            if dp * tp * pp == 1:
                subprocess.run([sys.executable, *args], check=True, timeout=60)
            else:
                run_mpi(dp * tp * pp, args, timeout=60)
            with np.load(out, allow_pickle=False) as data:
                cache[key] = {name: data[name] for name in data.files}
        return cache[key]

    return launch


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def assert_same_training(run: dict, ref: dict) -> None:
    assert relative_error(run["loss"], ref["loss"]) < 1e-10, (run["loss"], ref["loss"])
    assert relative_error(run["grad_norm"], ref["grad_norm"]) < 1e-10
    grad_keys = sorted(k for k in ref if k.startswith("grad."))
    assert grad_keys and grad_keys == sorted(k for k in run if k.startswith("grad."))
    for key in grad_keys:
        scale = np.max(np.abs(ref[key])) + 1e-30
        assert np.max(np.abs(run[key] - ref[key])) / scale < 1e-9, key
    for key in (k for k in ref if k.startswith("param.")):
        np.testing.assert_allclose(run[key], ref[key], rtol=1e-10, atol=1e-13, err_msg=key)


SP = ("parallel.sequence_parallel=true",)
ZB = ("parallel.schedule=zb-h1", "train.microbatch_size=2")
INTERLEAVED = (
    "parallel.schedule=interleaved-1f1b", "parallel.virtual_stages=2", "model.n_layer=4",
    "train.microbatch_size=2",
)  # fmt: skip
# (dp, tp, pp, zero, extra overrides): every stage at dp 2 and 4 and with tp=2; stage 3 with
# sequence parallelism; every stage with pp=2 (1F1B), stages 2 and 3 under zb-h1 (which defers
# weight gradients: stage 3 reduce-scatters them in the weight pass) and stage 3 interleaved.
CASES = [
    *((2, 1, 1, zero, ()) for zero in (1, 2, 3)),
    *((4, 1, 1, zero, UNTIED) for zero in (1, 2, 3)),
    *((2, 2, 1, zero, ()) for zero in (1, 2, 3)),
    (2, 2, 1, 3, SP),
    *((2, 1, 2, zero, ()) for zero in (1, 2, 3)),
    (2, 1, 2, 2, ZB),
    (2, 1, 2, 3, ZB),
    (2, 1, 2, 3, INTERLEAVED),
]


def case_id(case: tuple) -> str:
    dp, tp, pp, zero, extra = case
    tags = {SP: "-sp", UNTIED: "-untied", ZB: "-zb-h1", INTERLEAVED: "-interleaved"}.get(extra, "")
    return f"zero{zero}-dp{dp}-tp{tp}-pp{pp}{tags}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_zero_matches_plain_data_parallelism(run: Run, case: tuple) -> None:
    dp, tp, pp, zero, extra = case
    assert_same_training(run(dp, tp, pp, zero, *extra), run(dp, tp, pp, 0, *extra))


# ---- mixed precision: float32 masters and Adam state sharded ------------------------------------
@pytest.mark.parametrize(("zero", "dtype"), [(1, "bf16"), (2, "bf16"), (3, "bf16"), (1, "fp16")])
def test_zero_with_mixed_precision_matches_plain_data_parallelism(
    run: Run, zero: int, dtype: str
) -> None:
    """Stages 1 and 2 reduce the same rounded gradients as plain DP and round the same masters:
    bitwise the same training. Stage 3 sums each rank's rounded gradients too, but the tied
    embedding's two uses are reduced apart (a float32 sum in another order), so after an update
    a weight may land one bf16 step away: the losses stay within 1e-3."""
    extra = (f"train.dtype={dtype}",)
    mixed, plain = run(2, 1, 1, zero, *extra), run(2, 1, 1, 0, *extra)
    if zero < 3:
        assert_same_training(mixed, plain)
    else:
        np.testing.assert_allclose(mixed["loss"], plain["loss"], rtol=1e-3)
        np.testing.assert_allclose(mixed["grad_norm"][0], plain["grad_norm"][0], rtol=1e-6)
        np.testing.assert_allclose(mixed["grad_norm"], plain["grad_norm"], rtol=2e-2)


@pytest.mark.parametrize("zero", (1, 3))
def test_an_fp16_overflow_skips_the_step_on_every_shard(run: Run, zero: int) -> None:
    """A loss scale so large every step overflows: no rank updates its shard."""
    extra = ("train.dtype=fp16", "train.loss_scale=1e30")
    mixed, plain = run(2, 1, 1, zero, *extra), run(2, 1, 1, 0, *extra)
    assert list(mixed["grad_norm"]) == [0.0, 0.0, 0.0]  # skipped steps report no norm
    for key in (k for k in plain if k.startswith("param.")):
        np.testing.assert_array_equal(mixed[key], plain[key], err_msg=key)


@pytest.mark.parametrize("zero", (1, 2, 3))
def test_mixed_precision_model_state_is_deepspeeds_16_psi(run: Run, zero: int) -> None:
    """Rajbhandari et al. 2020, Figure 1: 2Ψ weights + 2Ψ gradients + 12Ψ of float32 masters
    and Adam moments, the 12Ψ sharded from stage 1, the gradients from 2, the weights at 3."""
    memory = json.loads(str(run(2, 1, 1, zero, "train.dtype=bf16")["memory"]))
    psi = sum(whole_model_sizes())
    expected = {
        1: {"params": 2 * psi, "grads": 2 * psi, "optimizer": 12 * psi // 2},
        2: {"params": 2 * psi, "grads": 2 * psi // 2, "optimizer": 12 * psi // 2},
        3: {"params": 2 * psi // 2, "grads": 2 * psi // 2, "optimizer": 12 * psi // 2},
    }[zero]
    for rank in memory:
        assert {k: rank[k] for k in expected} == expected == rank["closed_form"]


# ---- memory ---------------------------------------------------------------------------------
def whole_model_sizes(*extra: str) -> list[int]:
    """Elements of each parameter of the single-process model, built here (no ZeRO code)."""
    config = load(None, [*TINY, *extra])
    model = GPT(model_description(config), dtype=np.float64)
    return [p.size for p in model.params.values()]


BYTES = {"per_element": (8, 8, 16), "itemsize": 8, "bucket_mb": 25.0}  # float64 AdamW


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_model_state_bytes_equal_closed_forms(run: Run, case: tuple) -> None:
    dp, tp, pp, zero, extra = case
    memory = json.loads(str(run(dp, tp, pp, zero, *extra)["memory"]))
    assert len(memory) == dp * tp * pp
    for rank in memory:
        closed = rank["closed_form"]
        assert {k: rank[k] for k in closed} == closed
    if tp == pp == 1:  # dp divides every parameter and the one bucket: DeepSpeed's table
        psi_bytes = 8 * sum(whole_model_sizes(*extra))  # float64
        adam = 2 * psi_bytes
        expected = {
            1: {"params": psi_bytes, "grads": psi_bytes, "optimizer": adam // dp},
            2: {"params": psi_bytes, "grads": psi_bytes // dp, "optimizer": adam // dp},
            3: {"params": psi_bytes // dp, "grads": psi_bytes // dp, "optimizer": adam // dp},
        }[zero]
        for rank in memory:
            assert {k: rank[k] for k in expected} == expected
            # ZeRO-3's working set: the largest op's whole parameters (the 256×32 table).
            assert rank["params_gathered_peak"] == (8 * 256 * 32 if zero == 3 else 0)


def test_padding_when_dp_does_not_divide(run: Run) -> None:
    """dp=3: the LayerNorms (32 elements) and 1 KB-scale buckets do not split evenly; the
    padded closed forms still hold, and training still matches the single-process run."""
    batch = ("train.batch_size=6",)
    small_buckets = ("parallel.bucket_mb=0.01", *batch)
    ref = run(1, 1, 1, 0, *batch)
    sizes = whole_model_sizes(*batch)
    for zero, extra in ((2, small_buckets), (3, batch)):
        result = run(3, 1, 1, zero, *extra)
        assert relative_error(result["loss"], ref["loss"]) < 1e-10
        memory = json.loads(str(result["memory"]))
        for dp_rank, rank in enumerate(memory):
            closed = model_state_bytes(
                sizes,
                stage=zero,
                dp=3,
                rank=dp_rank,
                per_element=(8, 8, 16),
                itemsize=8,
                bucket_mb=0.01 if zero == 2 else 25.0,
            )
            assert {k: rank[k] for k in closed} == closed
        # Padding is real: the shards hold more than a third of the model.
        assert memory[0]["grads"] > 8 * sum(sizes) // 3
    assert model_state_bytes([32, 7], stage=3, dp=3, rank=0, **BYTES) == {
        "params": 8 * (11 + 3),
        "grads": 8 * (11 + 3),
        "optimizer": 16 * (11 + 3),
    }


def test_closed_forms_by_hand() -> None:
    # One bucket of 10 elements over 4 ranks: chunks of 3 (2 padding at the end); rank 3 owns
    # one real element.
    sizes = [4, 6]
    assert model_state_bytes(sizes, stage=0, dp=4, rank=0, **BYTES) == {
        "params": 80,
        "grads": 80,
        "optimizer": 160,
    }
    stage1 = [model_state_bytes(sizes, stage=1, dp=4, rank=r, **BYTES) for r in range(4)]
    assert [m["optimizer"] for m in stage1] == [48, 48, 48, 16]
    assert {m["grads"] for m in stage1} == {8 * 12}  # the padded whole bucket
    stage2 = model_state_bytes(sizes, stage=2, dp=4, rank=0, **BYTES)
    assert stage2 == {"params": 80, "grads": 24, "optimizer": 48}
    stage3 = model_state_bytes(sizes, stage=3, dp=4, rank=0, **BYTES)
    assert stage3 == {"params": 8 * 3, "grads": 8 * 3, "optimizer": 16 * 3}  # ⌈4/4⌉ + ⌈6/4⌉


# ---- communication --------------------------------------------------------------------------
def wire_bytes(run: dict, axis: str = "dp", op: str | None = None) -> int:
    rows = json.loads(str(run["ledger"]))
    return sum(
        r["wire_bytes"]
        for r in rows
        if r["axis"] == axis and r["phase"] in PHASES and (op is None or r["op"] == op)
    )


def norm_reduction(dp: int, steps: int) -> int:
    """ZeRO's one extra all-reduce per step: the 8-byte squared norm of the sharded gradients."""
    return steps * 2 * (dp - 1) * 8


def test_wire_bytes_stage_1_and_2_equal_plain_dp_stage_3_one_and_a_half(run: Run) -> None:
    dp, steps = 4, 3
    plain = wire_bytes(run(dp, 1, 1, 0, *UNTIED))
    psi_bytes = 8 * sum(whole_model_sizes(*UNTIED))
    assert plain == steps * 2 * (dp - 1) * psi_bytes // dp  # a ring all-reduce of Ψ per step
    for zero, factor in ((1, 1.0), (2, 1.0), (3, 1.5)):
        zeroed = run(dp, 1, 1, zero, *UNTIED)
        assert wire_bytes(zeroed) - norm_reduction(dp, steps) == factor * plain, zero
        assert wire_bytes(zeroed, op="all_reduce") == norm_reduction(dp, steps)
    # Stage 3: one parameter all-gather in forward, one in backward, one gradient reduce-scatter.
    stage3 = run(dp, 1, 1, 3, *UNTIED)
    assert wire_bytes(stage3, op="all_gather") == 2 * wire_bytes(stage3, op="reduce_scatter")


def test_tied_table_is_gathered_by_both_of_its_ops(run: Run) -> None:
    """The tied embedding serves the lookup and the head: stage 3 gathers and reduce-scatters
    it for each, as if the model held the table twice."""
    dp, steps = 2, 3
    table_bytes = 8 * 256 * 32
    plain = wire_bytes(run(dp, 1, 1, 0))
    stage3 = wire_bytes(run(dp, 1, 1, 3)) - norm_reduction(dp, steps)
    assert stage3 == 1.5 * (plain + steps * 2 * (dp - 1) * table_bytes // dp)


# ---- configuration and a world of one ---------------------------------------------------------
def test_supported_combinations_load() -> None:
    for overrides in (
        ("parallel.pp=2", "parallel.zero=1"),
        ("parallel.pp=2", "parallel.zero=2", "parallel.schedule=zb-h1"),
        ("parallel.pp=2", "parallel.zero=3", "parallel.schedule=gpipe"),
        ("parallel.pp=2", "parallel.zero=3", "parallel.schedule=zb-h1"),
        ("parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero=3"),
        ("parallel.zero=3", "parallel.recompute=full", "train.optimizer=sgd"),
        ("parallel.zero=2", "train.checkpoint_every=1"),
    ):
        load(None, [*TINY, *overrides])


def test_one_rank_stage_3_is_bitwise_plain_training() -> None:
    """With dp=1 a shard is the whole parameter: every op's gather and reduce-scatter is the
    identity, and the arithmetic must be exactly that of the dense ops."""
    results = {}
    for zero in (0, 3):
        trainer = Trainer(load(None, [*TINY, f"parallel.zero={zero}"]))
        steps = [trainer.step(s) for s in range(2)]
        params = {name: p.data.copy() for name, p in trainer.model.params.items()}
        results[zero] = ([s.loss for s in steps], [s.grad_norm for s in steps], params)
        closed = trainer.memory_closed_form()
        assert {k: trainer.memory()[k] for k in closed} == closed
    assert results[3][:2] == results[0][:2]
    for name, value in results[0][2].items():
        assert np.array_equal(results[3][2][name].reshape(value.shape), value), name


def test_one_rank_stage_3_llama_is_bitwise_plain_training() -> None:
    """As above for Llama: RMSNorm (ZeRO-3's normalisation then its scale) and the dense fused
    node must sum the weight's gradient the same way, to the bit."""
    llama = [*TINY, "model.kind=llama", "model.n_kv_head=2", "model.ffn_hidden=48"]
    results = {}
    for zero in (0, 3):
        trainer = Trainer(load(None, [*llama, f"parallel.zero={zero}"]))
        steps = [trainer.step(s) for s in range(2)]
        params = {name: p.data.copy() for name, p in trainer.model.params.items()}
        results[zero] = ([s.loss for s in steps], [s.grad_norm for s in steps], params)
    assert results[3][:2] == results[0][:2]
    for name, value in results[0][2].items():
        assert np.array_equal(results[3][2][name].reshape(value.shape), value), name


def _held_tensors(fn: object, seen: set[int]) -> list[Tensor]:
    """The Tensors `fn`'s closure holds: directly, in lists and tuples, in records (dataclass
    instances) or through the functions it holds."""
    if id(fn) in seen:
        return []
    seen.add(id(fn))
    found: list[Tensor] = []
    values = [cell.cell_contents for cell in getattr(fn, "__closure__", None) or ()]
    while values:
        value = values.pop()
        if isinstance(value, Tensor):
            found.append(value)
        elif isinstance(value, list | tuple):
            values.extend(value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            values.extend(getattr(value, f.name) for f in dataclasses.fields(value))
        elif inspect.isfunction(value):
            found += _held_tensors(value, seen)
    return found


def test_no_stage_3_backward_closure_holds_a_tensor() -> None:
    """ZeRO-3's ops keep shard records in their closures, never the chunk Tensors (which would
    keep the graph and the parameters' gradients alive)."""
    config = load(None, [*TINY, "parallel.dp=2", "parallel.zero=3", "model.tie_embeddings=true"])
    runtime = Runtime(config.layout, virtual_mesh(dp=2))
    trainer = Trainer(config, runtime)
    x, y = trainer._microbatches("train", 0)
    loss = trainer.stages[0](x[0], y[0])
    stack, seen, nodes = [loss], set(), 0
    while stack:
        node = stack.pop()
        if id(node) in seen or node._backward is None:
            continue
        seen.add(id(node))
        nodes += 1
        assert not _held_tensors(node._backward, set()), "a backward closure holds a Tensor"
        stack.extend(node._parents)
    assert nodes > 10
