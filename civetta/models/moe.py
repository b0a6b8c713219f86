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
gathers its k output rows back by position; no op here has a backward of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from civetta import axioms as ax
from civetta import functional, fused, meta
from civetta.nn import DenseSharding, Linear, Module, merge
from civetta.tensor import Tensor


@dataclass(frozen=True)
class MoEConfig:
    """`experts` SwiGLU experts of width `ffn_hidden`, `top_k` of them per token.

    `capacity_factor`: None routes every token (dropless); a factor f gives each expert room for
    ceil(tokens · top_k · f / experts) of this process's tokens, the rest dropped (see
    `SparseMoE`). `aux_loss_coef`: the weight of the load-balancing loss added to the model's
    loss (0: not computed). `shared_experts`: not implemented yet (must be 0).
    """

    experts: int
    top_k: int
    ffn_hidden: int
    capacity_factor: float | None = None
    aux_loss_coef: float = 0.0
    shared_experts: int = 0

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

    experts: np.ndarray
    members: tuple[np.ndarray, ...]
    position: np.ndarray
    counts: np.ndarray


def top_k_experts(probs: np.ndarray, k: int) -> np.ndarray:
    """The k most probable experts of each row, best first; ties go to the lowest expert index
    (a stable sort of the negated probabilities), so the choice is deterministic."""
    return np.argsort(-probs, axis=-1, kind="stable")[:, :k]


def balanced_experts(tokens: int, experts: int, k: int) -> np.ndarray:
    """The data-free stand-in for `top_k_experts`: token t's slot j goes to expert (t + j) mod E,
    an assignment that spreads the slots evenly (data-free logits have no values to route on)."""
    return (np.arange(tokens)[:, None] + np.arange(k)[None, :]) % experts


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


def SparseMoE(  # noqa: N802 - a module constructor reads like a class
    name: str,
    n_embd: int,
    moe: MoEConfig,
    *,
    seed: int,
    dtype: Any,
    sharding: DenseSharding,
    aux_losses: list[Tensor] | None = None,
) -> Module:
    """Mixtral's sparse MoE block on x (..., n_embd).

    Each token's top-k experts (ties: lowest index first) get weights softmax(router(x))
    renormalised over the k. Dropless when `moe.capacity_factor` is None; otherwise each expert
    takes at most `moe.capacity(tokens)` slots over this call's tokens, in token order, and a
    dropped slot contributes 0 (its weight is not renormalised away: the token keeps only its
    other experts' weighted outputs, and the residual stream carries it on).

    With `moe.aux_loss_coef` > 0, each call appends coef · aux to `aux_losses`, aux being the
    Switch/Mixtral load-balancing loss over the call's tokens: experts · Σ_e f_e · P_e with f_e
    the fraction of the tokens · top_k routed slots that went to e (before capacity; a
    constant) and P_e the mean router probability of e (differentiable).

    Data-free (MetaArray) inputs have no router values to rank: they route by
    `balanced_experts` instead, so the traced shapes are those of an evenly loaded step.
    """
    if sharding.tp_size != 1:
        raise NotImplementedError("mixture-of-experts layers do not support tensor parallelism yet")
    store = sharding.store
    gate = Linear(
        f"{name}.gate", n_embd, moe.experts, bias=False, seed=seed, dtype=dtype, store=store
    )
    experts = []
    for e in range(moe.experts):
        prefix = f"{name}.experts.{e}"
        w1 = Linear(
            f"{prefix}.w1", n_embd, moe.ffn_hidden, bias=False, seed=seed, dtype=dtype, store=store
        )
        w3 = Linear(
            f"{prefix}.w3", n_embd, moe.ffn_hidden, bias=False, seed=seed, dtype=dtype, store=store
        )
        w2 = Linear(
            f"{prefix}.w2", moe.ffn_hidden, n_embd, bias=False, seed=seed, dtype=dtype, store=store
        )
        experts.append((w1, w3, w2))

    def forward(x: Tensor) -> Tensor:
        shape = x.shape
        flat = ax.reshape(x, (-1, n_embd))  # (N, C)
        tokens = flat.shape[0]
        probs = fused.softmax(gate(flat))  # (N, E), in the model's dtype
        if meta.is_meta(probs.data):
            chosen = balanced_experts(tokens, moe.experts, moe.top_k)
        else:
            chosen = top_k_experts(probs.data, moe.top_k)
        routing = route(chosen, moe.experts, moe.capacity(tokens))
        rows = np.broadcast_to(np.arange(tokens)[:, None], chosen.shape)
        picked = ax.getitem(probs, (rows, chosen))  # (N, k)
        weights = functional.div(picked, ax.sum(picked, axis=-1, keepdims=True))
        outputs = []
        for (w1, w3, w2), members in zip(experts, routing.members, strict=True):
            # An expert with no tokens still runs on zero rows, so its weights get a (zero)
            # gradient as every other parameter does.
            xe = ax.getitem(flat, members)  # (n_e, C); backward scatter-adds into flat
            outputs.append(w2(fused.swiglu(w1(xe), w3(xe))))
        outputs.append(Tensor(meta.zeros((1, n_embd), flat.dtype, like=flat.data)))
        stacked = ax.concat(outputs, axis=0)  # (kept slots + 1, C)
        per_slot = ax.getitem(stacked, routing.position)  # (N, k, C); dropped slots: zeros
        mixed = ax.sum(ax.mul(per_slot, ax.reshape(weights, (tokens, moe.top_k, 1))), axis=1)
        if moe.aux_loss_coef and aux_losses is not None:
            aux_losses.append(ax.mul(load_balancing_loss(probs, routing, moe), moe.aux_loss_coef))
        return ax.reshape(mixed, shape)

    return Module(forward, merge(gate, *(m for expert in experts for m in expert)))


def load_balancing_loss(probs: Tensor, routing: Routing, moe: MoEConfig) -> Tensor:
    """experts · Σ_e f_e · P_e: f_e = routed slots of e / (tokens · top_k), P_e = mean of
    probs[:, e]. 1 when routing and probabilities are uniform; the gradient flows through P."""
    tokens = probs.shape[0]
    fraction = routing.counts / (tokens * moe.top_k)
    scale = (moe.experts * fraction).astype(probs.dtype)
    mean_probs = functional.mean(probs, axis=0)  # (E,)
    return ax.sum(ax.mul(mean_probs, Tensor(scale)))
