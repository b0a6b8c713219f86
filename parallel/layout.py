"""The layout: every parallel choice of a training run, in one frozen value.

A `Layout` says how one step is split over ranks: the sizes of the mesh axes (data, tensor,
pipeline and context parallelism, and expert parallelism folded onto data × context, adding no
ranks: `parallel.mesh`), their order, sequence parallelism, the pipeline schedule and its
virtual stages, the microbatch size and count, the ZeRO stage, activation recomputation and the
gradient bucket size, and how the layers are cut into stages (`pipeline_layout`, or as evenly
as possible). It is built once from the experiment config (`launch.config.layout_of`),
checked here and nowhere else (`Layout.check`), and passed to the runtime, the trainer, the
checkpoints, the cost model, the tuner and the reports; metrics.json writes `as_dict()`.

Errors are `LayoutError`s with one bare line naming the config key, what was expected and what
was given; the command line prefixes it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from parallel.mesh import AXES, MeshLayout

# V-shaped schedules hold two stages per rank, stages r and 2·pp − 1 − r on rank r.
V_SCHEDULES = ("zb-v", "dualpipev")
SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", *V_SCHEDULES)
SCHEDULE_FILE_SUFFIXES = (".yaml", ".yml", ".csv")
RECOMPUTE = ("none", "full", "selective")
ZERO_STAGES = (0, 1, 2, 3)
CP_COMMS = ("ring", "all_gather", "a2a")


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


def is_schedule_file(schedule: Any) -> bool:
    """Whether `parallel.schedule` names a schedule file rather than a generator."""
    return isinstance(schedule, str) and schedule.lower().endswith(SCHEDULE_FILE_SUFFIXES)


_STAGE_TOKEN = re.compile(r"([EtL])(?:\*(\d+))?")


def parse_pipeline_layout(text: str, num_stages: int) -> tuple[int, ...]:
    """Layers per stage of a `parallel.pipeline_layout` string, in the spirit of Megatron-LM's
    `--pipeline-model-parallel-layout`: stages separated by `|`, in each `E` for the token
    embedding, `t` for one transformer layer (`t*4` for four) and `L` for the final norm, head
    and loss; the embedding opens the first stage and the head closes the last one. "Et*3|t*4|
    t*4|t*3L" cuts 14 layers into 3, 4, 4, 3. A stage may hold no layer ("E|t*8|L")."""
    key = "parallel.pipeline_layout"
    stages = text.replace(" ", "").split("|")
    if len(stages) != num_stages:
        raise LayoutError(
            f"{key} expected {num_stages} stages separated by '|' (one per pipeline stage), "
            f"got {len(stages)} in {text!r}"
        )
    counts = []
    for index, stage in enumerate(stages):
        position, layers = 0, 0
        for match in _STAGE_TOKEN.finditer(stage):
            if match.start() != position:
                break
            position = match.end()
            token, repeat = match.group(1), int(match.group(2) or 1)
            if token == "t":
                layers += repeat
                continue
            first, last = index == 0 and match.start() == 0, index == num_stages - 1
            where = "the first stage's start" if token == "E" else "the last stage's end"
            if repeat != 1 or not (first if token == "E" else last and position == len(stage)):
                raise LayoutError(f"{key}: {token!r} belongs once at {where}, got {text!r}")
        if position != len(stage):
            raise LayoutError(
                f"{key}: stage {index} {stage!r} expected E, t, t*N and L only, got {text!r}"
            )
        counts.append(layers)
    if not stages[0].startswith("E") or not stages[-1].endswith("L"):
        raise LayoutError(
            f"{key} expected the embedding E to open the first stage and the head L to close "
            f"the last one, got {text!r}"
        )
    return tuple(counts)


def even_layers(n_layer: int, num_stages: int) -> tuple[int, ...]:
    """Layers per stage, as evenly as possible: stages that hold neither the embedding nor the
    head take the extra layers first (Meta's Llama 3 405B pipeline gives its first and last
    stage a layer less), then the last stage, then the first."""
    base, extra = divmod(n_layer, num_stages)
    counts = [base] * num_stages
    preference = [*range(1, num_stages - 1), num_stages - 1, 0][:num_stages]
    for stage in preference[:extra]:
        counts[stage] += 1
    return tuple(counts)


@functools.lru_cache(maxsize=1024)
def _stage_layers(pipeline_layout: str | None, num_stages: int, n_layer: int) -> tuple[range, ...]:
    # Cached: a tuner asks for the stages of thousands of layouts of a few shapes.
    if pipeline_layout is not None:
        counts = parse_pipeline_layout(pipeline_layout, num_stages)
    else:
        counts = even_layers(n_layer, num_stages)
    starts = [sum(counts[:s]) for s in range(len(counts))]
    return tuple(range(start, start + n) for start, n in zip(starts, counts, strict=True))


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
    cp: int = 1  # context parallelism: the sequence split over cp ranks
    ep: int = 1  # expert parallelism: a MoE layer's experts split over ep of the dp × cp ranks
    order: str = "tp-dp-pp"  # mesh axes, fastest-varying first
    sequence_parallel: bool = False
    schedule: str = "1f1b"
    virtual_stages: int = 1
    microbatch_size: int = 1  # sequences per microbatch on one dp rank
    microbatches: int = 1  # per step
    zero: int = 0
    recompute: str = "none"
    bucket_mb: float = 25.0  # MiB per gradient bucket (`parallel.data_parallel`)
    pipeline_layout: str | None = None  # layers per stage (`parse_pipeline_layout`)
    cp_comm: str = "ring"  # how attention sees the other cp ranks' keys and values
    cp_balance: bool = True  # causal load balancing: chunks i and 2·cp − 1 − i on cp rank i
    # A schedule file's content (`parallel.schedule: PATH`), read by the launcher: each rank's
    # actions as strings ("F0@s1") and where each stage lives. The layout stays a value.
    schedule_actions: tuple[tuple[str, ...], ...] | None = None
    placement: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for key in ("dp", "tp", "pp", "cp", "ep", "virtual_stages"):
            _positive_int(f"parallel.{key}", getattr(self, key))
        for key in ("microbatch_size", "microbatches"):
            _positive_int(key, getattr(self, key))
        if (self.dp * self.cp) % self.ep:
            raise LayoutError(
                f"parallel.ep={self.ep} does not divide parallel.dp × parallel.cp = "
                f"{self.dp * self.cp} (the experts fold onto the data-parallel ranks)"
            )
        _one_of("parallel.cp_comm", self.cp_comm, CP_COMMS)
        if not is_schedule_file(self.schedule):
            options = (*SCHEDULES, "a schedule file (.yaml, .yml, .csv)")
            _one_of("parallel.schedule", self.schedule, options)
        elif self.schedule_actions is None:
            raise LayoutError(f"parallel.schedule={self.schedule!r}: the file was not read")
        _one_of("parallel.recompute", self.recompute, RECOMPUTE)
        _one_of("parallel.zero", self.zero, ZERO_STAGES)
        axes = self.order.split("-") if isinstance(self.order, str) else []
        if "cp" not in axes and "tp" in axes:  # cp left out: right after tp (`parse_order`)
            axes.insert(axes.index("tp") + 1, "cp")
        if sorted(axes) != sorted(AXES):
            raise LayoutError(
                f"parallel.order expected the axes dp, tp, pp (and optionally cp) joined by '-', "
                f"got {self.order!r}"
            )
        if isinstance(self.bucket_mb, bool) or not self.bucket_mb > 0:
            raise LayoutError(
                f"parallel.bucket_mb expected a positive number, got {self.bucket_mb}"
            )
        file = is_schedule_file(self.schedule)
        if self.virtual_stages > 1 and self.schedule != "interleaved-1f1b" and not file:
            raise LayoutError(
                f"parallel.virtual_stages={self.virtual_stages} needs "
                f"parallel.schedule=interleaved-1f1b, got {self.schedule}"
            )
        if self.virtual_stages > 1 and self.pp == 1:
            raise LayoutError("parallel.virtual_stages > 1 needs parallel.pp > 1")
        if self.schedule in V_SCHEDULES and self.pp == 1:
            raise LayoutError(f"parallel.schedule={self.schedule} needs parallel.pp > 1")
        if self.pipeline_layout is not None:
            parse_pipeline_layout(self.pipeline_layout, self.num_stages)
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
        return self.dp * self.tp * self.pp * self.cp  # ep folds onto dp × cp

    @property
    def global_batch(self) -> int:
        """Sequences per step over every data-parallel rank."""
        return self.dp * self.microbatch_size * self.microbatches

    @property
    def stages_per_rank(self) -> int:
        """Pipeline stages each rank holds: two for a V-shaped schedule, else virtual_stages."""
        return 2 if self.schedule in V_SCHEDULES else self.virtual_stages

    @property
    def num_stages(self) -> int:
        """Pipeline stages: pp ranks, each holding `stages_per_rank` of them."""
        return self.pp * self.stages_per_rank

    def stage_layers(self, n_layer: int) -> tuple[range, ...]:
        """The blocks of each stage, in model order: as `pipeline_layout` says, or as evenly as
        possible (`even_layers`)."""
        return _stage_layers(self.pipeline_layout, self.num_stages, n_layer)

    @property
    def stage_placement(self) -> tuple[int, ...]:
        """The rank of each stage: a file's placement, the V of a V-shaped schedule, or
        interleaved (stage s on rank s % pp)."""
        if self.placement is not None:
            return self.placement
        if self.schedule in V_SCHEDULES:
            return (*range(self.pp), *reversed(range(self.pp)))
        return tuple(s % self.pp for s in range(self.num_stages))

    @property
    def shares_ends_rank(self) -> bool:
        """Whether the first and the last stage live on the same rank of a real pipeline."""
        placement = self.stage_placement
        return self.pp > 1 and placement[0] == placement[-1]

    @property
    def schedule_label(self) -> str:
        """The schedule as a label shows it: a generator's name, or a file's stem."""
        if is_schedule_file(self.schedule):
            stem = self.schedule.replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
            return re.sub(r"[^A-Za-z0-9_.-]", "_", stem)
        return self.schedule

    @property
    def mesh(self) -> MeshLayout:
        return MeshLayout(self.dp, self.tp, self.pp, self.order, self.cp, self.ep)

    @property
    def label(self) -> str:
        """A short, file-name-safe name, e.g. dp2-tp2-sp or pp4-1f1b-m8."""
        sizes = (("dp", self.dp), ("tp", self.tp), ("pp", self.pp))
        parts = [f"{axis}{size}" for axis, size in sizes if size > 1]
        if self.cp > 1:
            parts.append(f"cp{self.cp}-{self.cp_comm.replace('_', '')}")
            if not self.cp_balance:
                parts.append("unbalanced")
        if self.ep > 1:
            parts.append(f"ep{self.ep}")
        if self.pp > 1:
            virtual = f"-v{self.virtual_stages}" if self.virtual_stages > 1 else ""
            parts += [self.schedule_label + virtual, f"m{self.microbatches}"]
        if self.sequence_parallel:
            parts.append("sp")
        if self.zero:
            parts.append(f"zero{self.zero}")
        if self.recompute != "none":
            parts.append(f"rc-{self.recompute}")
        return "-".join(parts) or "single"

    def as_dict(self) -> dict[str, Any]:
        """What metrics.json and the reports write under `layout` (keys are only ever added)."""
        values = asdict(self)
        del values["schedule_actions"]  # the file's content; `schedule` names the file
        return {**values, "world_size": self.world_size}

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
        moe = getattr(model, "moe", None)
        if self.ep > 1 and moe is None:
            raise LayoutError(
                f"parallel.ep={self.ep} needs a mixture-of-experts model (model.moe), got a "
                "dense one"
            )
        if moe is not None and moe.experts % self.ep:
            raise LayoutError(
                f"parallel.ep={self.ep} does not divide model.moe.experts={moe.experts}"
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
        what = f"model.block_size={seq}" if seq == model.block_size else f"seq_len={seq}"
        if self.cp > 1:
            chunks = 2 * self.cp if self.cp_balance else self.cp
            if seq % chunks:
                balance = " (2·cp chunks: parallel.cp_balance)" if self.cp_balance else ""
                raise LayoutError(
                    f"the {chunks} sequence chunks of parallel.cp={self.cp}{balance} do not "
                    f"divide {what}"
                )
            if self.cp_comm == "a2a":
                heads = getattr(model, "n_kv_head", None) or model.n_head
                key = "model.n_kv_head" if getattr(model, "n_kv_head", None) else "model.n_head"
                if heads % (self.cp * self.tp):
                    raise LayoutError(
                        f"parallel.cp_comm=a2a splits the key/value heads over cp: "
                        f"parallel.cp={self.cp} × parallel.tp={self.tp} does not divide "
                        f"{key}={heads}"
                    )
            seq //= self.cp  # what each cp rank holds, which sequence parallelism splits
            what = f"the {seq} tokens each cp rank holds"
        if self.sequence_parallel and seq % self.tp:
            raise LayoutError(
                f"parallel.tp={self.tp} does not divide {what} (sequence parallel splits the "
                "sequence)"
            )
        if self.pipeline_layout is not None:
            counts = parse_pipeline_layout(self.pipeline_layout, self.num_stages)
            if sum(counts) != model.n_layer:
                raise LayoutError(
                    f"parallel.pipeline_layout places {sum(counts)} layers, "
                    f"model.n_layer={model.n_layer}"
                )
        elif model.n_layer < self.num_stages:
            raise LayoutError(
                f"the pipeline has {self.num_stages} stages, more than model.n_layer="
                f"{model.n_layer} (set parallel.pipeline_layout to leave a stage without layers)"
            )
