"""A Llama-family decoder with Hugging Face's parameter names and weight layout.

Pre-RMSNorm blocks, grouped-query attention (`n_kv_head` key/value heads shared by
`n_head / n_kv_head` query heads each), rotary position embeddings in Hugging Face's rotate-half
convention, SwiGLU MLPs (down(silu(gate(x)) · up(x))), no biases, and an untied head unless
`tie_embeddings`. Qwen3's two departures are options: a head width `head_dim` other than
n_embd / n_head, and `qk_norm`, an RMSNorm of each head of q and k before RoPE. Names are
those of `transformers`' LlamaForCausalLM state dict (`model.layers.{i}.self_attn.q_proj.weight`,
...; Qwen3ForCausalLM's `self_attn.q_norm.weight` and `k_norm.weight`), so a state dict loads
there unchanged.

The rotary angles are evaluated in float64 and rounded to the model's dtype; Hugging Face
evaluates them in float32 whatever the model's dtype (see `tests/test_hf_parity.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from civetta import axioms as ax
from civetta import functional, fused, meta
from civetta.models.moe import MoEConfig, SparseMoE
from civetta.models.stage import decoder_stage
from civetta.nn import DENSE, DenseSharding, Model, Module, RMSNorm, merge
from civetta.recompute import checkpoint
from civetta.tensor import Tensor


def default_ffn_hidden(n_embd: int) -> int:
    """SwiGLU's width when none is given: two thirds of 4·n_embd (so its three matrices hold
    what a GELU MLP's two do), rounded up to a multiple of 16."""
    return -(-8 * n_embd // (3 * 16)) * 16


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 256
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 0  # 0: n_head (multi-head attention)
    n_embd: int = 64
    ffn_hidden: int = 0  # 0: (8/3)·n_embd rounded up to a multiple of 16
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    # Mixtral-style sparse MLPs in every layer instead of SwiGLU (`civetta.models.moe`).
    moe: MoEConfig | None = None
    # Width of one attention head; None: n_embd // n_head. Qwen3 decouples the two (its q_proj
    # maps n_embd to n_head · head_dim, which need not be n_embd).
    head_dim: int | None = None
    # Qwen3's RMSNorm over each head of q and of k, before RoPE (one (head_dim,) weight each).
    qk_norm: bool = False

    def __post_init__(self) -> None:
        # Defaults that depend on other fields; the dataclass is frozen, so set them once here.
        if not self.n_kv_head:
            object.__setattr__(self, "n_kv_head", self.n_head)
        if not self.ffn_hidden:
            object.__setattr__(self, "ffn_hidden", default_ffn_hidden(self.n_embd))
        if not self.head_dim:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
            object.__setattr__(self, "head_dim", self.n_embd // self.n_head)
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.head_size % 2:
            raise ValueError(f"head_dim={self.head_size} must be even for RoPE")
        if isinstance(self.moe, dict):  # read back from a config section or a checkpoint
            object.__setattr__(self, "moe", MoEConfig(**self.moe))

    @property
    def head_size(self) -> int:
        """`head_dim` as an int (the field is only None before `__post_init__` fills it)."""
        assert self.head_dim is not None
        return self.head_dim

    @property
    def tied_weights(self) -> tuple[str, ...]:
        """Parameters a pipeline's first and last stage both hold (the tied table)."""
        return ("model.embed_tokens.weight",) if self.tie_embeddings else ()

    def num_parameters(self) -> int:
        """Unique parameters (a tied head counts once)."""
        return self._count(self.moe.experts if self.moe is not None else 0)

    def active_parameters(self) -> int:
        """Parameters one token's forward uses: as `num_parameters` but with only its top_k
        experts of each MoE layer (the router, attention, norms, embedding table and head all
        count; a tied head once). The convention of Mixtral's and Qwen3's published "active"
        counts. A dense model's active parameters are all of them."""
        return self._count(self.moe.top_k if self.moe is not None else 0)

    def _count(self, experts: int) -> int:
        """Parameters with `experts` experts per MoE layer (ignored for a dense MLP)."""
        c, d, f = self.n_embd, self.head_size, self.ffn_hidden
        attention = c * self.n_head * d * 2 + 2 * c * self.n_kv_head * d  # q, o; k, v
        if self.qk_norm:
            attention += 2 * d
        mlp = 3 * c * f  # gate, up, down
        if self.moe is not None:  # the experts' three matrices each, and the router
            mlp = experts * 3 * c * self.moe.ffn_hidden + c * self.moe.experts
        per_block = attention + mlp + 2 * c  # + two RMSNorms
        head = 0 if self.tie_embeddings else self.vocab_size * c
        return self.vocab_size * c + self.n_layer * per_block + c + head

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Model training FLOPs per token: 6 · (weights that take part in matmuls) plus
        12 · n_layer · n_head · head_dim · T for the scores and the weighted values over the
        full T×T matrix, counted as `GPTConfig.flops_per_token` counts them. With `moe`, a
        token's MLP weights are its top_k experts' and the router's (the active parameters)."""
        t = seq_len or self.block_size
        c, d = self.n_embd, self.head_size
        mlp = 3 * c * self.ffn_hidden
        if self.moe is not None:
            mlp = self.moe.top_k * 3 * c * self.moe.ffn_hidden + c * self.moe.experts
        per_block = 2 * c * self.n_head * d + 2 * c * self.n_kv_head * d + mlp
        matmul_weights = self.n_layer * per_block + self.vocab_size * c
        return 6 * matmul_weights + 12 * self.n_layer * self.n_head * d * t


def Attention(  # noqa: N802 - a module constructor reads like a class
    name: str,
    config: LlamaConfig,
    *,
    seed: int,
    dtype: Any,
    sharding: DenseSharding,
    recompute_core: bool,
) -> Module:
    """Grouped-query causal attention with RoPE on q and k (each RMS-normalised per head first
    with `qk_norm`); tensor parallelism splits the query heads and the key/value heads alike,
    so each rank keeps whole groups."""
    c, d = config, config.head_size
    heads, kv_heads = c.n_head // sharding.tp_size, c.n_kv_head // sharding.tp_size
    qkv = sharding.column_linears(
        [f"{name}.q_proj", f"{name}.k_proj", f"{name}.v_proj"],
        c.n_embd,
        [c.n_head * d, c.n_kv_head * d, c.n_kv_head * d],
        bias=False,
        seed=seed,
        dtype=dtype,
    )
    o_proj = sharding.row_linear(
        f"{name}.o_proj", c.n_head * d, c.n_embd, bias=False, seed=seed, dtype=dtype
    )
    if c.qk_norm:
        q_norm, k_norm = (
            HeadNorm(f"{name}.{x}_norm", c, dtype=dtype, sharding=sharding) for x in "qk"
        )
    else:
        q_norm = k_norm = Module(lambda x: x, {})

    def split_heads(x: Tensor, count: int) -> Tensor:
        batch, block = x.shape[0], x.shape[1]
        return ax.transpose(ax.reshape(x, (batch, block, count, d)), (0, 2, 1, 3))

    def forward(x: Tensor) -> Tensor:
        q, k, v = qkv(x)  # this rank's heads, over the whole sequence
        batch, block = q.shape[0], q.shape[1]
        positions = sharding.token_positions(block)  # global: context parallelism's chunks
        if meta.is_meta(q.data):
            positions = meta.arange(block, like=q.data)
        cos, sin = functional.rope_tables(positions, d, c.rope_theta, q.dtype)
        q = fused.rope(q_norm(split_heads(q, heads)), cos, sin)  # (B, nh, T, hs)
        k = fused.rope(k_norm(split_heads(k, kv_heads)), cos, sin)  # (B, nkv, T, hs)
        v = split_heads(v, kv_heads)
        if recompute_core:
            y = checkpoint(sharding.attention, q, k, v)
        else:
            y = sharding.attention(q, k, v)
        y = ax.reshape(ax.transpose(y, (0, 2, 1, 3)), (batch, block, heads * d))
        return o_proj(y)

    return Module(forward, merge(qkv, q_norm, k_norm, o_proj))


def HeadNorm(  # noqa: N802
    name: str, config: LlamaConfig, *, dtype: Any, sharding: DenseSharding
) -> Module:
    """RMSNorm over the last axis (head_dim) of (B, heads, T, head_dim): Qwen3's q_norm and
    k_norm, one weight shared by every head.

    Under tensor parallelism the weight is replicated and each rank normalises its own heads,
    so each rank's gradient is a part of the whole: the sharding is told (`partial_over_tp`),
    and the runtime sums such gradients over tp before the update (with sequence parallelism it
    sums every replicated parameter's already)."""
    norm = RMSNorm(name, config.head_size, eps=config.norm_eps, dtype=dtype, store=sharding.store)
    partial = getattr(sharding, "partial_over_tp", None)
    if sharding.tp_size > 1 and partial is not None:
        partial.add(f"{name}.weight")
    return norm


def SwiGLU(  # noqa: N802
    name: str, config: LlamaConfig, *, seed: int, dtype: Any, sharding: DenseSharding
) -> Module:
    """down(silu(gate(x)) · up(x)): gate and up column-parallel, down row-parallel."""
    c = config
    gate_up = sharding.column_linears(
        [f"{name}.gate_proj", f"{name}.up_proj"],
        c.n_embd,
        [c.ffn_hidden, c.ffn_hidden],
        bias=False,
        seed=seed,
        dtype=dtype,
    )
    down = sharding.row_linear(
        f"{name}.down_proj", c.ffn_hidden, c.n_embd, bias=False, seed=seed, dtype=dtype
    )

    def forward(x: Tensor) -> Tensor:
        gate, up = gate_up(x)
        return down(fused.swiglu(gate, up))

    return Module(forward, merge(gate_up, down))


def DecoderLayer(  # noqa: N802
    name: str,
    config: LlamaConfig,
    *,
    seed: int,
    dtype: Any,
    sharding: DenseSharding,
    recompute: str,
) -> Module:
    """x + attn(norm(x)), then + mlp(norm(x)); `recompute` as in `civetta.nn.Block`. With
    `config.moe` the MLP is `SparseMoE` (Mixtral's names)."""
    c, store = config, sharding.store
    norm_1 = RMSNorm(f"{name}.input_layernorm", c.n_embd, eps=c.norm_eps, dtype=dtype, store=store)
    attn = Attention(
        f"{name}.self_attn",
        c,
        seed=seed,
        dtype=dtype,
        sharding=sharding,
        recompute_core=recompute == "selective",
    )
    norm_2 = RMSNorm(
        f"{name}.post_attention_layernorm", c.n_embd, eps=c.norm_eps, dtype=dtype, store=store
    )
    if c.moe is not None:
        mlp = SparseMoE(
            f"{name}.block_sparse_moe",
            c.n_embd,
            c.moe,
            seed=seed,
            dtype=dtype,
            sharding=sharding,
        )
    else:
        mlp = SwiGLU(f"{name}.mlp", c, seed=seed, dtype=dtype, sharding=sharding)

    def layer(x: Tensor) -> Tensor:
        x = ax.add(x, attn(norm_1(x)))
        return ax.add(x, mlp(norm_2(x)))

    def forward(x: Tensor) -> Tensor:
        return checkpoint(layer, x) if recompute == "full" else layer(x)

    return Module(forward, merge(norm_1, attn, norm_2, mlp))


def Llama(  # noqa: N802
    config: LlamaConfig,
    seed: int = 0,
    dtype: Any = np.float32,
    sharding: DenseSharding = DENSE,
    recompute: str = "none",
) -> Model:
    """``model(idx, targets)`` → mean cross-entropy (0-d); ``model.logits(idx)`` → logits."""
    return LlamaStage(config, range(config.n_layer), True, True, seed, dtype, sharding, recompute)


def LlamaStage(  # noqa: N802
    config: LlamaConfig,
    layers: range,
    first: bool,
    last: bool,
    seed: int = 0,
    dtype: Any = np.float32,
    sharding: DenseSharding = DENSE,
    recompute: str = "none",
    tied_table: Tensor | None = None,
) -> Model:
    """The part of the model a pipeline stage runs, as `civetta.models.gpt.GPTStage`: layers
    `layers` (global indices in the names), the token embedding when `first`, the final norm,
    head and loss when `last`. A tied table on a last stage that is not the first is its own
    copy of ``model.embed_tokens.weight``, summed with the first stage's gradient every step."""
    c = config
    assert recompute in ("none", "selective", "full"), recompute
    blocks = [
        DecoderLayer(
            f"model.layers.{i}",
            c,
            seed=seed,
            dtype=dtype,
            sharding=sharding,
            recompute=recompute,
        )
        for i in layers
    ]
    modules: list[Module] = []
    aliases: dict[str, str] = {}
    embed = None
    if first:
        embed = sharding.token_embedding(
            "model.embed_tokens", c.vocab_size, c.n_embd, seed=seed, dtype=dtype
        )
        modules.append(embed)
    modules += blocks
    head_weight = None
    norm = None
    if last:
        norm = RMSNorm("model.norm", c.n_embd, eps=c.norm_eps, dtype=dtype, store=sharding.store)
        modules.append(norm)
        if c.tie_embeddings and tied_table is not None:
            head_weight = tied_table  # the first stage's, on this rank too (a V's rank 0)
            aliases["lm_head.weight"] = "model.embed_tokens.weight"
        elif c.tie_embeddings:
            table = embed or sharding.token_embedding(
                "model.embed_tokens", c.vocab_size, c.n_embd, seed=seed, dtype=dtype
            )
            if embed is None:
                modules.append(table)
            head_weight = table.params["model.embed_tokens.weight"]
            aliases["lm_head.weight"] = "model.embed_tokens.weight"
        else:
            head = sharding.token_embedding(
                "lm_head", c.vocab_size, c.n_embd, seed=seed, dtype=dtype
            )
            head_weight = head.params["lm_head.weight"]
            modules.append(head)

    return decoder_stage(c, sharding, modules, aliases, embed, blocks, norm, head_weight)
