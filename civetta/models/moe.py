"""A mixture-of-experts MLP (Mixtral's sparse block) for the Llama family, single process.

`LlamaConfig(..., moe=MoEConfig(...))` replaces every decoder layer's SwiGLU MLP by
`SparseMoE`: a bias-free router (n_embd → experts), a softmax over the experts in the model's
dtype, the top-k experts of each token with their k probabilities renormalised to sum 1, and
output = Σ_j weight_j · expert_{e_j}(x), each expert a SwiGLU MLP w2(silu(w1 x) · w3 x).
Parameter names are those of the classic Mixtral checkpoint:
``model.layers.{i}.block_sparse_moe.gate.weight`` (the router, (experts, n_embd)) and
``model.layers.{i}.block_sparse_moe.experts.{j}.w1|w2|w3.weight``.

Routing is built from the axioms only: the k probabilities are picked with integer-array
`getitem` (its backward scatter-adds), each expert gathers its tokens' rows with integer
`getitem`, the experts' outputs are concatenated (with one zero row appended) and every token
gathers its k output rows back by position. Under expert parallelism the sharding's
`ExpertShard` (`parallel.experts`) holds E/ep of the experts and moves the rows to them and
back by all-to-all. The one op with a backward of its own is `attach_aux_loss`, which gives the
load-balancing loss its gradient from inside the layer (so it needs no path to the loss: it
works on every pipeline stage and under recomputation).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from civetta import axioms as ax
from civetta import functional, fused, meta
from civetta.nn import DenseSharding, Linear, Module, merge
from civetta.recompute import is_recomputing
from civetta.tensor import Tensor, make_node

AUX_LOSS_SCOPES = ("microbatch", "data_parallel")


@dataclass(frozen=True)
class MoEConfig:
    """`experts` SwiGLU experts of width `ffn_hidden`, `top_k` of them per token.

    `capacity_factor`: None routes every token (dropless); a factor f gives each expert room for
    ceil(tokens · top_k · f / experts) of this rank's tokens, the rest dropped before any
    exchange (Megatron-core's per-rank capacity; see `SparseMoE`). `aux_loss_coef`: the weight
    of the load-balancing loss added to the model's loss (0: not computed). `aux_loss_scope`:
    which tokens its routing fractions pool, "microbatch" (the rank's microbatch, whole
    sequences) or "data_parallel" (that microbatch on every data-parallel rank).
    `shared_experts`: not implemented yet (must be 0).
    """

    experts: int
    top_k: int
    ffn_hidden: int
    capacity_factor: float | None = None
    aux_loss_coef: float = 0.0
    shared_experts: int = 0
    aux_loss_scope: str = "microbatch"

    def __post_init__(self) -> None:
        if self.experts < 1:
            raise ValueError(f"moe.experts={self.experts} must be at least 1")
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"moe.top_k={self.top_k} must be between 1 and experts={self.experts}")
        if self.ffn_hidden < 1:
            raise ValueError(f"moe.ffn_hidden={self.ffn_hidden} must be at least 1")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"moe.capacity_factor={self.capacity_factor} must be positive")
        if not self.aux_loss_coef >= 0:
            raise ValueError(f"moe.aux_loss_coef={self.aux_loss_coef} must be >= 0")
        if self.aux_loss_scope not in AUX_LOSS_SCOPES:
            raise ValueError(
                f"moe.aux_loss_scope expected one of {' | '.join(AUX_LOSS_SCOPES)}, "
                f"got {self.aux_loss_scope!r}"
            )
        if self.shared_experts:
            raise ValueError(
                f"moe.shared_experts={self.shared_experts}: shared experts are not implemented yet"
            )

    def capacity(self, tokens: int) -> int | None:
        """Token slots per expert for `tokens` tokens; None when dropless."""
        if self.capacity_factor is None:
            return None
        return math.ceil(tokens * self.top_k * self.capacity_factor / self.experts)


@dataclass(frozen=True)
class Routing:
    """Where a batch of `tokens` tokens goes: constants of the forward, no gradient flows here.

    `experts` (tokens, top_k): the chosen experts, best first. `members[e]`: the tokens expert
    e processes, in token order (after capacity). `position` (tokens, top_k): the row of slot
    (t, j) in the concatenation of the experts' outputs, or the index of the zero row appended
    after them when the slot was dropped. `counts[e]`: slots routed to e before capacity."""

    # Index arrays: real, or data-free (`civetta.meta.MetaArray`, shapes only).
    experts: Any
    members: tuple[Any, ...]
    position: Any
    counts: np.ndarray


def top_k_experts(probs: np.ndarray, k: int) -> np.ndarray:
    """The k most probable experts of each row, best first; ties go to the lowest expert index
    (a stable sort of the negated probabilities), so the choice is deterministic."""
    return np.argsort(-probs, axis=-1, kind="stable")[:, :k]


def balanced_experts(tokens: int, experts: int, k: int) -> np.ndarray:
    """The data-free stand-in for `top_k_experts`: token t's slot j goes to expert (t + j) mod E,
    an assignment that spreads the slots evenly (data-free logits have no values to route on)."""
    return (np.arange(tokens)[:, None] + np.arange(k)[None, :]) % experts


def balanced_routing(
    tokens: int,
    experts: int,
    k: int,
    capacity: int | None,
    hot: tuple[int, float] | None = None,
) -> Routing:
    """`route(balanced_experts(...))` for a data-free step, without building its index arrays:
    the counts in closed form (slot (t, j) goes to (t + j) mod E, so expert e gets
    k·⌊N/E⌋ slots plus one for each j with (e − j) mod E < N mod E), the indices as data-free
    arrays of their shapes (what the traced ops need of them).

    `hot` = (n, f): the first n experts get f times the mean share each instead, the others
    evenly what is left (the cost model's routing-imbalance assumption; f·n ≤ E)."""
    base, extra = divmod(tokens, experts)
    shift = (np.arange(experts)[:, None] - np.arange(k)[None, :]) % experts
    counts = k * base + (shift < extra).sum(axis=1)
    if hot is not None:
        n, factor = hot
        slots = tokens * k
        each = min(round(factor * slots / experts), slots // n)
        rest = slots - n * each
        cold = experts - n
        counts = np.full(experts, each, dtype=np.int64)
        if cold:
            counts[n:] = rest // cold
            counts[n : n + rest % cold] += 1
    kept = counts if capacity is None else np.minimum(counts, capacity)
    members = tuple(meta.MetaArray((int(n),), np.int64) for n in kept)
    slots = meta.MetaArray((tokens, k), np.int64)
    return Routing(slots, members, slots, counts.astype(np.int64))


def route(chosen: np.ndarray, experts: int, capacity: int | None) -> Routing:
    """Group the slots of `chosen` (tokens, k) by expert, in token order, keeping at most
    `capacity` per expert (the earliest tokens; the later ones are dropped)."""
    tokens, k = chosen.shape
    flat = chosen.reshape(-1)  # slot s = t · k + j, so flat order is token order
    counts = np.bincount(flat, minlength=experts)
    order = np.argsort(flat, kind="stable")  # by expert, token order within each
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(flat.size, dtype=np.int64)  # a slot's place in its expert's queue
    rank[order] = np.arange(flat.size) - np.repeat(starts, counts)
    kept_counts = counts if capacity is None else np.minimum(counts, capacity)
    kept = rank < kept_counts[flat]
    offsets = np.concatenate([[0], np.cumsum(kept_counts)[:-1]])
    zero_row = int(kept_counts.sum())
    position = np.where(kept, offsets[flat] + rank, zero_row).reshape(tokens, k)
    slot_tokens = np.repeat(np.arange(tokens), k)
    members = tuple(
        slot_tokens[order[starts[e] : starts[e] + kept_counts[e]]] for e in range(experts)
    )
    return Routing(chosen, members, position, counts)


# ---- what a step records of its routing -----------------------------------------------------
@dataclass
class RoutingLog:
    """Per MoE layer, the slots this rank routed to each expert (`routed`, before capacity)
    and kept (`kept`), summed over the forwards since the log opened, and the load-balancing
    terms' values (unweighted, one per forward)."""

    routed: dict[str, np.ndarray] = field(default_factory=dict)
    kept: dict[str, np.ndarray] = field(default_factory=dict)
    aux: dict[str, list[float]] = field(default_factory=dict)

    def add(self, layer: str, routed: np.ndarray, kept: np.ndarray) -> None:
        if layer in self.routed:
            self.routed[layer] = self.routed[layer] + routed
            self.kept[layer] = self.kept[layer] + kept
        else:
            self.routed[layer], self.kept[layer] = routed.copy(), kept.copy()

    def merge(self, other: RoutingLog) -> None:
        """Add `other`'s records (another step's) to these."""
        for layer, routed in other.routed.items():
            self.add(layer, routed, other.kept[layer])
        for layer, values in other.aux.items():
            self.aux.setdefault(layer, []).extend(values)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """Per layer: routed and kept slots per expert, and the aux terms' sum and count."""
        return {
            layer: {
                "routed": [int(n) for n in routed],
                "kept": [int(n) for n in self.kept[layer]],
                "aux": [float(sum(self.aux.get(layer, ()))), len(self.aux.get(layer, ()))],
            }
            for layer, routed in self.routed.items()
        }


_log: RoutingLog | None = None
_aux_weight = 1.0


@contextmanager
def recording_routing() -> Iterator[RoutingLog]:
    """Record the routing of the forwards inside the block (recomputations not again)."""
    global _log
    previous, _log = _log, RoutingLog()
    try:
        yield _log
    finally:
        _log = previous


@contextmanager
def aux_loss_weight(weight: float) -> Iterator[None]:
    """The gradient the load-balancing terms get in the backwards inside the block: the weight
    the loss itself is seeded with (1/microbatches, times fp16's loss scale), Megatron-LM's
    MoEAuxLossAutoScaler scale. Outside any block: 1, as `loss.backward()` seeds the loss."""
    global _aux_weight
    previous, _aux_weight = _aux_weight, weight
    try:
        yield
    finally:
        _aux_weight = previous


def attach_aux_loss(x: Tensor, aux: Tensor) -> Tensor:
    """x, unchanged; its backward also seeds `aux` (a scalar) with the current loss weight, as
    if aux had been added to the loss. Attached to the layer's output, the term reaches the
    router from any pipeline stage, and a recomputed block attaches it again."""
    if not aux.requires_grad:
        return x

    def backward(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        seed = meta.zeros((), aux.dtype, like=g)
        if not meta.is_meta(seed):
            seed[...] = _aux_weight
        return g, seed

    return make_node(x.data.view(), (x, aux), backward, saved=(), computed=False)


# ---- the layer ---------------------------------------------------------------------------------
def SparseMoE(  # noqa: N802 - a module constructor reads like a class
    name: str,
    n_embd: int,
    moe: MoEConfig,
    *,
    seed: int,
    dtype: Any,
    sharding: DenseSharding,
) -> Module:
    """Mixtral's sparse MoE block on x (..., n_embd).

    Each token's top-k experts (ties: lowest index first) get weights softmax(router(x))
    renormalised over the k. Dropless when `moe.capacity_factor` is None; otherwise each expert
    takes at most `moe.capacity(tokens)` slots of this rank's tokens, in token order, dropped
    before any exchange (so which slots drop depends on how the batch is split over ranks); a
    dropped slot contributes 0 (its weight is not renormalised away: the token keeps only its
    other experts' weighted outputs, and the residual stream carries it on).

    Under expert parallelism (`sharding.experts`, a `parallel.experts.ExpertShard`) this rank
    holds E/ep of the experts: the kept slots go to their experts' ranks and the outputs come
    back by all-to-all. The router is replicated.

    With `moe.aux_loss_coef` > 0, the layer's output carries coef · aux (`attach_aux_loss`),
    aux being the Switch/Mixtral load-balancing loss E · Σ_e f_e · P_e: f_e the fraction of the
    routed slots (before capacity; a constant) that went to e over the tokens of
    `moe.aux_loss_scope`, P_e the mean router probability of e over this rank's tokens
    (differentiable).

    Data-free (MetaArray) inputs have no router values to rank: they route by
    `balanced_experts` instead, so the traced shapes are those of an evenly loaded step.
    """
    if sharding.tp_size != 1 and getattr(sharding, "experts", None) is None:
        raise NotImplementedError("mixture-of-experts layers under tp need the runtime's sharding")
    shard = getattr(sharding, "experts", None)  # None: every expert on this process
    store = sharding.store if shard is None else shard.store
    local = range(moe.experts) if shard is None else shard.local_experts(moe.experts)
    exchanges = shard is not None and shard.group.size > 1
    gate = Linear(
        f"{name}.gate",
        n_embd,
        moe.experts,
        bias=False,
        seed=seed,
        dtype=dtype,
        store=sharding.store,
    )
    experts = []
    for e in local:
        prefix = f"{name}.experts.{e}"
        shape: dict[str, Any] = dict(bias=False, seed=seed, dtype=dtype, store=store)
        w1 = Linear(f"{prefix}.w1", n_embd, moe.ffn_hidden, **shape)
        w3 = Linear(f"{prefix}.w3", n_embd, moe.ffn_hidden, **shape)
        w2 = Linear(f"{prefix}.w2", moe.ffn_hidden, n_embd, **shape)
        experts.append((w1, w3, w2))
    params = merge(*(m for expert in experts for m in expert))
    if shard is not None:
        shard.names.update(params)

    def run_experts(rows: Tensor, members: list[np.ndarray]) -> Tensor:
        """Each local expert on its rows of `rows`, outputs concatenated in expert order."""
        outputs = []
        for (w1, w3, w2), mine in zip(experts, members, strict=True):
            # An expert with no tokens still runs on zero rows, so its weights get a (zero)
            # gradient as every other parameter does.
            xe = ax.getitem(rows, mine)  # (n_e, C); backward scatter-adds into rows
            outputs.append(w2(fused.swiglu(w1(xe), w3(xe))))
        return ax.concat(outputs, axis=0)

    def forward(x: Tensor) -> Tensor:
        shape = x.shape
        flat = ax.reshape(x, (-1, n_embd))  # (N, C)
        tokens = flat.shape[0]
        probs = fused.softmax(gate(flat))  # (N, E), in the model's dtype
        data_free = meta.is_meta(probs.data)
        if data_free:
            skew = shard.imbalance if shard is not None else 1.0
            hot = (len(local), skew) if skew != 1.0 else None
            routing = balanced_routing(tokens, moe.experts, moe.top_k, moe.capacity(tokens), hot)
            rows: Any = routing.experts  # shapes only
        else:
            chosen = top_k_experts(probs.data, moe.top_k)
            routing = route(chosen, moe.experts, moe.capacity(tokens))
            rows = np.broadcast_to(np.arange(tokens)[:, None], chosen.shape)
        picked = ax.getitem(probs, (rows, routing.experts))  # (N, k)
        weights = functional.div(picked, ax.sum(picked, axis=-1, keepdims=True))
        if not exchanges:
            stacked = run_experts(flat, list(routing.members))  # (kept slots, C)
        else:
            assert shard is not None
            kept = np.array([m.size for m in routing.members], dtype=np.int64)
            sent = ax.getitem(flat, np.concatenate(routing.members))  # grouped by expert
            received, exchange = shard.dispatch(sent, kept)
            by_expert = exchange.expert_rows(data_free)
            computed = run_experts(received, by_expert)  # expert order
            back = _inverse(np.concatenate(by_expert))
            stacked = shard.combine(ax.getitem(computed, back), exchange)  # as `sent`
        zero = Tensor(meta.zeros((1, n_embd), flat.dtype, like=flat.data))
        stacked = ax.concat([stacked, zero], axis=0)  # (kept slots + 1, C)
        per_slot = ax.getitem(stacked, routing.position)  # (N, k, C); dropped slots: zeros
        mixed = ax.sum(ax.mul(per_slot, ax.reshape(weights, (tokens, moe.top_k, 1))), axis=1)
        aux = None
        if moe.aux_loss_coef:
            counts = routing.counts
            if shard is not None:
                counts = shard.pooled_counts(counts, moe.aux_loss_scope)
            scale = moe.aux_loss_coef * (1.0 if shard is None else shard.aux_scale)
            aux = load_balancing_loss(probs, counts, moe)
            mixed = attach_aux_loss(mixed, ax.mul(aux, scale))
        if _log is not None and not is_recomputing() and not data_free:
            kept_counts = np.array([m.size for m in routing.members], dtype=np.int64)
            _log.add(name, routing.counts, kept_counts)
            if aux is not None:
                _log.aux.setdefault(name, []).append(float(aux.data))
        return ax.reshape(mixed, shape)

    return Module(forward, merge(gate, *(m for expert in experts for m in expert)))


def _inverse(order: Any) -> Any:
    """The permutation that undoes `order` (data-free: an index of the same shape)."""
    if meta.is_meta(order):
        return order
    back = np.empty_like(order)
    back[order] = np.arange(order.size)
    return back


def load_balancing_loss(probs: Tensor, counts: np.ndarray, moe: MoEConfig) -> Tensor:
    """experts · Σ_e f_e · P_e: f_e = counts[e] / Σ counts (the routed slots of e over the
    pooled tokens), P_e = mean of probs[:, e] over this rank's tokens. 1 when routing and
    probabilities are uniform; the gradient flows through P."""
    fraction = counts / counts.sum()
    scale = (moe.experts * fraction).astype(probs.dtype)
    mean_probs = functional.mean(probs, axis=0)  # (E,)
    return ax.sum(ax.mul(mean_probs, Tensor(scale)))
