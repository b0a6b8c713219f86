"""Parametric functions (modules).

A constructor creates its parameters, captures them in the closure of a forward function and
returns ``Module(forward, params)``. ``params`` is an ordered dict with dotted names
(``transformer.h.0.attn.c_attn.weight``): sharding, checkpoints and optimizers address
parameters by these names, never through the closure.

Initialisation is seeded by the parameter's name and the run seed, so every parallel layout
builds the same full weights and each rank can take exactly its shard.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from civetta import axioms as ax
from civetta import fused, meta
from civetta.recompute import checkpoint
from civetta.tensor import Tensor

RECOMPUTE_MODES = ("none", "selective", "full")


class StateDictError(ValueError):
    """A state dict that does not fit the module (missing, unexpected or mis-shaped keys)."""


@dataclass
class Module:
    """A forward function plus the parameters its closure captured, by dotted name.

    ``aliases`` maps extra state-dict names to parameter names (a tied ``lm_head.weight`` is the
    same array as ``transformer.wte.weight``).
    """

    forward: Callable[..., Any]
    params: dict[str, Tensor]
    aliases: dict[str, str] = field(default_factory=dict)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def named_parameters(self) -> Iterator[tuple[str, Tensor]]:
        return iter(self.params.items())

    def parameters(self) -> list[Tensor]:
        return list(self.params.values())

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {name: p.data for name, p in self.params.items()}
        for alias, target in self.aliases.items():
            state[alias] = self.params[target].data
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Copy arrays in place; any missing, unexpected or mis-shaped key is an error."""
        expected = set(self.params) | set(self.aliases)
        missing = sorted(set(self.params) - set(state))
        unexpected = sorted(set(state) - expected)
        problems = []
        if missing:
            problems.append(f"missing keys: {', '.join(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {', '.join(unexpected)}")
        for name, p in [
            *self.params.items(),
            *((a, self.params[t]) for a, t in self.aliases.items()),
        ]:
            if name in state and np.shape(state[name]) != p.shape:
                problems.append(f"{name}: expected shape {p.shape}, got {np.shape(state[name])}")
        for alias, target in self.aliases.items():
            same_shape = (
                alias in state
                and target in state
                and np.shape(state[alias]) == np.shape(state[target])
            )
            if same_shape and not np.array_equal(state[alias], state[target]):
                problems.append(f"{alias}: tied to {target} but holds different values")
        if problems:
            raise StateDictError("; ".join(problems))
        for name, p in self.params.items():
            p.data[...] = state[name]


@dataclass
class Model(Module):
    """A module whose forward returns the loss, with a second entry point for the logits."""

    logits: Callable[..., Tensor] | None = None
    config: Any = None


def merge(*modules: Module) -> dict[str, Tensor]:
    """The union of several modules' parameters, in order."""
    params: dict[str, Tensor] = {}
    for module in modules:
        params.update(module.params)
    return params


# ---- seeded initialisation ----------------------------------------------------------------------
def param_rng(name: str, seed: int) -> np.random.Generator:
    """A generator that depends only on the parameter's name and the run seed."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def normal_init(name: str, shape: tuple[int, ...], std: float, seed: int) -> np.ndarray:
    """Draw in float64 so float32 and float64 runs start from the same (rounded) weights.
    Inside `meta.data_free()` nothing is drawn: a shape-only float64 array."""
    if meta.is_data_free():
        return meta.shaped(shape, np.float64)
    return param_rng(name, seed).normal(0.0, std, size=shape)


def parameter(array: np.ndarray, dtype: Any) -> Tensor:
    if meta.is_meta(array):  # a fresh C-contiguous array, as np.ascontiguousarray gives
        return Tensor(meta.shaped(array.shape, dtype), requires_grad=True)
    return Tensor(np.ascontiguousarray(array, dtype=dtype), requires_grad=True)


# ---- parameter stores: where a parameter's values live --------------------------------------
class ParameterStore:
    """Creates parameters and applies them to activations, every parameter whole on this process.

    Modules never read a parameter's array themselves: they go through their store's ops
    (`linear`, `lookup`, `affine`). That is what lets ZeRO-3 (`parallel.zero.ShardedStore`)
    keep only a shard of each parameter and gather the whole value around each use, without the
    modules knowing. A sharding owns one store (`DenseSharding.store`) and hands it to the
    modules it builds.
    """

    def create(self, name: str, value: np.ndarray, dtype: Any) -> Tensor:
        """The parameter `name`, initialised to `value` (the whole of this sharding's part)."""
        return parameter(value, dtype)

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """x · weightᵀ + bias."""
        return fused.linear(x, weight, bias)

    def lookup(self, table: Tensor, rows: np.ndarray) -> Tensor:
        """Rows of `table` picked by integer index (an embedding)."""
        return ax.getitem(table, rows)

    def affine(self, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        """x · weight + bias along the last axis (LayerNorm's affine part, or a bias alone)."""
        if weight is not None:
            x = ax.mul(x, weight)
        if bias is not None:
            x = ax.add(x, bias)
        return x

    def layer_norm(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5
    ) -> Tensor:
        """LayerNorm of `x` with `weight` and `bias`: one fused node (`fused.layer_norm`), which
        keeps x̂ and 1/σ for backward and not the affine part's output.

        A store that applies parameters its own way (overrides `affine`, as ZeRO-3's gathers
        them) and does not override this method gets the normalisation followed by its
        `affine`, so it still sees every use of its parameters."""
        if type(self).affine is not ParameterStore.affine:
            return self.affine(fused.normalize(x, eps), weight, bias)
        return fused.layer_norm(x, weight, bias, eps)

    def rms_norm(self, x: Tensor, weight: Tensor | None, eps: float = 1e-5) -> Tensor:
        """RMSNorm of `x` with `weight`: one fused node (`fused.rms_norm`) keeping x̂ and 1/rms;
        a store that overrides `affine` gets the normalisation followed by its `affine`, as
        `layer_norm` does."""
        if type(self).affine is not ParameterStore.affine:
            return self.affine(fused.rms_normalize(x, eps), weight, None)
        return fused.rms_norm(x, weight, eps)


WHOLE = ParameterStore()


# ---- dense modules ------------------------------------------------------------------------------
def Linear(  # noqa: N802 - a module constructor reads like a class
    name: str,
    in_features: int,
    out_features: int,
    *,
    bias: bool = True,
    std: float = 0.02,
    seed: int = 0,
    dtype: Any = np.float32,
    store: ParameterStore = WHOLE,
) -> Module:
    """y = x · Wᵀ + b with W of shape (out_features, in_features), PyTorch's layout."""
    init = normal_init(f"{name}.weight", (out_features, in_features), std, seed)
    weight = store.create(f"{name}.weight", init, dtype)
    params = {f"{name}.weight": weight}
    b = None
    if bias:
        b = store.create(f"{name}.bias", meta.zeros(out_features), dtype)
        params[f"{name}.bias"] = b

    def forward(x: Tensor) -> Tensor:
        return store.linear(x, weight, b)

    return Module(forward, params)


def Embedding(  # noqa: N802
    name: str,
    num_embeddings: int,
    dim: int,
    *,
    std: float = 0.02,
    seed: int = 0,
    dtype: Any = np.float32,
    store: ParameterStore = WHOLE,
) -> Module:
    """Rows of a (num_embeddings, dim) table picked by integer index."""
    init = normal_init(f"{name}.weight", (num_embeddings, dim), std, seed)
    weight = store.create(f"{name}.weight", init, dtype)

    def forward(idx: np.ndarray) -> Tensor:
        return store.lookup(weight, meta.asarray(idx))

    return Module(forward, {f"{name}.weight": weight})


def LayerNorm(  # noqa: N802
    name: str,
    dim: int,
    *,
    bias: bool = True,
    eps: float = 1e-5,
    dtype: Any = np.float32,
    store: ParameterStore = WHOLE,
) -> Module:
    """LayerNorm over the last axis, through the store (`ParameterStore.layer_norm`)."""
    weight = store.create(f"{name}.weight", meta.ones(dim), dtype)
    params = {f"{name}.weight": weight}
    b = None
    if bias:
        b = store.create(f"{name}.bias", meta.zeros(dim), dtype)
        params[f"{name}.bias"] = b

    def forward(x: Tensor) -> Tensor:
        return store.layer_norm(x, weight, b, eps)

    return Module(forward, params)


def RMSNorm(  # noqa: N802
    name: str,
    dim: int,
    *,
    eps: float = 1e-5,
    dtype: Any = np.float32,
    store: ParameterStore = WHOLE,
) -> Module:
    """RMSNorm over the last axis (x / rms(x) · weight), through the store
    (`ParameterStore.rms_norm`)."""
    weight = store.create(f"{name}.weight", meta.ones(dim), dtype)

    def forward(x: Tensor) -> Tensor:
        return store.rms_norm(x, weight, eps)

    return Module(forward, {f"{name}.weight": weight})


# ---- shardings: where a module's parameters live ------------------------------------------------
class DenseSharding:
    """Every parameter whole, on one process. `parallel.tensor_parallel` provides a sharding with
    the same methods that shards by the same parameter names.

    `store` keeps the parameters the sharding's modules create (whole by default; a shard under
    ZeRO-3); modules the model builds itself (LayerNorms, the position table) use it too.
    """

    tp_size = 1

    def __init__(
        self, store: ParameterStore = WHOLE, context: Any = None, experts: Any = None
    ) -> None:
        self.store = store
        # Context parallelism (`parallel.context.ContextShard`): this rank holds a chunk of
        # every sequence, and attention reaches the others' keys and values. None: the whole.
        self.context = context
        # Expert parallelism (`parallel.experts.ExpertShard`): which experts of a MoE layer this
        # rank holds and how tokens reach them. None: every expert, nothing exchanged.
        self.experts = experts

    def column_linear(self, name: str, in_features: int, out_features: int, **kw: Any) -> Module:
        """A linear whose output features a tensor-parallel sharding splits across ranks.
        `packed` (default 1) says the outputs are that many equal blocks (q, k, v), each split
        separately so heads stay whole."""
        kw.pop("packed", None)
        return Linear(name, in_features, out_features, store=self.store, **kw)

    def column_linears(
        self, names: list[str], in_features: int, out_features: list[int], **kw: Any
    ) -> Module:
        """Several column-parallel linears of one input (q, k and v; gate and up), each its own
        parameter: the module returns their outputs as a tuple. A tensor-parallel sharding
        enters its region once for all of them (one all-gather under sequence parallelism, one
        gradient reduction), as a packed weight would."""
        linears = [
            self.column_linear(name, in_features, out, **kw)
            for name, out in zip(names, out_features, strict=True)
        ]

        def forward(x: Tensor) -> tuple[Tensor, ...]:
            return tuple(linear(x) for linear in linears)

        return Module(forward, merge(*linears))

    def row_linear(self, name: str, in_features: int, out_features: int, **kw: Any) -> Module:
        """A linear whose input features a tensor-parallel sharding splits across ranks."""
        return Linear(name, in_features, out_features, store=self.store, **kw)

    def token_embedding(self, name: str, vocab_size: int, dim: int, **kw: Any) -> Module:
        return Embedding(name, vocab_size, dim, store=self.store, **kw)

    def token_positions(self, block: int) -> np.ndarray:
        """Global positions of the `block` tokens of each sequence this rank holds (all of
        them, or its context-parallel chunks)."""
        if self.context is None:
            return np.arange(block)
        return self.context.positions(block)

    def local_positions(self, block: int) -> np.ndarray:
        """Positions of the sequence this rank holds in the residual stream."""
        return self.token_positions(block)

    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Causal attention of this rank's queries over the whole sequence's keys and values
        (grouped-query when k and v have fewer heads)."""
        if self.context is None:
            return fused.scaled_dot_product_attention(q, k, v, causal=True)
        return self.context.attention(q, k, v)

    def lm_loss(self, hidden: Tensor, weight: Tensor, targets: np.ndarray) -> Tensor:
        """Mean cross-entropy of the logits hidden · weightᵀ."""
        logits = self.store.linear(hidden, weight, None)  # (B, T, V)
        return fused.cross_entropy(logits, targets)

    def lm_logits(self, hidden: Tensor, weight: Tensor) -> Tensor:
        return self.store.linear(hidden, weight, None)


DENSE = DenseSharding()


def MLP(  # noqa: N802
    name: str,
    dim: int,
    hidden: int,
    *,
    proj_std: float,
    bias: bool = True,
    seed: int = 0,
    dtype: Any = np.float32,
    sharding: DenseSharding = DENSE,
) -> Module:
    """c_fc → GELU → c_proj: column-parallel then row-parallel under tensor parallelism."""
    c_fc = sharding.column_linear(f"{name}.c_fc", dim, hidden, bias=bias, seed=seed, dtype=dtype)
    c_proj = sharding.row_linear(
        f"{name}.c_proj", hidden, dim, bias=bias, std=proj_std, seed=seed, dtype=dtype
    )

    def forward(x: Tensor) -> Tensor:
        return c_proj(fused.gelu(c_fc(x)))

    return Module(forward, merge(c_fc, c_proj))


def CausalSelfAttention(  # noqa: N802
    name: str,
    dim: int,
    n_head: int,
    *,
    proj_std: float,
    bias: bool = True,
    seed: int = 0,
    dtype: Any = np.float32,
    sharding: DenseSharding = DENSE,
    recompute_core: bool = False,
) -> Module:
    """Multi-head causal attention, q, k, v packed in that order in c_attn, scaled by 1/√hs.

    With `recompute_core` the attention core (scores, softmax, weighted values) is recomputed
    in backward instead of keeping its (B, nh, T, T) activations: selective recomputation.
    """
    head_size = dim // n_head
    local_heads = n_head // sharding.tp_size  # tensor parallelism splits whole heads
    c_attn = sharding.column_linear(
        f"{name}.c_attn", dim, 3 * dim, bias=bias, seed=seed, dtype=dtype, packed=3
    )
    c_proj = sharding.row_linear(
        f"{name}.c_proj", dim, dim, bias=bias, std=proj_std, seed=seed, dtype=dtype
    )

    def forward(x: Tensor) -> Tensor:
        qkv = c_attn(x)  # (B, T, 3·nh·hs) for this rank's heads
        batch, block = qkv.shape[0], qkv.shape[1]
        qkv = ax.reshape(qkv, (batch, block, 3, local_heads, head_size))
        qkv = ax.transpose(qkv, (2, 0, 3, 1, 4))  # (3, B, nh, T, hs)
        q, k, v = (ax.reshape(t, t.shape[1:]) for t in ax.split(qkv, 3, axis=0))
        if recompute_core:
            y = checkpoint(sharding.attention, q, k, v)  # (B, nh, T, hs)
        else:
            y = sharding.attention(q, k, v)  # (B, nh, T, hs)
        y = ax.reshape(ax.transpose(y, (0, 2, 1, 3)), (batch, block, local_heads * head_size))
        return c_proj(y)

    return Module(forward, merge(c_attn, c_proj))


def Block(  # noqa: N802
    name: str,
    dim: int,
    n_head: int,
    *,
    proj_std: float,
    bias: bool = True,
    seed: int = 0,
    dtype: Any = np.float32,
    sharding: DenseSharding = DENSE,
    recompute: str = "none",
) -> Module:
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x)).

    `recompute`: "none"; "selective" recomputes the attention core in backward; "full" keeps
    only the block's input and recomputes the whole block in backward.
    """
    assert recompute in RECOMPUTE_MODES, recompute
    common: dict[str, Any] = dict(
        bias=bias, seed=seed, dtype=dtype, sharding=sharding, proj_std=proj_std
    )
    ln_1 = LayerNorm(f"{name}.ln_1", dim, bias=bias, dtype=dtype, store=sharding.store)
    attn = CausalSelfAttention(
        f"{name}.attn", dim, n_head, recompute_core=recompute == "selective", **common
    )
    ln_2 = LayerNorm(f"{name}.ln_2", dim, bias=bias, dtype=dtype, store=sharding.store)
    mlp = MLP(f"{name}.mlp", dim, 4 * dim, **common)

    def block(x: Tensor) -> Tensor:
        x = ax.add(x, attn(ln_1(x)))
        return ax.add(x, mlp(ln_2(x)))

    def forward(x: Tensor) -> Tensor:
        return checkpoint(block, x) if recompute == "full" else block(x)

    return Module(forward, merge(ln_1, attn, ln_2, mlp))
