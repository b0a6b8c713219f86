"""A GPT-2 style language model with nanoGPT's parameter names and PyTorch's weight layout.

Pre-LayerNorm blocks, learned positions, GELU (tanh), causal attention scaled by 1/√head_size,
q, k, v packed in that order in ``c_attn``; with ``tie_embeddings`` the head reuses the token
embedding (``lm_head.weight`` is the same array as ``transformer.wte.weight``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from civetta import axioms as ax
from civetta import fused
from civetta.functional import relu
from civetta.models.stage import decoder_stage
from civetta.nn import (
    DENSE,
    Block,
    DenseSharding,
    Embedding,
    LayerNorm,
    Linear,
    Model,
    Module,
    merge,
)
from civetta.tensor import Tensor


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    tie_embeddings: bool = True
    bias: bool = True

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")

    @property
    def tied_weights(self) -> tuple[str, ...]:
        """Parameters a pipeline's first and last stage both hold (the tied table)."""
        return ("transformer.wte.weight",) if self.tie_embeddings else ()

    def num_parameters(self) -> int:
        """Unique parameters (a tied head counts once)."""
        c, b = self.n_embd, int(self.bias)
        layer_norm = c * (1 + b)
        per_block = 2 * layer_norm + 12 * c * c + b * (3 * c + c + 4 * c + c)
        head = 0 if self.tie_embeddings else self.vocab_size * c
        embeddings = (self.vocab_size + self.block_size) * c
        return embeddings + self.n_layer * per_block + layer_norm + head

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Model training FLOPs per token: the matmuls of forward and backward, exactly.

        6 · (weights that take part in matmuls: 12·n_layer·n_embd² + the vocab_size·n_embd
        head) — 2 FLOPs per weight forward, 4 backward — plus 12 · n_layer · n_embd · T for the
        attention scores and the weighted sum of values over the full T×T matrix, as nanoGPT
        and PaLM count them. Embedding lookups, LayerNorms and biases do no matmul and count
        0. The engine's `flop_meter` measures exactly this when nothing is recomputed.
        """
        t = seq_len or self.block_size
        c = self.n_embd
        matmul_weights = 12 * self.n_layer * c * c + self.vocab_size * c
        return 6 * matmul_weights + 12 * self.n_layer * c * t


def GPT(  # noqa: N802 - a module constructor reads like a class
    config: GPTConfig,
    seed: int = 0,
    dtype: Any = np.float32,
    sharding: DenseSharding = DENSE,
    recompute: str = "none",
) -> Model:
    """``model(idx, targets)`` → mean cross-entropy (0-d); ``model.logits(idx)`` → logits.

    `recompute`: "none" | "selective" | "full" activation recomputation (see `nn.Block`)."""
    return GPTStage(config, range(config.n_layer), True, True, seed, dtype, sharding, recompute)


def GPTStage(  # noqa: N802
    config: GPTConfig,
    layers: range,
    first: bool,
    last: bool,
    seed: int = 0,
    dtype: Any = np.float32,
    sharding: DenseSharding = DENSE,
    recompute: str = "none",
    tied_table: Tensor | None = None,
) -> Model:
    """The part of the GPT a pipeline stage runs: blocks `layers`, with the embeddings when it
    is the `first` stage and the final LayerNorm, head and loss when it is the `last`.

    ``stage(inputs, targets)``: `inputs` are token ids on the first stage and the previous
    stage's activations (B, T, C) otherwise; returns the loss on the last stage and the
    activations otherwise. Parameter names are the whole model's (``transformer.h.{i}`` with the
    global block index). With tied embeddings, a last stage that is not also the first holds its
    own copy of ``transformer.wte.weight``, whose gradient the runtime sums with the first
    stage's every step.
    """
    c = config
    proj_std = 0.02 / math.sqrt(2 * c.n_layer)  # residual projections, as GPT-2
    blocks = [
        Block(
            f"transformer.h.{i}",
            c.n_embd,
            c.n_head,
            proj_std=proj_std,
            bias=c.bias,
            seed=seed,
            dtype=dtype,
            sharding=sharding,
            recompute=recompute,
        )
        for i in layers
    ]
    modules: list[Module] = []
    aliases: dict[str, str] = {}
    if first:
        wte = sharding.token_embedding(
            "transformer.wte", c.vocab_size, c.n_embd, seed=seed, dtype=dtype
        )
        wpe = Embedding(
            "transformer.wpe", c.block_size, c.n_embd, seed=seed, dtype=dtype, store=sharding.store
        )
        modules += [wte, wpe]
    modules += blocks
    head_weight = None
    if last:
        ln_f = LayerNorm(
            "transformer.ln_f", c.n_embd, bias=c.bias, dtype=dtype, store=sharding.store
        )
        modules.append(ln_f)
        if c.tie_embeddings and tied_table is not None:
            head_weight = tied_table  # the first stage's, on this rank too (a V's rank 0)
            aliases["lm_head.weight"] = "transformer.wte.weight"
        elif c.tie_embeddings:
            table = (
                wte
                if first
                else sharding.token_embedding(
                    "transformer.wte", c.vocab_size, c.n_embd, seed=seed, dtype=dtype
                )
            )
            if not first:
                modules.append(table)
            head_weight = table.params["transformer.wte.weight"]
            aliases["lm_head.weight"] = "transformer.wte.weight"
        else:
            head = sharding.token_embedding(
                "lm_head", c.vocab_size, c.n_embd, seed=seed, dtype=dtype
            )
            head_weight = head.params["lm_head.weight"]
            modules.append(head)

    def embed(idx: np.ndarray) -> Tensor:
        return ax.add(wte(idx), wpe(sharding.local_positions(idx.shape[-1])))

    final_norm = ln_f if last else None
    embedding = embed if first else None
    return decoder_stage(c, sharding, modules, aliases, embedding, blocks, final_norm, head_weight)


def MLPModel(  # noqa: N802
    sizes: tuple[int, ...], seed: int = 0, dtype: Any = np.float32
) -> Model:
    """A small ReLU multilayer perceptron classifier for quick experiments:
    ``model(x, labels)`` → mean cross-entropy."""
    layers = [
        Linear(f"layers.{i}", sizes[i], sizes[i + 1], seed=seed, dtype=dtype)
        for i in range(len(sizes) - 1)
    ]

    def logits(x: Any) -> Tensor:
        h = x if isinstance(x, Tensor) else Tensor(np.asarray(x, dtype=dtype))
        for i, layer in enumerate(layers):
            h = layer(h)
            if i < len(layers) - 1:
                h = relu(h)
        return h

    def forward(x: Any, labels: np.ndarray) -> Tensor:
        return fused.cross_entropy(logits(x), labels)

    return Model(forward, merge(*layers), logits=logits)
