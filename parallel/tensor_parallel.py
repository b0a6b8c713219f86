"""Tensor parallelism: slicing the hidden dimension across the ranks of the tp group.

`TensorParallelSharding` has the methods of `civetta.nn.DenseSharding`, so the GPT code is the
same for every layout; only where parameters live and which redirections wrap them changes
(Megatron-LM's scheme):

- column-parallel linear (attn.c_attn with whole heads per rank, mlp.c_fc): each rank keeps a
  slice of the output features; its input enters through `copy_to_region`;
- row-parallel linear (attn.c_proj, mlp.c_proj): each rank keeps a slice of the input features
  and produces a partial sum, completed by `reduce_from_region`; the bias is added after it;
- vocab-parallel embedding and cross-entropy: each rank keeps a slice of the vocabulary rows; the
  full logits are never gathered.

With sequence parallelism the residual stream, LayerNorms and positions are split along the
sequence: column-parallel layers enter through an all-gather (`gather_from_sequence_region`),
row-parallel layers exit through a reduce-scatter, and replicated parameters receive partial
gradients that the runtime sums over the tp group.

Every rank builds the full weight from the name-seeded initialiser and keeps its slice, so every
layout starts from exactly the single-process weights. Parameters are created and applied
through the sharding's parameter store, so ZeRO-3 (`parallel.zero.ShardedStore`) can further shard
each tensor-parallel slice over the data-parallel group.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from civetta import axioms as ax
from civetta import meta
from civetta.nn import WHOLE, DenseSharding, Module, ParameterStore, normal_init
from civetta.tensor import Tensor
from parallel.comm import Group
from parallel.redirect import (
    copy_to_region,
    gather_from_region,
    gather_from_sequence_region,
    reduce_from_region,
    reduce_scatter_to_region,
)
from parallel.sharding import join_shards

SEQUENCE_AXIS = 1  # activations are (B, T, C)


def shard_range(length: int, rank: int, size: int) -> slice:
    """Rank `rank`'s contiguous equal part of `length` items."""
    assert length % size == 0, (length, size)
    part = length // size
    return slice(rank * part, (rank + 1) * part)


def column_rows(out_features: int, packed: int, rank: int, size: int) -> np.ndarray:
    """Output rows a rank keeps: its part of each of the `packed` equal blocks (q, k, v), so
    every head keeps its q, k and v rows on one rank."""
    block = out_features // packed
    mine = shard_range(block, rank, size)
    return np.concatenate([np.arange(block)[mine] + i * block for i in range(packed)])


class TensorParallelSharding(DenseSharding):
    """Where each GPT parameter lives under tensor (and optionally sequence) parallelism."""

    def __init__(
        self,
        group: Group,
        sequence_parallel: bool = False,
        store: ParameterStore = WHOLE,
        context: Any = None,
        experts: Any = None,
    ) -> None:
        super().__init__(store, context, experts)
        self.group = group
        self.tp_size = group.size
        self.rank = group.rank
        self.sequence_parallel = sequence_parallel
        # Parameter name -> (axis it is split along, number of packed blocks split separately).
        self.placements: dict[str, tuple[int, int]] = {}
        # Replicated parameters each rank uses on its own part (Qwen3's per-head q/k norms):
        # their gradients are partial sums, added over tp before the update.
        self.partial_over_tp: set[str] = set()
        self.vocab_start = 0

    def is_sharded(self, name: str) -> bool:
        return name in self.placements

    def full_array(self, name: str, local: np.ndarray) -> np.ndarray:
        """The whole parameter (or gradient) from every rank's shard; collective over tp."""
        if name not in self.placements:
            return local
        placement = self.placements[name]
        gathered = self.group.all_gather(local, axis=placement[0])
        return join_shards(np.split(gathered, self.tp_size, axis=placement[0]), placement)

    # ---- entry and exit of the tensor-parallel regions ----------------------------------------
    def _enter(self, x: Tensor) -> Tensor:
        if self.sequence_parallel:
            return gather_from_sequence_region(x, self.group, SEQUENCE_AXIS)
        return copy_to_region(x, self.group)

    def _exit(self, partial: Tensor) -> Tensor:
        if self.sequence_parallel:
            return reduce_scatter_to_region(partial, self.group, SEQUENCE_AXIS)
        return reduce_from_region(partial, self.group)

    # ---- layers ---------------------------------------------------------------------------------
    def column_linear(self, name: str, in_features: int, out_features: int, **kw: Any) -> Module:
        """See `_column_params` for the keywords (bias, std, seed, dtype, packed)."""
        weight, b, params = self._column_params(name, in_features, out_features, **kw)
        store = self.store

        def forward(x: Tensor) -> Tensor:
            return store.linear(self._enter(x), weight, b)  # (B, T, out/tp)

        return Module(forward, params)

    def _column_params(
        self,
        name: str,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        std: float = 0.02,
        seed: int = 0,
        dtype: Any = np.float32,
        packed: int = 1,
    ) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        """This rank's rows of a column-parallel linear: (weight, bias, params by name)."""
        rows = column_rows(out_features, packed, self.rank, self.tp_size)
        full = normal_init(f"{name}.weight", (out_features, in_features), std, seed)
        weight = self.store.create(f"{name}.weight", full[rows], dtype)
        params = {f"{name}.weight": weight}
        b = None
        if bias:
            b = self.store.create(f"{name}.bias", meta.zeros(len(rows)), dtype)
            params[f"{name}.bias"] = b
        self.placements.update((p, (0, packed)) for p in params)
        return weight, b, params

    def column_linears(
        self, names: list[str], in_features: int, out_features: list[int], **kw: Any
    ) -> Module:
        # This rank's rows of each; applied after one shared entry into the region.
        local = [
            self._column_params(name, in_features, out, **kw)
            for name, out in zip(names, out_features, strict=True)
        ]
        store = self.store

        def forward(x: Tensor) -> tuple[Tensor, ...]:
            entered = self._enter(x)
            return tuple(store.linear(entered, weight, b) for weight, b, _ in local)

        params: dict[str, Tensor] = {}
        for _, _, p in local:
            params.update(p)
        return Module(forward, params)

    def row_linear(
        self,
        name: str,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        std: float = 0.02,
        seed: int = 0,
        dtype: Any = np.float32,
    ) -> Module:
        cols = shard_range(in_features, self.rank, self.tp_size)
        full = normal_init(f"{name}.weight", (out_features, in_features), std, seed)
        store = self.store
        weight = store.create(f"{name}.weight", full[:, cols], dtype)
        params = {f"{name}.weight": weight}
        self.placements[f"{name}.weight"] = (1, 1)
        b = None
        if bias:  # replicated: added once, after the partial sums are combined
            b = store.create(f"{name}.bias", meta.zeros(out_features), dtype)
            params[f"{name}.bias"] = b

        def forward(x: Tensor) -> Tensor:
            y = self._exit(store.linear(x, weight, None))
            return y if b is None else store.affine(y, None, b)

        return Module(forward, params)

    def token_embedding(
        self, name: str, vocab_size: int, dim: int, *, std: float = 0.02, seed: int = 0, dtype: Any
    ) -> Module:
        rows = shard_range(vocab_size, self.rank, self.tp_size)
        self.vocab_start = rows.start
        local_vocab = rows.stop - rows.start
        full = normal_init(f"{name}.weight", (vocab_size, dim), std, seed)
        store = self.store
        weight = store.create(f"{name}.weight", full[rows], dtype)
        self.placements[f"{name}.weight"] = (0, 1)
        start = rows.start

        def forward(idx: np.ndarray) -> Tensor:
            local = idx - start
            outside = (local < 0) | (local >= local_vocab)
            rows_picked = store.lookup(weight, np.where(outside, 0, local))  # (B, T, C)
            keep = Tensor((~outside)[..., None].astype(weight.dtype))  # real or data-free
            return self._exit(ax.mul(rows_picked, keep))  # tokens of other ranks count 0

        return Module(forward, {f"{name}.weight": weight})

    def local_positions(self, block: int) -> np.ndarray:
        positions = self.token_positions(block)
        if self.sequence_parallel:
            return positions[shard_range(block, self.rank, self.tp_size)]
        return positions

    # ---- the head -------------------------------------------------------------------------------
    def lm_logits(self, hidden: Tensor, weight: Tensor) -> Tensor:
        """Full logits, gathered over the vocabulary (for evaluation and sampling only)."""
        local = self.store.linear(self._enter(hidden), weight, None)
        return gather_from_region(local, self.group, axis=-1)

    def lm_loss(self, hidden: Tensor, weight: Tensor, targets: np.ndarray) -> Tensor:
        logits = self.store.linear(self._enter(hidden), weight, None)  # (B, T, V/tp)
        return vocab_parallel_cross_entropy(logits, targets, self.group, self.vocab_start)


def vocab_parallel_cross_entropy(
    logits: Tensor, targets: np.ndarray, group: Group, vocab_start: int
) -> Tensor:
    """Mean cross-entropy when each rank holds the logits of a slice of the vocabulary.

    log Σ exp is assembled from per-rank sums shifted by the global max; the target's logit comes
    from the rank that owns it. Two all-reduces of (B, T) values, never the (B, T, V) logits.
    """
    local_vocab = logits.shape[-1]
    shift = group.all_reduce(np.max(logits.data, axis=-1, keepdims=True), op="max")  # (B, T, 1)
    shifted = ax.add(logits, Tensor(-shift))
    sum_exp = reduce_from_region(ax.sum(ax.exp(shifted), axis=-1), group)  # (B, T)

    local_targets = targets - vocab_start
    mine = (local_targets >= 0) & (local_targets < local_vocab)
    flat = ax.reshape(shifted, (-1, local_vocab))
    rows = meta.arange(flat.shape[0], like=flat.data)
    picked = ax.getitem(flat, (rows, np.where(mine, local_targets, 0).reshape(-1)))
    picked = ax.mul(ax.reshape(picked, targets.shape), Tensor(mine.astype(logits.dtype)))
    target_logit = reduce_from_region(picked, group)  # (B, T)

    nll = ax.add(ax.log(sum_exp), ax.neg(target_logit))
    return ax.mul(ax.sum(nll), 1.0 / targets.size)
