"""The model as the cost model sees it: traced pieces arranged into pipeline stages.

A layout cuts the model into `pp · stages_per_rank` stages, runs of blocks as even as possible
or as `parallel.pipeline_layout` says (`Layout.stage_layers`), placed on the pipeline ranks as
the schedule places them (`Layout.stage_placement`: interleaved, or a V); the first stage also
runs the embeddings, the last the final norm, head and loss, and a single stage runs both ends.
`StagedModel` puts the traced pieces (`parallel.cost.trace`) in that arrangement and answers
what each pipeline rank holds and runs: its pieces with their counts, its parameters in the
order the trainer merges them (the order gradient buckets are planned in), and the size of the
activation a stage sends on. Nothing here knows what a block contains."""

from __future__ import annotations

import math
from functools import lru_cache

from civetta.models import ModelDescription
from parallel.cost.trace import Param, Piece, key_for, trace
from parallel.data_parallel import plan_buckets
from parallel.layout import Layout


class StagedModel:
    """`config` under `layout`, for `dtype` (train.dtype) and `seq_len` tokens per sequence."""

    def __init__(
        self,
        config: ModelDescription,
        layout: Layout,
        dtype: str,
        seq_len: int,
        moe_imbalance: float = 1.0,
        attention: str = "eager",
    ) -> None:
        self.config, self.layout, self.dtype, self.seq_len = config, layout, dtype, seq_len
        self.moe_imbalance, self.attention = moe_imbalance, attention
        self.num_stages = layout.num_stages
        self.stage_blocks = tuple(len(r) for r in layout.stage_layers(config.n_layer))
        self.placement = layout.stage_placement
        self._pieces: dict[tuple[str, Layout | None], Piece] = {}
        self._stages: dict[int, list[tuple[Piece, int]]] = {}
        self._devices: dict[int, list[tuple[Piece, int]]] = {}
        self._params: dict[int, list[Param]] = {}
        self._buckets: dict[tuple[int, int, int, bool], list[int]] = {}
        self._elements: dict[tuple[int, bool], int] = {}
        self.ticks: dict[tuple, dict] = {}  # the projection's timings of pieces, by device

    def piece(self, part: str, layout: Layout | None = None) -> Piece:
        """The traced `part` ("block", "first", "last", "whole") under this layout, or under
        `layout` (the tp=1 reference the engine's per-node cost is calibrated on)."""
        found = self._pieces.get((part, layout))
        if found is None:
            key = key_for(
                self.config, part, layout or self.layout, self.dtype, self.seq_len,
                self.moe_imbalance, self.attention,
            )  # fmt: skip
            found = self._pieces[part, layout] = trace(key)
        return found

    def ends(self, stage: int) -> list[Piece]:
        """The end pieces stage `stage` runs besides its blocks."""
        first, last = stage == 0, stage == self.num_stages - 1
        if first and last:
            return [self.piece("whole")]
        return [self.piece("first")] * first + [self.piece("last")] * last

    def stage_pieces(self, stage: int) -> list[tuple[Piece, int]]:
        """(piece, how many) of one pipeline stage, for one microbatch."""
        if stage not in self._stages:
            block, count = self.piece("block"), self.stage_blocks[stage]
            blocks = [(block, count)] if count else []
            self._stages[stage] = [(p, 1) for p in self.ends(stage)] + blocks
        return self._stages[stage]

    def device_stages(self, device: int) -> list[int]:
        """The stages pipeline rank `device` holds, in model order."""
        return [stage for stage, rank in enumerate(self.placement) if rank == device]

    def device_pieces(self, device: int) -> list[tuple[Piece, int]]:
        if device not in self._devices:
            out: list[tuple[Piece, int]] = []
            for stage in self.device_stages(device):
                out += self.stage_pieces(stage)
            self._devices[device] = out
        return self._devices[device]

    def device_params(self, device: int) -> list[Param]:
        """Every parameter pipeline rank `device` holds, in the trainer's order: per stage, the
        embeddings, the blocks, then the final norm and head (a tied head on a last stage that
        is not the first holds its own copy of the token embedding)."""
        if device not in self._params:
            block = self.piece("block").params if any(self.stage_blocks) else ()
            first = {p.name for p in self.piece("first").params}
            out: list[Param] = []
            for stage in self.device_stages(device):
                ends = [p for piece in self.ends(stage) for p in piece.params]
                before = [p for p in ends if stage == 0 and p.name in first]
                after = [p for p in ends if p not in before]
                out += before + list(block) * self.stage_blocks[stage] + after
            # A tied table whose two ends share this rank (a V) is one tensor, listed once.
            self._params[device] = _listed_once(out, self._tied())
        return self._params[device]

    def _tied(self) -> set[str]:
        return set(self.piece("first").tied) | set(self.piece("last").tied)

    def device_elements(self, device: int, expert: bool = False) -> int:
        """Elements of pipeline rank `device`'s dense parameters, or of its experts' (from the
        pieces, without listing a large model's every parameter)."""
        key = (device, expert)
        if key not in self._elements:
            stages = self.device_stages(device)
            blocks = sum(self.stage_blocks[s] for s in stages)
            block = self.piece("block") if blocks else None
            in_block = 0
            if block is not None:
                in_block = sum(p.elements for p in block.params if p.expert == expert)
            ends = [p for s in stages for piece in self.ends(s) for p in piece.params]
            ends = _listed_once(ends, self._tied())
            self._elements[key] = blocks * in_block + sum(
                p.elements for p in ends if p.expert == expert
            )
        return self._elements[key]

    def buckets(self, device: int, cap: int, element: int, expert: bool = False) -> list[int]:
        """Elements per gradient bucket of pipeline rank `device`, as `parallel.data_parallel`
        plans them for `element`-byte gradients and buckets of `cap` bytes: of its dense
        parameters, or of its experts' (`expert`), which are bucketed apart."""
        key = (device, cap, element, expert)
        if key not in self._buckets:
            sizes = [p.elements for p in self.device_params(device) if p.expert == expert]
            plan = plan_buckets([(str(i), n * element) for i, n in enumerate(sizes)], cap)
            self._buckets[key] = [sum(sizes[int(i)] for i in names) for names in plan]
        return self._buckets[key]

    def message_bytes(self, element_bytes: int) -> int:
        """Bytes of the activation one stage sends the next per microbatch (sharded over tp
        under sequence parallelism): the blocks' input."""
        return math.prod(self.piece("block").input_shape) * element_bytes


def _listed_once(params: list[Param], tied: set[str]) -> list[Param]:
    """`params` with the second copy of each tied parameter left out."""
    if not tied:
        return params
    seen: set[str] = set()
    kept = []
    for param in params:
        if param.name in tied:
            if param.name in seen:
                continue
            seen.add(param.name)
        kept.append(param)
    return kept


@lru_cache(maxsize=2048)
def _staged(
    config: ModelDescription,
    dtype: str,
    seq_len: int,
    shape: tuple,
    layout: Layout,
    moe_imbalance: float = 1.0,
    attention: str = "eager",
) -> StagedModel:
    return StagedModel(config, layout, dtype, seq_len, moe_imbalance, attention)


def staged_model(
    config: ModelDescription,
    layout: Layout,
    dtype: str,
    seq_len: int,
    moe_imbalance: float = 1.0,
    attention: str = "eager",
) -> StagedModel:
    """A `StagedModel`, shared by every layout that cuts and traces the model alike (what the
    pieces and stages depend on: tp, sequence parallelism, recomputation, the microbatch, ZeRO-3,
    the pipeline's stages), so a tuner's thousands of layouts reuse a few hundred."""
    zero3 = layout.zero == 3 and layout.dp > 1
    shape = (
        layout.tp,
        layout.sequence_parallel and layout.tp > 1,
        layout.recompute,
        layout.microbatch_size,
        zero3,
        layout.pp,
        layout.stage_placement,
        layout.stage_layers(config.n_layer),
        (layout.cp, layout.cp_comm, layout.cp_balance) if layout.cp > 1 else 1,
        layout.ep,
    )
    first = _first_of.setdefault((config, dtype, seq_len, shape), layout)
    return _staged(config, dtype, seq_len, shape, first, moe_imbalance, attention)


# The first layout seen for each shape: the one its shared StagedModel is built from.
_first_of: dict[tuple, Layout] = {}
