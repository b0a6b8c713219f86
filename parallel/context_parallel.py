"""Context parallelism: attention over a sequence whose tokens are sharded over the `cp` group.

Every activation of a context-parallel layer holds this rank's Tl = T/cp tokens only; the
token-wise layers need nothing more, but attention must still see the whole causal context.
`chunk_positions` says which global positions a rank holds, and three back ends compute this
rank's rows of full causal attention from the sharded q, k, v, each exactly (up to rounding)
what one process gives over the full sequence, in value and in the gradients of q, k and v:

- `all_gather_attention`: all-gather k and v along the sequence (backward: reduce-scatter their
  gradients to their owners), then this rank's queries attend to every key.
- `ulysses_attention` (DeepSpeed-Ulysses, Jacobs et al. 2023): all-to-all from sequence-sharded
  to head-sharded, full-sequence attention over H/cp heads, all-to-all back.
- `ring_attention` (Liu et al. 2023; the cp of Megatron-core): the k, v blocks travel around the
  ring and each step's partial attention is merged by log-sum-exp; one fused node whose
  backward recomputes each block flash-attention style.

All take q of shape (B, H, Tl, D) and k, v of shape (B, Hkv, Tl, D) with Hkv dividing H
(grouped-query attention: query head h reads kv head h // (H/Hkv)), and `positions`, the global
positions of this rank's Tl tokens, in local order. Scores are scaled by 1/√D; causal means
query position i sees key positions <= i. The masks are built from positions, so the
load-balanced order of `chunk_positions(..., balance=True)` works as the contiguous one does.

The peers' positions: when `positions` is this rank's part of one of `chunk_positions`' two
layouts, every rank's positions follow from the group size and rank alone (no message; a
data-free run on a virtual mesh then masks exactly as an executed one). Any other placement is
learnt by an all-gather of the int64 positions (Tl·8 bytes, recorded as an "all_gather" row).

What each back end records in the ledger, under the group's axis, for n = cp ranks, e the
element size (`Ledger.itemsize`) and a k or v shard of S_kv = B·Hkv·Tl·D·e bytes (S_q = B·H·Tl·D·e
for q and the output); "wire" is `Ledger.wire_bytes`:

- all-gather: forward 2 "all_gather" calls (k, v) of S_kv bytes each (wire (n−1)·S_kv each);
  backward 2 "reduce_scatter" calls of the gathered gradients, n·S_kv bytes each (wire
  (n−1)·S_kv each).
- Ulysses: forward 4 "all_to_all" calls: q (S_q), k (S_kv), v (S_kv) and the output (S_q),
  2·(S_q + S_kv) bytes in all (wire: (n−1)/n of each); backward the same 4 with the gradients
  (dout, then dq, dk, dv), the same bytes.
- ring: forward n−1 steps of 2 "sendrecv" calls (the k block, the v block) of S_kv bytes:
  2·B·Tl·Hkv·D·e a step, 2·(n−1)·S_kv in all. Backward n−1 steps of 4 calls (k, v, and their
  dK, dV accumulators), then one last step of 2 (dK, dV back to their owner): (4n − 2)·S_kv.
  Blocks the causal mask hides from every local query are not computed, but always sent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from civetta import axioms as ax
from civetta import meta
from civetta.functional import _kv_groups
from civetta.fused import softmax
from civetta.meters import flop_meter, gemm_log
from civetta.tensor import Tensor, current_precision, make_node
from parallel.comm import Group
from parallel.redirect import exchange, gather_from_sequence_region

Attention = Callable[..., Tensor]


# ---- which tokens a rank holds -------------------------------------------------------------------
def _chunk_ranges(seq_len: int, cp: int, rank: int, balance: bool) -> list[tuple[int, int]]:
    """The [start, stop) ranges of global positions rank `rank` holds, in local order."""
    if cp < 1 or not 0 <= rank < cp:
        raise ValueError(f"rank {rank} is not a rank of a cp group of {cp}")
    pieces = 2 * cp if balance else cp
    if seq_len % pieces:
        how = f"2·cp = {pieces} chunks (balanced)" if balance else f"cp = {cp} ranks"
        raise ValueError(f"a sequence of {seq_len} tokens does not split into {how}")
    size = seq_len // pieces
    if not balance:
        return [(rank * size, (rank + 1) * size)]
    # Causal load balancing (Megatron-core): chunk i is cheap, chunk 2·cp−1−i dear; each rank
    # takes one of each, so every rank has the same number of (query, key) pairs to compute.
    mirror = pieces - 1 - rank
    return [(rank * size, (rank + 1) * size), (mirror * size, (mirror + 1) * size)]


def chunk_positions(seq_len: int, cp: int, rank: int, balance: bool) -> np.ndarray:
    """The global token positions (int64) cp rank `rank` holds, in local order.

    Without `balance` the contiguous block rank·s/cp ... (rank+1)·s/cp − 1; with it the
    sequence cut into 2·cp equal chunks and rank i holding chunk i then chunk 2·cp − 1 − i.
    """
    ranges = _chunk_ranges(seq_len, cp, rank, balance)
    return np.concatenate([np.arange(start, stop, dtype=np.int64) for start, stop in ranges])


def local_slice(x: np.ndarray, cp: int, rank: int, balance: bool, axis: int = 1) -> np.ndarray:
    """Rank `rank`'s part along `axis` of a full-sequence array (token ids or targets (B, T)),
    in the order of `chunk_positions`: a view without `balance`, a fresh array with it.
    Data-free arrays (`civetta.meta`) give data-free parts."""
    axis %= x.ndim
    ranges = _chunk_ranges(x.shape[axis], cp, rank, balance)
    lead = (slice(None),) * axis
    parts = [x[(*lead, slice(start, stop))] for start, stop in ranges]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)


def _all_positions(positions: np.ndarray, group: Group) -> np.ndarray:
    """Every group rank's positions, shape (n, Tl), row r being rank r's (see the module doc)."""
    n, local = group.size, len(positions)
    if n == 1:
        return positions[None]
    for balance in (False, True):
        if balance and local % 2:
            continue
        mine = chunk_positions(local * n, n, group.rank, balance)
        if np.array_equal(positions, mine):
            return np.stack([chunk_positions(local * n, n, r, balance) for r in range(n)])
    with group.ledger.phase("forward"):
        return group.all_gather(np.ascontiguousarray(positions)).reshape(n, local)


def _visible(q_pos: np.ndarray, k_pos: np.ndarray, like: Any = None) -> Any:
    """(Tq, Tk) True where the query at q_pos[i] may attend to the key at k_pos[j]; for a
    data-free step (`like` data-free) only its shape, since a long sequence's mask is large."""
    if like is not None and meta.is_meta(like):
        return meta.MetaArray((len(q_pos), len(k_pos)), np.bool_)
    return k_pos[None, :] <= q_pos[:, None]


def _checked(
    q: Tensor, k: Tensor, v: Tensor, positions: Sequence[int] | np.ndarray
) -> tuple[int, np.ndarray]:
    """(query heads per kv head, positions as int64) after checking the shapes agree."""
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        raise ValueError(
            f"attention needs q (B, H, Tl, D), k and v (B, Hkv, Tl, D): got q "
            f"{q.shape}, k {k.shape}, v {v.shape}"
        )
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q {q.shape} and k, v {k.shape} disagree on B, Tl or D")
    groups = _kv_groups(q, k, v)
    pos = np.asarray(positions, dtype=np.int64)
    if pos.shape != (q.shape[2],):
        raise ValueError(f"{pos.shape} positions for {q.shape[2]} local tokens")
    return groups, pos


def _masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: np.ndarray | None) -> Tensor:
    """softmax(q·kᵀ/√D where `mask`)·v over local ops: `fused.scaled_dot_product_attention`
    with a (Tq, Tk) mask of any pattern; grouped-query heads share their kv head's GEMM."""
    groups = _kv_groups(q, k, v)
    b, heads, t_query, d = q.shape
    kv_heads, t_key = k.shape[1], k.shape[2]
    scaled = ax.mul(q, 1.0 / math.sqrt(d))
    grouped = ax.reshape(scaled, (b, kv_heads, groups * t_query, d))
    scores = ax.matmul(grouped, ax.transpose(k, (0, 1, 3, 2)))  # (B, Hkv, g·Tq, Tk)
    probs = softmax(ax.reshape(scores, (b, heads, t_query, t_key)), mask)
    out = ax.matmul(ax.reshape(probs, (b, kv_heads, groups * t_query, t_key)), v)
    return ax.reshape(out, (b, heads, t_query, d))


# ---- all-gather --------------------------------------------------------------------------------
def all_gather_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: Group,
    positions: Sequence[int] | np.ndarray,
    causal: bool = True,
) -> Tensor:
    """This rank's queries against every rank's keys: k and v all-gathered along the sequence
    (their gradients reduce-scattered back to the owners), then masked attention."""
    _, pos = _checked(q, k, v, positions)
    key_pos = _all_positions(pos, group).reshape(-1)  # the gathered keys' order: rank by rank
    k_all = gather_from_sequence_region(k, group, axis=2)
    v_all = gather_from_sequence_region(v, group, axis=2)
    return _masked_attention(q, k_all, v_all, _visible(pos, key_pos, q.data) if causal else None)


# ---- Ulysses (all-to-all) ------------------------------------------------------------------------
def _all_to_all(x: Tensor, group: Group, split_axis: int, concat_axis: int) -> Tensor:
    """`Group.all_to_all` as an autograd op; the backward is the inverse all-to-all."""
    return exchange(
        x,
        group,
        lambda a: group.all_to_all(a, split_axis, concat_axis),
        lambda g: group.all_to_all(g, concat_axis, split_axis),
    )


def ulysses_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: Group,
    positions: Sequence[int] | np.ndarray,
    causal: bool = True,
) -> Tensor:
    """DeepSpeed-Ulysses: all-to-all q, k, v to H/cp query and Hkv/cp kv heads over the whole
    sequence, attend locally, all-to-all the output back to this rank's tokens."""
    _, pos = _checked(q, k, v, positions)
    n, heads, kv_heads = group.size, q.shape[1], k.shape[1]
    if kv_heads % n:
        raise ValueError(
            f"ulysses attention needs cp = {n} to divide the kv heads ({kv_heads}) and the "
            f"query heads ({heads})"
        )
    # Rank j gets query heads j·H/n ... and kv heads j·Hkv/n ...: a contiguous run of whole
    # GQA groups, so local head h still reads local kv head h // (H/Hkv).
    seq_pos = _all_positions(pos, group).reshape(-1)
    q_h = _all_to_all(q, group, 1, 2)  # (B, H/n, n·Tl, D)
    k_h = _all_to_all(k, group, 1, 2)
    v_h = _all_to_all(v, group, 1, 2)
    out = _masked_attention(q_h, k_h, v_h, _visible(seq_pos, seq_pos, q.data) if causal else None)
    return _all_to_all(out, group, 2, 1)  # (B, H, Tl, D)


# ---- ring --------------------------------------------------------------------------------------
def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: Group,
    positions: Sequence[int] | np.ndarray,
    causal: bool = True,
) -> Tensor:
    """Ring attention, one node: the k, v blocks go around the ring (sendrecv to rank+1, from
    rank−1) and each block's partial attention is merged with a running max m, a running sum l
    and a rescaled output (log-sum-exp), never a whole-row softmax.

    The backward recomputes each block's probabilities from the saved log-sum-exp,
    P = exp(S − lse), as flash-attention does, while the blocks travel the ring again with
    their dK, dV accumulators, which end at their owner. Keeps q, k, v, the output and lse.
    The query heads of one kv head are one GEMM's rows (g·Tl of them), so k and v are never
    repeated. Step 0 is this rank's own block, which holds every query's own position: each
    row's max is finite from then on, so no row ever computes exp(−∞ + ∞).
    """
    groups, pos = _checked(q, k, v, positions)
    b, heads, tl, d = q.shape
    kv_heads = k.shape[1]
    n, rank, ledger = group.size, group.rank, group.ledger
    dest, source = (rank + 1) % n, (rank - 1) % n
    qd, kd, vd = q.data, k.data, v.data
    dtype = qd.dtype
    scale = dtype.type(1.0 / math.sqrt(d))
    rows = (b, kv_heads, groups * tl)  # a query row: (kv head, its query head, token)
    split = (b, kv_heads, groups, tl, tl)  # a block's scores, the query head axis apart
    all_pos = _all_positions(pos, group)
    # At step s this rank holds rank (rank − s)'s block: None computes it whole, an array hides
    # its False entries, and a block no local query sees is skipped (but still passed on).
    hidden: list[Any] = []
    skip: list[bool] = []
    for step in range(n):
        k_pos = all_pos[(rank - step) % n]
        # Key j is visible to query i when k_pos[j] <= pos[i]: all of them when the latest key
        # precedes the earliest query, none when the earliest key follows the latest query.
        every = not causal or bool(k_pos.max() <= pos.min())
        skip.append(causal and bool(k_pos.min() > pos.max()))
        if every or skip[-1]:
            hidden.append(None)
        elif meta.is_meta(qd):  # a data-free step has no scores to mask: the shape will do
            hidden.append(meta.MetaArray((tl, len(k_pos)), np.bool_))
        else:
            hidden.append(~_visible(pos, k_pos))
    computed = n - sum(skip)
    # Per computed block and kv head: GEMMs of g·Tl × D × Tl (scores) and g·Tl × Tl × D (P·V).
    block_flops = 2 * b * kv_heads * groups * tl * tl * d
    precision = current_precision()
    flop_meter.forward += 2 * block_flops * computed

    def scores(q_scaled: np.ndarray, k_block: np.ndarray, step: int, phase: str) -> np.ndarray:
        """S = q·kᵀ/√D of one block, hidden entries −∞: (B, Hkv, g·Tl, Tl)."""
        gemm_log.record(groups * tl, d, tl, b * kv_heads, phase, dtype, precision)
        s = q_scaled @ k_block.swapaxes(-1, -2)
        mask = hidden[step]
        if mask is not None:
            np.copyto(s.reshape(split), dtype.type(-np.inf), where=mask)
        return s

    q_scaled = (qd * scale).reshape(*rows, d)
    out = meta.zeros((*rows, d), dtype, like=qd)
    row_max = meta.empty((*rows, 1), dtype, like=qd)
    row_max.fill(-np.inf)
    row_sum = meta.zeros((*rows, 1), dtype, like=qd)
    k_block, v_block = kd, vd
    for step in range(n):
        if step < n - 1:  # pass the blocks on first: a real ring overlaps this with the math
            with ledger.phase("forward"):
                k_next = group.sendrecv(k_block, dest, source, tag=0)
                v_next = group.sendrecv(v_block, dest, source, tag=1)
        if not skip[step]:
            s = scores(q_scaled, k_block, step, "forward")
            new_max = np.maximum(row_max, s.max(axis=-1, keepdims=True))
            rescale = np.exp(row_max - new_max)  # exp(−∞) = 0 before the first block
            s -= new_max
            np.exp(s, out=s)  # P̃, the block's unnormalised probabilities
            row_sum *= rescale
            row_sum += s.sum(axis=-1, keepdims=True)
            gemm_log.record(groups * tl, tl, d, b * kv_heads, "forward", dtype, precision)
            out *= rescale
            out += s @ v_block
            np.copyto(row_max, new_max)
        if step < n - 1:
            k_block, v_block = k_next, v_next
    out /= row_sum
    lse = row_max + np.log(row_sum)  # log Σ exp(S) per query row

    def backward(g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        flop_meter.backward += 5 * block_flops * computed
        d_out = g.reshape(*rows, d)
        q_s = (qd * scale).reshape(*rows, d)
        delta = (d_out * out).sum(axis=-1, keepdims=True)  # D = rowsum(dO ⊙ O)
        dq = meta.zeros((*rows, d), dtype, like=qd)
        k_blk, v_blk = kd, vd
        dk = meta.zeros(kd.shape, dtype, like=kd)  # the accumulators travel with their block
        dv = meta.zeros(vd.shape, dtype, like=vd)
        for step in range(n):
            if step < n - 1:
                with ledger.phase("backward"):
                    k_nxt = group.sendrecv(k_blk, dest, source, tag=0)
                    v_nxt = group.sendrecv(v_blk, dest, source, tag=1)
            if not skip[step]:
                p = scores(q_s, k_blk, step, "forward")  # S again: recomputation, not model
                p -= lse
                np.exp(p, out=p)  # P, hidden entries exactly 0
                for m_, k_, n_ in ((tl, groups * tl, d), (groups * tl, d, tl)):
                    gemm_log.record(m_, k_, n_, b * kv_heads, "backward-input", dtype, precision)
                dv += p.swapaxes(-1, -2) @ d_out  # Pᵀ·dO, summed over the group's query heads
                ds = d_out @ v_blk.swapaxes(-1, -2)  # dP
                ds -= delta
                ds *= p  # dS = P ⊙ (dP − D)
                for m_, k_, n_ in ((groups * tl, tl, d), (tl, groups * tl, d)):
                    gemm_log.record(m_, k_, n_, b * kv_heads, "backward-input", dtype, precision)
                dq += ds @ k_blk
                dk += ds.swapaxes(-1, -2) @ q_s  # q_s carries the 1/√D of dS·q
            with ledger.phase("backward"):
                # After the last step the accumulators are one hop from their owner.
                dk = group.sendrecv(dk, dest, source, tag=2)
                dv = group.sendrecv(dv, dest, source, tag=3)
            if step < n - 1:
                k_blk, v_blk = k_nxt, v_nxt
        dq *= scale
        return dq.reshape(b, heads, tl, d), dk, dv

    return make_node(
        out.reshape(b, heads, tl, d), (q, k, v), backward, saved=(qd, kd, vd, out, lse)
    )


# The back ends by the name a config gives them.
BACKENDS: dict[str, Attention] = {
    "all_gather": all_gather_attention,
    "ulysses": ulysses_attention,
    "ring": ring_attention,
}
