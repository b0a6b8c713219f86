"""A tiny mixture-of-experts Llama under expert parallelism reproduces one process.

Dropless routing (every slot kept) with the load-balancing loss pooled over the data-parallel
batch (`moe.aux_loss_scope: data_parallel`) makes a step independent of how the batch is split:
ep 2 and 4, folded onto dp and cp, with tensor and sequence parallelism, pipelines, ZeRO 1–3,
recomputation and checkpoints, each 3 AdamW steps in float64 under mpiexec (with a timeout),
equal to one process within 1e-10 (losses, norms) and 1e-9 (gradients).

Capacity-bounded routing drops per rank, before the exchange: equal to a one-process run whose
microbatches are the ranks' shares, and the dropped set changes with dp (not with ep).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mpi_helpers import assert_same_run as same_run
from mpi_helpers import train_worker_run

WIDTH = 32
MOE = "model.moe={experts: 4, top_k: 2, ffn_hidden: 24, aux_loss_coef: 0.01, "
DROPLESS = MOE + "aux_loss_scope: data_parallel}"
TINY = [
    "model.kind=llama",
    "model.block_size=16",
    "model.n_layer=4",
    "model.n_head=4",
    "model.n_kv_head=2",
    f"model.n_embd={WIDTH}",
    "train.batch_size=8",
    "train.steps=3",
    "train.eval_batches=1",
    "data.source=synthetic",
]

LAYOUTS = {  # label: (ranks, overrides), each against one process
    "dp2-ep2": (2, ["parallel.dp=2", "parallel.ep=2"]),
    "dp4-ep4": (4, ["parallel.dp=4", "parallel.ep=4"]),
    "dp4-ep2": (4, ["parallel.dp=4", "parallel.ep=2"]),
    "cp2-ep2": (2, ["parallel.cp=2", "parallel.ep=2"]),
    "dp2-ep2-tp2": (4, ["parallel.dp=2", "parallel.ep=2", "parallel.tp=2"]),
    "dp2-ep2-tp2-sp": (
        4,
        ["parallel.dp=2", "parallel.ep=2", "parallel.tp=2", "parallel.sequence_parallel=true"],
    ),
    "dp2-ep2-zero1": (2, ["parallel.dp=2", "parallel.ep=2", "parallel.zero=1"]),
    "dp2-ep2-zero2": (2, ["parallel.dp=2", "parallel.ep=2", "parallel.zero=2"]),
    "dp2-ep2-zero3": (2, ["parallel.dp=2", "parallel.ep=2", "parallel.zero=3"]),
    "dp2-ep2-full-recompute": (2, ["parallel.dp=2", "parallel.ep=2", "parallel.recompute=full"]),
}

# Pipelines with two dp ranks take one sequence per microbatch: the data-parallel pool of
# microbatch m is then rows {m, 4 + m}, which one process's microbatches of 2 are not. Their
# reference is the same microbatching without a pipeline (itself equal to one process above
# when dropless; here its aux pools the same rows).
PIPELINES = {
    schedule: (4, ["parallel.dp=2", "parallel.ep=2", "parallel.pp=2", f"parallel.schedule={s}"])
    for schedule, s in {
        "gpipe": "gpipe",
        "1f1b": "1f1b",
        "interleaved": "interleaved-1f1b",
        "zb-h1": "zb-h1",
        "zb-v": "zb-v",
        "dualpipev": "dualpipev",
    }.items()
}


def run(tmp: Path, *overrides: str, ranks: int = 1, moe: str = DROPLESS) -> dict[str, np.ndarray]:
    return train_worker_run(tmp, [*TINY, moe, *overrides], ranks)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, np.ndarray]:
    return run(tmp_path_factory.mktemp("moe-single"), "train.dtype=float64")


@pytest.mark.parametrize("label", LAYOUTS)
def test_expert_parallel_layouts_equal_one_process(tmp_path, reference, label) -> None:
    ranks, overrides = LAYOUTS[label]
    got = run(tmp_path, "train.dtype=float64", *overrides, ranks=ranks)
    same_run(got, reference)
    # Model state as measured equals its closed form, experts sharded over edp under ZeRO.
    for rank in json.loads(str(got["memory"])):
        assert {k: rank[k] for k in rank["closed_form"]} == rank["closed_form"]


@pytest.fixture(scope="module")
def microbatched(tmp_path_factory) -> dict[str, np.ndarray]:
    """dp2 (ep 1) with one sequence per microbatch: the pipelines' reference."""
    return run(
        tmp_path_factory.mktemp("moe-dp2-mb1"),
        "train.dtype=float64",
        "parallel.dp=2",
        "train.microbatch_size=1",
        ranks=2,
    )


@pytest.mark.parametrize("schedule", PIPELINES)
def test_expert_parallelism_under_every_pipeline_schedule(tmp_path, microbatched, schedule) -> None:
    ranks, overrides = PIPELINES[schedule]
    if schedule == "interleaved":
        overrides = [*overrides, "parallel.virtual_stages=2"]
    got = run(tmp_path, "train.dtype=float64", "train.microbatch_size=1", *overrides, ranks=ranks)
    same_run(got, microbatched)


def test_the_microbatched_reference_differs_only_through_the_aux_pool(
    reference, microbatched
) -> None:
    """The microbatched reference itself: with one sequence per microbatch its aux pools other
    rows than one process's single microbatch of 8, so it differs (a little) from `reference`,
    which the aux term alone explains: the LM part of the first loss is the same."""
    assert microbatched["loss"][0] == pytest.approx(reference["loss"][0], rel=1e-12)
    assert not np.allclose(microbatched["grad_norm"][1:], reference["grad_norm"][1:], rtol=1e-12)


def test_a_mixed_precision_expert_parallel_run_tracks_one_process(tmp_path) -> None:
    """bf16 with ep 2 against one process in bf16. The exchange changes the order of the
    experts' gradient sums, so the bf16 roundings differ, and routing is discontinuous: a
    rounding can flip a top-k choice. Within 1e-2 (the dense layouts hold 1e-3), and the
    same in float32 within 1e-5."""
    single = run(tmp_path / "single", "train.dtype=bf16")
    ep = run(tmp_path / "ep", "train.dtype=bf16", "parallel.dp=2", "parallel.ep=2", ranks=2)
    np.testing.assert_allclose(ep["loss"], single["loss"], rtol=1e-2)
    single = run(tmp_path / "single32", "train.dtype=float32")
    ep = run(tmp_path / "ep32", "train.dtype=float32", "parallel.dp=2", "parallel.ep=2", ranks=2)
    np.testing.assert_allclose(ep["loss"], single["loss"], rtol=1e-5)


# ---- capacity: dropped per rank, before the exchange ---------------------------------------
CAPPED = MOE + "capacity_factor: 1.0}"  # scope microbatch: each rank's own tokens
EP2 = ("parallel.dp=2", "parallel.ep=2")
DP4_EP4 = ("parallel.dp=4", "parallel.ep=4")


def dropped(result: dict[str, np.ndarray]) -> dict[str, int]:
    """Slots dropped per layer over the run, summed over the ranks that route distinct tokens."""
    totals: dict[str, int] = {}
    for rank in json.loads(str(result["routing"])):
        for layer, record in rank.items():
            lost = sum(r - k for r, k in zip(record["routed"], record["kept"], strict=True))
            totals[layer] = totals.get(layer, 0) + lost
    return totals


def test_capacity_drops_per_rank_as_a_one_process_run_of_the_ranks_shares(tmp_path) -> None:
    """ep 2 over dp 2, capacity 1.0: each rank drops over its own 4 sequences. One process
    whose microbatches are those shares (4 sequences each) drops the same slots: equal runs."""
    shares = run(tmp_path / "single", "train.dtype=float64", "train.microbatch_size=4", moe=CAPPED)
    ep = run(
        tmp_path / "ep",
        "train.dtype=float64",
        "parallel.dp=2",
        "parallel.ep=2",
        ranks=2,
        moe=CAPPED,
    )
    same_run(ep, shares)
    assert dropped(ep) == dropped(shares) and sum(dropped(ep).values()) > 0


def test_the_dropped_set_depends_on_dp_not_on_ep(tmp_path) -> None:
    """Capacity is per rank: one process over the whole batch of 8 drops other slots than two
    dp ranks over 4 each (so the runs differ), while ep (2 or 1) leaves every rank's tokens,
    and so the dropped slots and the run, unchanged."""
    whole = run(tmp_path / "single", "train.dtype=float64", moe=CAPPED)
    dp2 = run(tmp_path / "dp2", "train.dtype=float64", "parallel.dp=2", ranks=2, moe=CAPPED)
    ep2 = run(
        tmp_path / "ep2",
        "train.dtype=float64",
        "parallel.dp=2",
        "parallel.ep=2",
        ranks=2,
        moe=CAPPED,
    )
    assert dropped(whole) != dropped(dp2)
    assert not np.allclose(whole["loss"][1:], dp2["loss"][1:], rtol=1e-10)
    assert dropped(dp2) == dropped(ep2)
    same_run(ep2, dp2)


def test_all_to_all_bytes_are_the_routed_slots_times_the_width(tmp_path) -> None:
    """Rank 0's ledger: the forward's all-to-alls on the ep axis carry the slots rank 0 keeps
    (dispatch) and the outputs of the slots its experts (0 and 1 of 4) computed for both ranks
    (combine), width × 8 bytes each; the backward the same rows' gradients. Slot counts come
    from the ranks' routing records."""
    got = run(
        tmp_path, "train.dtype=float64", "parallel.dp=2", "parallel.ep=2", ranks=2, moe=CAPPED
    )
    ledger = json.loads(str(got["ledger"]))
    routing = json.loads(str(got["routing"]))
    sent = sum(sum(r["kept"]) for r in routing[0].values())
    computed = sum(sum(r["kept"][:2]) for rank in routing for r in rank.values())
    kept = (sent + computed) / 2

    def moved(phase: str) -> int:
        return sum(
            row["bytes"]
            for row in ledger
            if row["op"] == "all_to_all" and row["axis"] == "ep" and row["phase"] == phase
        )

    assert moved("forward") == 2 * kept * WIDTH * 8
    assert moved("backward") == 2 * kept * WIDTH * 8
    assert any(row["op"] == "count_exchange" and row["axis"] == "ep" for row in ledger)


# ---- through the launcher: checkpoints across ep, and the report's routing tables ---------
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "llama-quickstart.yaml"


def train_cli(out: Path, *overrides: str, resume: Path | None = None) -> dict:
    command = [sys.executable, "-m", "launch", "train", str(CONFIG), "--out", str(out)]
    settings = (*TINY, "train.dtype=float64", "train.steps=6", "train.warmup_steps=0")
    for item in (*settings, *overrides):
        command += ["--set", item]
    if resume is not None:
        command += ["--resume", str(resume)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    return json.loads((out / "metrics.json").read_text())


def test_an_expert_parallel_checkpoint_reshards_to_other_layouts(tmp_path) -> None:
    """Written under ep 4 (each rank its experts), resumed under ep 2 with ZeRO-3, a pipeline
    without ep and one process: the same losses as the run that kept going."""
    full = train_cli(
        tmp_path / "full", DROPLESS, *DP4_EP4, "parallel.zero=1", "train.checkpoint_every=3"
    )
    losses = [s["loss"] for s in full["steps"]]
    checkpoint = tmp_path / "full" / "checkpoints" / "step000002"
    for label, layout in {
        "ep2-zero3": ["parallel.dp=2", "parallel.ep=2", "parallel.zero=3"],
        "pp2": ["parallel.pp=2", "train.microbatch_size=8"],
        "single": [],
    }.items():
        resumed = train_cli(tmp_path / label, DROPLESS, *layout, resume=checkpoint)
        got = [s["loss"] for s in resumed["steps"]]
        np.testing.assert_allclose(got, losses[3:], rtol=1e-10, atol=0, err_msg=label)


def test_metrics_report_the_routing_per_layer(tmp_path) -> None:
    """metrics.json's moe section: every routed slot counted once over the ranks (dp 2 × tp 2,
    so the tp replicas are not counted twice), dropless routing drops nothing, and with a
    capacity the dropped slots differ between dp 1 and dp 2, as the tables show."""
    dropless = train_cli(tmp_path / "dropless", DROPLESS, "parallel.dp=2", "parallel.tp=2")
    layers = dropless["moe"]["layers"]
    assert [row["layer"] for row in layers] == [
        f"model.layers.{i}.block_sparse_moe" for i in range(4)
    ]
    slots = 6 * 8 * 16 * 2  # steps × sequences × tokens × top_k
    assert all(sum(row["tokens_per_expert"]) == slots for row in layers)
    assert all(row["dropped"] == 0 and row["imbalance"] >= 1.0 for row in layers)
    assert all(row["aux_loss"] > 0 for row in layers)
    one = train_cli(tmp_path / "dp1", CAPPED)["moe"]
    two = train_cli(tmp_path / "dp2", CAPPED, *EP2)["moe"]
    assert one["dropped_fraction"] > 0 and two["dropped_fraction"] > 0
    assert [r["dropped"] for r in one["layers"]] != [r["dropped"] for r in two["layers"]]
