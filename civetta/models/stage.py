"""The part of a decoder a pipeline stage runs, put together the same way for every family.

A family's stage constructor builds its modules (the embedding on the first stage, its blocks,
the final norm and the head's weight on the last) and hands them here; `decoder_stage` wires the
stage's forward (token ids or the previous stage's activations in; the loss or activations out)
and its logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from civetta import meta
from civetta.nn import DenseSharding, Model, Module, merge
from civetta.tensor import Tensor


def decoder_stage(
    config: Any,
    sharding: DenseSharding,
    modules: Sequence[Module],
    aliases: dict[str, str],
    embed: Callable[[np.ndarray], Tensor] | None,
    blocks: Sequence[Module],
    final_norm: Module | None,
    head_weight: Tensor | None,
) -> Model:
    """`embed` is None except on the first stage; `final_norm` and `head_weight` None except on
    the last. The loss is the sharding's (vocabulary-parallel under tensor parallelism)."""
    last = final_norm is not None

    def hidden(inputs: Any) -> Tensor:
        if embed is not None:
            idx = meta.asarray(inputs)  # token ids, real or data-free
            if idx.shape[-1] > config.block_size:
                raise ValueError(
                    f"sequence length {idx.shape[-1]} exceeds block_size={config.block_size}"
                )
            x = embed(idx)  # (B, T, C)
        else:
            x = inputs
        for block in blocks:
            x = block(x)
        return final_norm(x) if final_norm is not None else x

    def forward(inputs: Any, targets: np.ndarray | None = None) -> Tensor:
        if not last:
            return hidden(inputs)
        assert head_weight is not None  # the last stage has the head
        return sharding.lm_loss(hidden(inputs), head_weight, meta.asarray(targets))

    def logits(inputs: Any) -> Tensor:
        assert last and head_weight is not None, "only the last stage has the head"
        return sharding.lm_logits(hidden(inputs), head_weight)

    return Model(forward, merge(*modules), aliases, logits=logits, config=config)
