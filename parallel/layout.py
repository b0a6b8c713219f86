"""The layout: every parallel choice of a training run, in one frozen value.

A `Layout` says how one step is split over ranks: the sizes of the mesh axes (data, tensor and
pipeline parallelism; context and expert parallelism are reserved and must be 1 until the
runtime implements them), their order, sequence parallelism, the pipeline schedule and its
virtual stages, the microbatch size and count, the ZeRO stage, activation recomputation and the
gradient bucket size. It is built once from the experiment config (`launch.config.layout_of`),
checked here and nowhere else (`Layout.check`), and passed to the runtime, the trainer, the
checkpoints, the cost model, the tuner and the reports; metrics.json writes `as_dict()`.

Errors are `LayoutError`s with one bare line naming the config key, what was expected and what
was given; the command line prefixes it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

from parallel.mesh import AXES, MeshLayout

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1")
RECOMPUTE = ("none", "full", "selective")
ZERO_STAGES = (0, 1, 2, 3)


class LayoutError(ValueError):
    """A layout that cannot run (or be projected) for this model and batch; one line."""


class ModelShape(Protocol):
    """What the layout checks of a model: the sizes that parallelism must divide."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    @property
    def n_layer(self) -> int: ...
    @property
    def n_head(self) -> int: ...
    @property
    def n_embd(self) -> int: ...


def _positive_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LayoutError(f"{key} expected a positive integer, got {value!r}")


def _one_of(key: str, value: Any, options: tuple[Any, ...]) -> None:
    if value not in options:
        raise LayoutError(f"{key} expected one of {' | '.join(map(str, options))}, got {value!r}")


@dataclass(frozen=True)
class Layout:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1  # context parallelism: reserved, 1 until the runtime has it
    ep: int = 1  # expert parallelism: reserved, 1 until the runtime has it
    order: str = "tp-dp-pp"  # mesh axes, fastest-varying first
    sequence_parallel: bool = False
    schedule: str = "1f1b"
    virtual_stages: int = 1
    microbatch_size: int = 1  # sequences per microbatch on one dp rank
    microbatches: int = 1  # per step
    zero: int = 0
    recompute: str = "none"
    bucket_mb: float = 25.0  # MiB per gradient bucket (`parallel.data_parallel`)

    def __post_init__(self) -> None:
        for key in ("dp", "tp", "pp", "cp", "ep", "virtual_stages"):
            _positive_int(f"parallel.{key}", getattr(self, key))
        for key in ("microbatch_size", "microbatches"):
            _positive_int(key, getattr(self, key))
        for key in ("cp", "ep"):
            if getattr(self, key) != 1:
                value = getattr(self, key)
                raise LayoutError(f"parallel.{key} expected 1 (not implemented yet), got {value}")
        _one_of("parallel.schedule", self.schedule, SCHEDULES)
        _one_of("parallel.recompute", self.recompute, RECOMPUTE)
        _one_of("parallel.zero", self.zero, ZERO_STAGES)
        axes = self.order.split("-") if isinstance(self.order, str) else []
        if sorted(axes) != sorted(AXES):
            raise LayoutError(
                f"parallel.order expected the axes dp, tp, pp joined by '-', got {self.order!r}"
            )
        if isinstance(self.bucket_mb, bool) or not self.bucket_mb > 0:
            raise LayoutError(
                f"parallel.bucket_mb expected a positive number, got {self.bucket_mb}"
            )
        if self.virtual_stages > 1 and self.schedule != "interleaved-1f1b":
            raise LayoutError(
                f"parallel.virtual_stages={self.virtual_stages} needs "
                f"parallel.schedule=interleaved-1f1b, got {self.schedule}"
            )
        if self.virtual_stages > 1 and self.pp == 1:
            raise LayoutError("parallel.virtual_stages > 1 needs parallel.pp > 1")
        if self.schedule == "interleaved-1f1b" and self.pp > 1 and self.microbatches % self.pp:
            raise LayoutError(
                f"parallel.schedule=interleaved-1f1b needs the microbatches per step "
                f"({self.microbatches}) to be a multiple of parallel.pp={self.pp}"
            )

    @classmethod
    def for_batch(
        cls, batch_size: int, microbatch_size: int | None = None, **choices: Any
    ) -> Layout:
        """The layout that splits a global batch of `batch_size` sequences: each dp rank's share
        cut into microbatches of `microbatch_size` (default: the whole share, one microbatch)."""
        dp = choices.get("dp", 1)
        _positive_int("parallel.dp", dp)
        if batch_size % dp:
            raise LayoutError(f"parallel.dp={dp} does not divide train.batch_size={batch_size}")
        micro = microbatch_size or batch_size // dp
        if batch_size % (dp * micro):
            raise LayoutError(
                f"parallel.dp·train.microbatch_size={dp * micro} does not divide "
                f"train.batch_size={batch_size}"
            )
        return cls(microbatch_size=micro, microbatches=batch_size // (dp * micro), **choices)

    # ---- derived --------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp * self.ep

    @property
    def global_batch(self) -> int:
        """Sequences per step over every data-parallel rank."""
        return self.dp * self.microbatch_size * self.microbatches

    @property
    def num_stages(self) -> int:
        """Pipeline stages: pp ranks, each holding `virtual_stages` of them."""
        return self.pp * self.virtual_stages

    @property
    def mesh(self) -> MeshLayout:
        return MeshLayout(self.dp, self.tp, self.pp, self.order)

    @property
    def label(self) -> str:
        """A short, file-name-safe name, e.g. dp2-tp2-sp or pp4-1f1b-m8."""
        sizes = (("dp", self.dp), ("tp", self.tp), ("pp", self.pp))
        parts = [f"{axis}{size}" for axis, size in sizes if size > 1]
        if self.pp > 1:
            virtual = f"-v{self.virtual_stages}" if self.virtual_stages > 1 else ""
            parts += [self.schedule + virtual, f"m{self.microbatches}"]
        if self.sequence_parallel:
            parts.append("sp")
        if self.zero:
            parts.append(f"zero{self.zero}")
        if self.recompute != "none":
            parts.append(f"rc-{self.recompute}")
        return "-".join(parts) or "single"

    def as_dict(self) -> dict[str, Any]:
        """What metrics.json and the reports write under `layout` (keys are only ever added)."""
        return {**asdict(self), "world_size": self.world_size}

    # ---- the one check against a model ------------------------------------------------------
    def check(self, model: ModelShape, seq_len: int | None = None) -> None:
        """Refuse, with one line, a layout this model cannot be split by. `seq_len`: tokens per
        sequence when shorter than the model's block (a projection's choice)."""
        if model.n_head % self.tp:
            raise LayoutError(f"parallel.tp={self.tp} does not divide model.n_head={model.n_head}")
        # Grouped-query attention splits whole key/value heads, as Megatron-core does: a tp
        # larger than n_kv_head is refused rather than replicating heads.
        kv_heads = getattr(model, "n_kv_head", None)
        if kv_heads and kv_heads % self.tp:
            raise LayoutError(
                f"parallel.tp={self.tp} does not divide model.n_kv_head={kv_heads} (tensor "
                "parallelism splits whole key/value heads)"
            )
        ffn = getattr(model, "ffn_hidden", None)
        if ffn and ffn % self.tp:
            raise LayoutError(f"parallel.tp={self.tp} does not divide model.ffn_hidden={ffn}")
        if model.vocab_size % self.tp:
            raise LayoutError(
                f"parallel.tp={self.tp} does not divide model.vocab_size={model.vocab_size}"
            )
        seq = seq_len or model.block_size
        if seq > model.block_size:
            raise LayoutError(f"seq_len={seq} exceeds model.block_size={model.block_size}")
        if self.sequence_parallel and seq % self.tp:
            what = f"model.block_size={seq}" if seq == model.block_size else f"seq_len={seq}"
            raise LayoutError(
                f"parallel.tp={self.tp} does not divide {what} (sequence parallel splits the "
                "sequence)"
            )
        if model.n_layer % self.num_stages:
            raise LayoutError(
                f"parallel.pp·parallel.virtual_stages={self.num_stages} does not divide "
                f"model.n_layer={model.n_layer}"
            )
