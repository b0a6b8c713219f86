"""Traced collectives: the ledger and one-rank groups in process, real collectives on 4 ranks."""

from __future__ import annotations

import numpy as np
import pytest
from mpi_helpers import run_worker

from parallel.comm import PHASES, CommError, Group, Ledger, SelfComm


# ---- the ledger ---------------------------------------------------------------------------------
def test_ledger_totals_and_filters() -> None:
    ledger = Ledger()
    ledger.record("all_reduce", "dp", 100, 0.5)
    with ledger.phase("backward"):
        ledger.record("all_reduce", "dp", 40, 0.25)
        ledger.record("all_gather", "tp", 8, 0.125)
    ledger.record("all_reduce", "dp", 10, 0.5)
    with ledger.phase("forward"):
        ledger.record("all_gather", "dp", 16, 0.0, wire_bytes=48)
    rows = [tuple(row.values()) for row in ledger.as_list()]
    assert rows == [
        ("all_gather", "dp", "forward", 16, 1, 0.0, 48),
        ("all_gather", "tp", "backward", 8, 1, 0.125, 8),  # wire bytes default to the bytes
        ("all_reduce", "dp", "backward", 40, 1, 0.25, 40),
        ("all_reduce", "dp", "other", 110, 2, 1.0, 110),
    ]
    keys = ["op", "axis", "phase", "bytes", "calls", "time_s", "wire_bytes"]
    assert list(ledger.as_list()[0]) == keys
    assert ledger.wire_bytes(op="all_gather") == 56
    ledger.reset()
    ledger.record("all_reduce", "dp", 100, 0.5)
    with ledger.phase("backward"):
        ledger.record("all_reduce", "dp", 40, 0.25)
        ledger.record("all_gather", "tp", 8, 0.125)
    ledger.record("all_reduce", "dp", 10, 0.5)
    assert ledger.bytes() == 158
    assert ledger.bytes(op="all_reduce") == 150
    assert ledger.bytes(axis="tp") == 8
    assert ledger.bytes(phase="backward") == 48
    assert ledger.bytes(op="all_reduce", phase="other") == 110
    assert ledger.calls(op="all_reduce") == 3
    assert ledger.seconds(axis="dp") == 1.25
    ledger.reset()
    assert ledger.as_list() == [] and ledger.bytes() == 0


def test_phase_restores_after_an_error() -> None:
    ledger = Ledger()
    with pytest.raises(RuntimeError), ledger.phase("optimizer"):
        assert ledger.current_phase == "optimizer"
        raise RuntimeError
    assert ledger.current_phase == "other"
    assert set(PHASES) == {"forward", "backward", "optimizer", "other"}


def test_unknown_phase_raises() -> None:
    with pytest.raises(CommError, match="unknown phase"), Ledger().phase("warmup"):
        pass


# ---- a group of one rank ------------------------------------------------------------------------
def test_one_rank_group_sends_and_records_nothing() -> None:
    ledger = Ledger()
    group = Group(SelfComm(), "dp", ledger)
    x = np.arange(6.0).reshape(2, 3)
    assert group.all_reduce(x) is x
    out = np.empty_like(x)
    assert group.all_reduce(x, out=out) is out and np.array_equal(out, x)
    assert group.all_gather(x, axis=1) is x
    out = np.empty_like(x)
    assert group.all_gather(x, out=out) is out and np.array_equal(out, x)
    assert group.reduce_scatter(x, axis=1) is x
    assert group.broadcast(x) is x
    group.barrier()
    assert ledger.as_list() == []


def test_one_rank_group_errors() -> None:
    group = Group(SelfComm(), "pp", Ledger())
    with pytest.raises(CommError, match="unknown reduction"):
        group.all_reduce(np.ones(2), op="mean")
    with pytest.raises(CommError, match="itself"):
        group.send(np.ones(2), dest=0)
    with pytest.raises(CommError, match="not a rank"):
        group.recv((2,), np.float64, source=1)


# ---- 4 ranks ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mpi_comm() -> dict:
    return run_worker(4, "comm_worker", timeout=60)


CHECKS = [
    "all_reduce_values",
    "all_gather_values",
    "reduce_scatter_values",
    "broadcast_values",
    "send_recv_ring",
    "ledger_is_exact",
    "size_one_group_sends_nothing",
    "a_fresh_ledger_per_group",
]


@pytest.mark.parametrize("name", CHECKS)
def test_mpi(mpi_comm: dict, name: str) -> None:
    assert name in mpi_comm["results"], f"check {name} did not run"
    assert mpi_comm["results"][name] == []


def test_mpi_ran_nothing_unexpected(mpi_comm: dict) -> None:
    assert sorted(mpi_comm["results"]) == sorted(CHECKS)


def test_the_ledger_counts_emulated_half_precision_at_two_bytes_an_element() -> None:
    """Under bf16/fp16 a float32 buffer holds half-precision values: a GPU would send 2 bytes
    an element. float64 buffers (the gradient norm, the logged loss) stay 8."""
    ledger = Ledger()
    assert ledger.nbytes(np.zeros(10, np.float32)) == 40
    ledger.float32_itemsize = 2
    assert ledger.nbytes(np.zeros(10, np.float32)) == 20
    assert ledger.nbytes(np.zeros(10, np.float64)) == 80
