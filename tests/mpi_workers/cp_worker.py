"""Context parallelism on 4 ranks, float64: the new collectives, the three attention back ends
against one process, and their ledgers.

cp groups: the world (4 ranks) and two of 2 (world ranks 0, 1 and 2, 3). The cases, inputs and
references come from tests/test_context_parallel.py, so every rank knows the full-sequence
inputs and checks its own rows; rank 0 reports each case's largest relative errors and every
rank's ledger payloads (`data`), which the test compares with virtual, data-free runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from _harness import check, data, run
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_context_parallel import (
    LEDGER_CASES,
    TOL,
    attention_cases,
    case_id,
    cp_payload,
    expected_rows,
    ledger_rows,
    row,
    run_case,
)

from parallel.comm import Group, Ledger

WORLD = MPI.COMM_WORLD
RANK = WORLD.Get_rank()
GROUPS = {
    4: Group(WORLD, "cp", Ledger()),
    2: Group(WORLD.Split(RANK // 2, RANK % 2), "cp", Ledger()),
}


def per_rank(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """(n, *shape) float64, the same on every rank; row r is group rank r's input."""
    return np.random.default_rng(seed).standard_normal((n, *shape))


@check
def all_to_all_values() -> None:
    for n, group in GROUPS.items():
        inputs = per_rank(n, (4, 8, 12), seed=n)
        mine = inputs[group.rank]
        for split, concat in ((0, 1), (1, 0), (1, 2), (2, 1), (1, 1), (-1, 0)):
            group.ledger.reset()
            got = group.all_to_all(mine, split, concat)
            # Block r of the result is rank r's chunk `rank` along the split axis.
            chunks = [np.split(x, n, axis=split)[group.rank] for x in inputs]
            np.testing.assert_array_equal(got, np.concatenate(chunks, axis=concat))
            np.testing.assert_array_equal(group.all_to_all(got, concat, split), mine)  # inverse
            wire = 2 * (n - 1) * mine.nbytes // n  # every chunk but this rank's own
            assert ledger_rows(group.ledger) == [
                row("all_to_all", "other", 2 * mine.nbytes, 2, wire)
            ]
        strided = np.asfortranarray(mine)  # not C-contiguous: copied into a contiguous buffer
        np.testing.assert_array_equal(group.all_to_all(strided, 2, 0), group.all_to_all(mine, 2, 0))


@check
def sendrecv_ring() -> None:
    for n, group in GROUPS.items():
        group.ledger.reset()
        inputs = per_rank(n, (3, 5), seed=10 + n)
        right, left = (group.rank + 1) % n, (group.rank - 1) % n
        got = group.sendrecv(inputs[group.rank], right, left, tag=7)
        np.testing.assert_array_equal(got, inputs[left])
        back = group.sendrecv(got.T, left, right)  # a transposed view travels as its values
        np.testing.assert_array_equal(back, inputs[group.rank].T)
        nbytes = inputs[0].nbytes
        assert ledger_rows(group.ledger) == [row("sendrecv", "other", 2 * nbytes, 2, 2 * nbytes)]


@check
def attention_equals_one_process() -> None:
    errors, failures = {}, []
    for case in attention_cases():
        errs = run_case(case, GROUPS[case[1]])
        errors[case_id(case)] = errs
        if max(errs.values()) >= TOL:
            failures.append(f"{case_id(case)}: {errs}")
    worst = WORLD.gather(errors, root=0)  # test plumbing: pickling is fine here
    if RANK == 0:
        data["attention_errors"] = {
            key: {what: max(e[key][what] for e in worst) for what in errors[key]} for key in errors
        }
    assert not failures, "; ".join(failures)


@check
def ledgers_follow_the_docstring() -> None:
    for name, cp, mode in LEDGER_CASES:
        rows = cp_payload(name, mode, GROUPS[cp])["ledger"]
        assert rows == expected_rows(name, cp, mode), (name, cp, mode, rows)


@check
def ledger_payloads() -> None:
    payloads = {}
    for name, cp, mode in LEDGER_CASES:
        gathered = WORLD.gather(cp_payload(name, mode, GROUPS[cp]), root=0)
        payloads[f"{name}-cp{cp}-{mode}"] = gathered
    if RANK == 0:
        data["payloads"] = payloads


if __name__ == "__main__":
    run()
