"""Models built from civetta modules.

A model family is a config type and a stage constructor: `stage(config, layers, first, last,
seed=, dtype=, sharding=, recompute=)` builds the part of the model a pipeline stage runs (blocks
`layers`, the embeddings when `first`, the head and loss when `last`). The trainer builds every
stage through `build_stage`, and so does the cost model when it traces the model's pieces, so a
family registered in `STAGES` trains, and is projected, with no other code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from civetta.models.gpt import GPT, GPTConfig, GPTStage
from civetta.models.llama import Llama, LlamaConfig, LlamaStage
from civetta.nn import Model

__all__ = ["GPT", "STAGES", "GPTConfig", "Llama", "LlamaConfig", "ModelDescription", "build_stage"]

# A model family's description: what the trainer builds and the cost model traces.
ModelDescription = GPTConfig | LlamaConfig

STAGES: dict[type, Callable[..., Model]] = {GPTConfig: GPTStage, LlamaConfig: LlamaStage}


def build_stage(config: Any, layers: range, first: bool, last: bool, **kwargs: Any) -> Model:
    """The stage of the model `config` describes, built by its family's constructor."""
    try:
        stage = STAGES[type(config)]
    except KeyError:
        raise TypeError(f"no model family registered for {type(config).__name__}") from None
    return stage(config, layers, first, last, **kwargs)
