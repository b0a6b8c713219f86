"""Gradient redirections: identities on one rank, conjugate collectives on 4 ranks."""

from __future__ import annotations

import numpy as np
import pytest
from mpi_helpers import run_worker

from civetta.tensor import Tensor
from parallel.mesh import Mesh
from parallel.redirect import (
    copy_to_region,
    gather_from_region,
    gather_from_sequence_region,
    reduce_from_region,
    reduce_scatter_to_region,
    scatter_to_region,
)

OPS = [
    lambda x, g: copy_to_region(x, g),
    lambda x, g: reduce_from_region(x, g),
    lambda x, g: gather_from_region(x, g, axis=-1),
    lambda x, g: scatter_to_region(x, g, axis=-1),
    lambda x, g: reduce_scatter_to_region(x, g, axis=1),
    lambda x, g: gather_from_sequence_region(x, g, axis=1),
]


@pytest.mark.parametrize("op", OPS)
def test_one_rank_is_identity_and_silent(op) -> None:
    mesh = Mesh()
    x = Tensor(np.arange(24.0).reshape(2, 3, 4), requires_grad=True)
    y = op(x, mesh.group("tp"))
    assert y is x
    (y * Tensor(np.full((2, 3, 4), 2.0))).sum().backward()
    np.testing.assert_array_equal(x.grad, np.full((2, 3, 4), 2.0))
    assert mesh.ledger.as_list() == []


# ---- 4 ranks ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mpi_redirect() -> dict:
    return run_worker(4, "redirect_worker", timeout=60)


CHECKS = [
    "copy_to_region_op",
    "reduce_from_region_op",
    "gather_from_region_op",
    "scatter_to_region_op",
    "reduce_scatter_to_region_op",
    "gather_from_sequence_region_op",
    "tensor_parallel_mlp",
    "sequence_parallel_mlp",
]


@pytest.mark.parametrize("name", CHECKS)
def test_mpi(mpi_redirect: dict, name: str) -> None:
    assert name in mpi_redirect["results"], f"check {name} did not run"
    assert mpi_redirect["results"][name] == []


def test_mpi_ran_nothing_unexpected(mpi_redirect: dict) -> None:
    assert sorted(mpi_redirect["results"]) == sorted(CHECKS)
