"""Context parallelism (parallel/context_parallel.py): token placement, the three attention back
ends against one process, their ledgers, and the new collectives.

The multi-rank checks run in one 4-rank mpiexec launch (tests/mpi_workers/cp_worker.py), over a
cp group of 4 (the world) and two of 2. Every back end, cp = 2 and 4, contiguous and balanced
placements, multi-head and grouped-query attention: each rank's output and its q, k, v
gradients equal rows of `fused.scaled_dot_product_attention` over the full sequence in float64.
The worker imports the cases and the ledger payload from here, so the executed and the virtual
(data-free) runs share them.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
from mpi_helpers import run_worker

from civetta import activation_meter, meta
from civetta.fused import scaled_dot_product_attention
from civetta.meters import flop_meter
from civetta.tensor import Tensor
from parallel.comm import Group, Ledger, SelfComm
from parallel.context_parallel import (
    BACKENDS,
    _visible,
    chunk_positions,
    local_slice,
    ring_attention,
    ulysses_attention,
)
from parallel.virtual import virtual_mesh

# ---- the cases, shared with tests/mpi_workers/cp_worker.py --------------------------------------
BATCH, SEQ, HEAD_DIM = 2, 16, 8  # SEQ splits into 2·cp chunks for cp = 2 and 4
TOL = 1e-10  # relative to the largest reference entry
# The modes of placing tokens: chunk_positions' two, and an arbitrary one ("shuffled": a fixed
# permutation dealt out in rank order), which makes the back ends all-gather the positions.
MODES = ("contiguous", "balanced", "shuffled")


def positions_of(mode: str, cp: int, rank: int) -> np.ndarray:
    """The global positions cp rank `rank` holds in placement `mode`."""
    if mode == "shuffled":
        return np.random.default_rng(99).permutation(SEQ).reshape(cp, -1)[rank]
    return chunk_positions(SEQ, cp, rank, mode == "balanced")


def attention_cases() -> list[tuple[str, int, str, int, int, bool]]:
    """(back end, cp, mode, heads, kv heads, causal): every back end at cp = 2 and 4 in both
    layouts with MHA and GQA (Hkv = 1 where cp allows), plus non-causal and shuffled ones."""
    cases = []
    for name in BACKENDS:
        for cp in (2, 4):
            for mode in ("contiguous", "balanced"):
                for heads, kv_heads in ((4, 4), (4, 2), (4, 1), (8, 4)):
                    if name != "ulysses" or kv_heads % cp == 0:
                        cases.append((name, cp, mode, heads, kv_heads, True))
        cases.append((name, 4, "contiguous", 8, 4, False))
        cases.append((name, 4, "shuffled", 8, 4, True))
        cases.append((name, 2, "shuffled", 4, 2, True))
    return cases


def case_id(case: tuple[Any, ...]) -> str:
    name, cp, mode, heads, kv_heads, causal = case
    return f"{name}-cp{cp}-{mode}-h{heads}kv{kv_heads}" + ("" if causal else "-full")


def full_inputs(heads: int, kv_heads: int) -> tuple[np.ndarray, ...]:
    """q, k, v and the upstream gradient over the full sequence, float64, from a fixed seed."""
    rng = np.random.default_rng(heads * 10 + kv_heads)
    q = rng.standard_normal((BATCH, heads, SEQ, HEAD_DIM))
    k = rng.standard_normal((BATCH, kv_heads, SEQ, HEAD_DIM))
    v = rng.standard_normal((BATCH, kv_heads, SEQ, HEAD_DIM))
    upstream = rng.standard_normal((BATCH, heads, SEQ, HEAD_DIM))
    return q, k, v, upstream


@functools.cache
def reference(heads: int, kv_heads: int, causal: bool) -> tuple[np.ndarray, ...]:
    """One process over the full sequence: the output and the gradients of q, k, v."""
    q0, k0, v0, upstream = full_inputs(heads, kv_heads)
    q, k, v = (Tensor(a.copy(), requires_grad=True) for a in (q0, k0, v0))
    out = scaled_dot_product_attention(q, k, v, causal=causal)
    (out * Tensor(upstream)).sum().backward()
    return out.data, q.grad, k.grad, v.grad


def run_case(case: tuple[Any, ...], group: Group) -> dict[str, float]:
    """Run `case` on this rank of `group` (of the case's cp size); the largest relative error
    of the output and of each gradient against the reference rows of this rank's tokens."""
    name, cp, mode, heads, kv_heads, causal = case
    assert group.size == cp
    pos = positions_of(mode, cp, group.rank)
    q0, k0, v0, upstream = full_inputs(heads, kv_heads)
    q, k, v = (Tensor(a[:, :, pos].copy(), requires_grad=True) for a in (q0, k0, v0))
    out = BACKENDS[name](q, k, v, group, pos, causal=causal)
    (out * Tensor(upstream[:, :, pos])).sum().backward()
    errors = {}
    got = (out.data, q.grad, k.grad, v.grad)
    wanted = reference(heads, kv_heads, causal)
    for what, mine, full in zip(("out", "dq", "dk", "dv"), got, wanted, strict=True):
        want = full[:, :, pos]
        assert mine is not None and mine.shape == want.shape, (what, np.shape(mine))
        errors[what] = float(np.abs(mine - want).max() / max(1.0, np.abs(want).max()))
    return errors


# The ledger cases: GQA with Hkv = 4, which every cp here divides.
LEDGER_HEADS, LEDGER_KV_HEADS = 8, 4


def ledger_rows(ledger: Ledger) -> list[dict[str, Any]]:
    """The ledger without its wall-clock seconds."""
    return [{k: v for k, v in row.items() if k != "time_s"} for row in ledger.as_list()]


def cp_payload(name: str, mode: str, group: Group, data_free: bool = False) -> dict[str, Any]:
    """One forward and backward of back end `name` on this rank of `group`: its ledger rows
    and matmul FLOPs. Data-free: q, k, v and the upstream gradient are MetaArrays."""
    group.ledger.reset()
    tl = SEQ // group.size
    q_shape = (BATCH, LEDGER_HEADS, tl, HEAD_DIM)
    kv_shape = (BATCH, LEDGER_KV_HEADS, tl, HEAD_DIM)
    if data_free:
        arrays = [meta.shaped(s, np.float64) for s in (q_shape, kv_shape, kv_shape, q_shape)]
    else:
        rng = np.random.default_rng(group.rank)
        arrays = [rng.standard_normal(s) for s in (q_shape, kv_shape, kv_shape, q_shape)]
    q, k, v = (Tensor(a, requires_grad=True) for a in arrays[:3])
    forward, backward = flop_meter.forward, flop_meter.backward
    out = BACKENDS[name](q, k, v, group, positions_of(mode, group.size, group.rank))
    out.backward(arrays[3])
    return {
        "ledger": ledger_rows(group.ledger),
        "flops": [flop_meter.forward - forward, flop_meter.backward - backward],
        "shapes": [list(t.grad.shape) for t in (q, k, v)],
    }


LEDGER_CASES = [(name, cp, mode) for name in BACKENDS for cp in (2, 4) for mode in MODES]


def row(op: str, phase: str, nbytes: int, calls: int, wire: int) -> dict[str, Any]:
    """A ledger row of the cp axis, as `ledger_rows` gives it."""
    return {
        "op": op,
        "axis": "cp",
        "phase": phase,
        "bytes": nbytes,
        "calls": calls,
        "wire_bytes": wire,
    }


def expected_rows(name: str, cp: int, mode: str, itemsize: int = 8) -> list[dict[str, Any]]:
    """The ledger rows parallel/context_parallel.py's docstring promises for a ledger case."""
    n, tl = cp, SEQ // cp
    kv = BATCH * LEDGER_KV_HEADS * tl * HEAD_DIM * itemsize  # one k or v shard
    q = BATCH * LEDGER_HEADS * tl * HEAD_DIM * itemsize  # q, or the output
    if name == "all_gather":
        rows = [
            row("all_gather", "forward", 2 * kv, 2, 2 * (n - 1) * kv),
            row("reduce_scatter", "backward", 2 * n * kv, 2, 2 * (n - 1) * kv),
        ]
    elif name == "ulysses":
        total = 2 * (q + kv)
        rows = [
            row("all_to_all", "backward", total, 4, (n - 1) * total // n),
            row("all_to_all", "forward", total, 4, (n - 1) * total // n),
        ]
    else:
        rows = [
            row("sendrecv", "backward", (4 * n - 2) * kv, 4 * n - 2, (4 * n - 2) * kv),
            row("sendrecv", "forward", 2 * (n - 1) * kv, 2 * (n - 1), 2 * (n - 1) * kv),
        ]
    if mode == "shuffled":  # the positions, learnt by an all-gather of int64s
        if name == "all_gather":  # the same row as the k, v shards'
            rows[0]["bytes"] += 8 * tl
            rows[0]["calls"] += 1
            rows[0]["wire_bytes"] += (n - 1) * 8 * tl
        else:
            rows.insert(0, row("all_gather", "forward", 8 * tl, 1, (n - 1) * 8 * tl))
    return rows


# ---- token placement ---------------------------------------------------------------------------
def test_contiguous_positions_are_the_rank_blocks() -> None:
    for cp in (1, 2, 4):
        for rank in range(cp):
            c = SEQ // cp
            np.testing.assert_array_equal(
                chunk_positions(SEQ, cp, rank, False), np.arange(rank * c, (rank + 1) * c)
            )


def test_balanced_positions_pair_chunk_i_with_its_mirror() -> None:
    np.testing.assert_array_equal(chunk_positions(16, 2, 0, True), [0, 1, 2, 3, 12, 13, 14, 15])
    np.testing.assert_array_equal(chunk_positions(16, 2, 1, True), [4, 5, 6, 7, 8, 9, 10, 11])
    np.testing.assert_array_equal(chunk_positions(8, 4, 1, True), [1, 6])
    for cp in (1, 2, 4):
        held = np.concatenate([chunk_positions(SEQ, cp, r, True) for r in range(cp)])
        assert sorted(held) == list(range(SEQ))  # every token once
        h = SEQ // (2 * cp)
        for rank in range(cp):
            chunks = chunk_positions(SEQ, cp, rank, True).reshape(2, h) // h
            assert chunks[:, 0].tolist() == [rank, 2 * cp - 1 - rank]
    assert chunk_positions(SEQ, 1, 0, True).tolist() == list(range(SEQ))


def test_positions_refuse_what_does_not_split() -> None:
    with pytest.raises(ValueError, match=r"^a sequence of 10 tokens does not split into cp = 4"):
        chunk_positions(10, 4, 0, False)
    with pytest.raises(ValueError, match=r"2·cp = 8 chunks \(balanced\)$"):
        chunk_positions(12, 4, 0, True)  # 12 splits over 4 ranks, not into 8 chunks
    with pytest.raises(ValueError, match="not a rank"):
        chunk_positions(16, 2, 2, False)
    for args in ((10, 4, 0, False), (12, 4, 0, True)):
        with pytest.raises(ValueError) as error:
            chunk_positions(*args)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("balance", [False, True])
def test_local_slice_takes_the_positions(balance: bool) -> None:
    tokens = np.arange(3 * SEQ).reshape(3, SEQ)
    for rank in range(4):
        part = local_slice(tokens, 4, rank, balance)
        np.testing.assert_array_equal(part, tokens[:, chunk_positions(SEQ, 4, rank, balance)])
        stacked = np.stack([tokens, -tokens])  # the sequence as the last of three axes
        np.testing.assert_array_equal(
            local_slice(stacked, 4, rank, balance, axis=-1),
            stacked[..., chunk_positions(SEQ, 4, rank, balance)],
        )
    assert np.shares_memory(local_slice(tokens, 4, 1, False), tokens)  # a view, no copy
    ids = meta.token_ids((3, SEQ))
    assert local_slice(ids, 4, 1, balance).shape == (3, SEQ // 4) and meta.is_meta(ids)
    with pytest.raises(ValueError, match="does not split"):
        local_slice(np.zeros((2, 6)), 4, 0, balance)


def pairs_per_rank(seq: int, cp: int, balance: bool) -> list[int]:
    """Each rank's unmasked (query, key) pairs: the True entries of its queries' masks against
    the whole sequence."""
    keys = np.arange(seq)
    return [
        int(_visible(chunk_positions(seq, cp, rank, balance), keys).sum()) for rank in range(cp)
    ]


@pytest.mark.parametrize(("seq", "cp"), [(16, 2), (16, 4), (64, 4), (96, 8), (1024, 8)])
def test_balancing_equalises_the_causal_work(seq: int, cp: int) -> None:
    """Query p sees p + 1 keys. Contiguous, rank i holds c = s/cp queries from i·c, so
    Σ (p + 1) = (i + 1/2)·c² + c/2: rank cp−1 has 2cp − 1 times rank 0's quadratic part.
    Balanced, chunks i and 2cp−1−i of h = s/2cp give h²(i + 1/2) + h/2 + h²(2cp−1−i + 1/2)
    + h/2 = 2cp·h² + h = s(s + 1)/(2cp) on every rank: the total s(s + 1)/2 split evenly."""
    c = seq // cp
    contiguous = pairs_per_rank(seq, cp, False)
    assert contiguous == [((2 * i + 1) * c * c + c) // 2 for i in range(cp)]  # exact, integers
    balanced = pairs_per_rank(seq, cp, True)
    assert all(2 * cp * n == seq * (seq + 1) for n in balanced)
    assert sum(balanced) == sum(contiguous) == seq * (seq + 1) // 2


def test_the_ring_skips_exactly_the_blocks_no_query_sees() -> None:
    """Contiguous, rank i computes i + 1 of the cp blocks (FLOPs say so); balanced, all cp."""
    cp, tl = 4, SEQ // 4
    block = 2 * BATCH * LEDGER_KV_HEADS * (LEDGER_HEADS // LEDGER_KV_HEADS) * tl * tl * HEAD_DIM
    for balance, mode in ((False, "contiguous"), (True, "balanced")):
        for rank in range(cp):
            group = virtual_mesh(cp=cp, rank=rank).group("cp")
            flops = cp_payload("ring", mode, group, data_free=True)["flops"]
            blocks = cp if balance else rank + 1
            assert flops == [2 * block * blocks, 5 * block * blocks], (mode, rank)


# ---- the collectives ---------------------------------------------------------------------------
def test_one_rank_all_to_all_and_sendrecv_return_their_input() -> None:
    ledger = Ledger()
    group = Group(SelfComm(), "cp", ledger)
    x = np.arange(24.0).reshape(2, 3, 4)
    assert group.all_to_all(x, 1, 2) is x
    assert group.sendrecv(x, 0, 0) is x
    assert ledger.as_list() == []


def test_virtual_all_to_all_and_sendrecv_fill_and_record() -> None:
    n, e = 4, 8
    mesh = virtual_mesh(cp=n, rank=2)
    cp = mesh.group("cp")
    x = np.arange(2 * 8 * 3, dtype=np.float64).reshape(2, 8, 3)
    # As if every rank held this one's x: block r of the result is this rank's chunk 2.
    np.testing.assert_array_equal(cp.all_to_all(x, 1, 0), np.concatenate([x[:, 4:6]] * n))
    np.testing.assert_array_equal(cp.all_to_all(x, 1, 2), np.concatenate([x[:, 4:6]] * n, 2))
    received = cp.sendrecv(x, 3, 1)
    assert received.shape == x.shape and not received.any()
    data_free = cp.all_to_all(meta.shaped((2, 8, 3), np.float32), 1, 2)
    assert meta.is_meta(data_free) and data_free.shape == (2, 2, 12)
    assert meta.is_meta(cp.sendrecv(meta.shaped((5,), np.float32), 3, 1))
    s = x.size * e
    rows = {r["op"]: (r["bytes"], r["wire_bytes"], r["calls"]) for r in ledger_rows(mesh.ledger)}
    assert rows == {
        "all_to_all": (2 * s + 48 * 4, 2 * (n - 1) * s // n + (n - 1) * 48 * 4 // n, 3),
        "sendrecv": (s + 5 * 4, s + 5 * 4, 2),
    }


# ---- attention on one rank and on virtual meshes -------------------------------------------------
@pytest.mark.parametrize("name", BACKENDS)
def test_a_group_of_one_is_plain_attention(name: str) -> None:
    group = Group(SelfComm(), "cp", Ledger())
    q0, k0, v0, upstream = full_inputs(4, 2)
    q, k, v = (Tensor(a.copy(), requires_grad=True) for a in (q0, k0, v0))
    out = BACKENDS[name](q, k, v, group, chunk_positions(SEQ, 1, 0, True))
    (out * Tensor(upstream)).sum().backward()
    for got, want in zip((out.data, q.grad, k.grad, v.grad), reference(4, 2, True), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert group.ledger.as_list() == []


def test_ulysses_refuses_a_cp_that_does_not_divide_the_kv_heads() -> None:
    group = virtual_mesh(cp=4, rank=0).group("cp")
    q = Tensor(np.zeros((1, 4, 4, 8)), requires_grad=True)
    kv = Tensor(np.zeros((1, 2, 4, 8)), requires_grad=True)
    with pytest.raises(ValueError, match=r"cp = 4 to divide the kv heads \(2\)"):
        ulysses_attention(q, kv, kv, group, chunk_positions(16, 4, 0, False))
    assert group.ledger.as_list() == []  # refused before anything moved


@pytest.mark.parametrize(("cp", "itemsize"), [(2, 8), (4, 8), (4, 4)])
def test_one_ring_step_sends_a_k_and_a_v_block(cp: int, itemsize: int) -> None:
    b, heads, kv_heads, tl, d = 2, 8, 2, 5, 16
    dtype = np.float64 if itemsize == 8 else np.float32
    group = virtual_mesh(cp=cp, rank=1).group("cp")
    q = Tensor(meta.shaped((b, heads, tl, d), dtype), requires_grad=True)
    k, v = (Tensor(meta.shaped((b, kv_heads, tl, d), dtype), requires_grad=True) for _ in "kv")
    pos = np.arange(tl, 2 * tl)  # rank 1's contiguous block
    out = ring_attention(q, k, v, group, pos)
    step = 2 * b * tl * kv_heads * d * itemsize
    ledger = group.ledger
    assert ledger.bytes("sendrecv", "cp", "forward") == (cp - 1) * step
    assert ledger.calls("sendrecv", "cp", "forward") == 2 * (cp - 1)
    assert ledger.bytes() == (cp - 1) * step  # nothing else moved
    out.backward(meta.shaped(out.shape, dtype))
    assert ledger.bytes("sendrecv", "cp", "backward") == (2 * cp - 1) * step
    assert ledger.calls("sendrecv", "cp", "backward") == 4 * cp - 2


def test_the_ring_keeps_its_output_and_lse() -> None:
    """Leaf q, k, v are not counted; the node holds the output and the log-sum-exp."""
    group = virtual_mesh(cp=2, rank=0).group("cp")
    q = Tensor(np.ones((1, 4, 8, 8)), requires_grad=True)
    kv = Tensor(np.ones((1, 2, 8, 8)), requires_grad=True)
    start = activation_meter.live
    out = ring_attention(q, kv, kv, group, chunk_positions(16, 2, 0, True))
    assert activation_meter.live - start == out.data.nbytes + out.data.nbytes // 8
    del out
    assert activation_meter.live == start


# ---- 4 ranks -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mpi_cp() -> dict:
    return run_worker(4, "cp_worker", timeout=120)


CHECKS = [
    "all_to_all_values",
    "sendrecv_ring",
    "attention_equals_one_process",
    "ledgers_follow_the_docstring",
    "ledger_payloads",
]


@pytest.mark.parametrize("name", CHECKS)
def test_mpi(mpi_cp: dict, name: str) -> None:
    assert name in mpi_cp["results"], f"check {name} did not run"
    assert mpi_cp["results"][name] == []


def test_mpi_ran_nothing_unexpected(mpi_cp: dict) -> None:
    assert sorted(mpi_cp["results"]) == sorted(CHECKS)


def test_mpi_covered_every_attention_case(mpi_cp: dict) -> None:
    errors = mpi_cp["data"]["attention_errors"]
    assert sorted(errors) == sorted(case_id(c) for c in attention_cases())
    worst = max(e for case in errors.values() for e in case.values())
    assert worst < TOL, worst


@pytest.mark.parametrize("data_free", [True, False], ids=["data-free", "real"])
@pytest.mark.parametrize(("name", "cp", "mode"), LEDGER_CASES)
def test_a_virtual_call_records_what_an_executed_call_records(
    mpi_cp: dict, name: str, cp: int, mode: str, data_free: bool
) -> None:
    executed = mpi_cp["data"]["payloads"][f"{name}-cp{cp}-{mode}"]  # by world rank
    for world_rank, theirs in enumerate(executed):
        group = virtual_mesh(cp=cp, rank=world_rank % cp).group("cp")
        mine = cp_payload(name, mode, group, data_free)
        assert mine["ledger"] == theirs["ledger"] == expected_rows(name, cp, mode), world_rank
        assert mine["shapes"] == theirs["shapes"], world_rank
        # A virtual all-gather of shuffled positions returns this rank's own n times, so the ring
        # may skip other blocks than an executed run: only the FLOPs of known layouts agree.
        if not (name == "ring" and mode == "shuffled"):
            assert mine["flops"] == theirs["flops"], world_rank
