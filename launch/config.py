"""Experiment configs: YAML validated into dataclasses.

Every mistake a user can make gets one `ConfigError` line that names the key, what was expected
and what was given; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from civetta.models.gpt import GPTConfig
from civetta.models.llama import LlamaConfig
from civetta.models.moe import AUX_LOSS_SCOPES, MoEConfig
from launch.schedule_files import load_schedule
from launch.schema import Schema
from launch.schema import describe as _describe
from launch.schema import did_you_mean as _did_you_mean
from parallel.cost.framework import ATTENTION_KERNELS, PRESETS, ZERO3_UNITS
from parallel.layout import Layout, LayoutError, is_schedule_file
from parallel.schedules import Schedule, ScheduleError


class ConfigError(ValueError):
    """A bad config file, key or value; the message is the one line the user sees."""


@dataclass
class ModelConfig:
    """The model section: the keys every family has, then each family's own. A family's key
    left out (None) takes the family's default when the config is read; a key of another
    family is refused (`resolve_model`)."""

    kind: str = "gpt"
    vocab_size: int = 256
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    tie_embeddings: bool | None = None  # gpt: true, llama: false
    bias: bool | None = None  # gpt only (default true)
    n_kv_head: int | None = None  # llama only (default n_head)
    ffn_hidden: int | None = None  # llama only (default (8/3)·n_embd, a multiple of 16)
    rope_theta: float | None = None  # llama only (default 10000)
    norm_eps: float | None = None  # llama only (default 1e-5)
    moe: MoEConfig | None = None  # llama only: a section {experts, top_k, ffn_hidden, ...}
    head_dim: int | None = None  # llama only (default n_embd / n_head)
    qk_norm: bool | None = None  # llama only (default false): Qwen3's per-head q/k RMSNorm


# model.kind -> the family's description; its fields are the model section's keys it takes.
FAMILIES: dict[str, type] = {"gpt": GPTConfig, "llama": LlamaConfig}


@dataclass
class DataConfig:
    source: str = "stdlib"
    seed: int = 0


@dataclass
class TrainConfig:
    steps: int = 20
    batch_size: int = 16
    microbatch_size: int | None = None
    lr: float = 3.0e-3
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    optimizer: str = "adamw"
    weight_decay: float = 0.1
    dtype: str = "float32"
    seed: int = 0
    grad_clip: float = 1.0
    eval_batches: int = 4
    checkpoint_every: int = 0  # steps between checkpoints; 0: none
    loss_scale: float = 65536.0  # fp16: the initial dynamic loss scale
    loss_scale_window: int = 1000  # fp16: good steps before the scale doubles
    on_nonfinite: str = "stop"  # a non-finite loss or gradient norm: stop the run, or skip the step
    init_from: str | None = None  # a Hugging Face checkpoint directory to start from (launch.hf)


@dataclass
class ParallelConfig:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1  # context parallelism: the sequence split over cp ranks
    ep: int = 1  # expert parallelism: MoE experts split over ep of the dp × cp ranks
    order: str = "tp-dp-pp"
    schedule: str = "1f1b"
    virtual_stages: int = 1
    sequence_parallel: bool = False
    zero: int = 0
    recompute: str = "none"
    bucket_mb: float = 25.0
    # Layers per stage: "Et*3|t*4|t*4|t*3L" or a list of layer counts; None: as even as possible.
    pipeline_layout: str | None = None
    cp_comm: str = "ring"  # ring | all_gather | a2a: how attention reaches the other chunks
    cp_balance: bool = True  # causal load balancing of the chunks over the cp ranks


@dataclass
class FrameworkConfig:
    """The software a projection assumes (`parallel.cost.framework`): a preset and the
    behaviours it changes; None keeps the preset's. Training runs civetta itself and honours
    only `attention` (the kernel it runs: eager unless set)."""

    preset: str | None = None
    overlap_dp: bool | None = None
    pp_scatter_gather: bool | None = None
    overlap_cp: bool | None = None
    overlap_tp: bool | None = None
    zero3_unit: str | None = None
    zero3_prefetch: int | None = None
    zero3_persistence: int | None = None
    zero3_max_reuse: int | None = None
    zero3_network_gbs: float | None = None
    collective_latency_us: float | None = None
    attention: str | None = None
    allocator_reserve: float | None = None

    def overrides(self) -> dict[str, Any]:
        return {
            k: v for k, v in dataclasses.asdict(self).items() if k != "preset" and v is not None
        }


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    framework: FrameworkConfig = field(default_factory=FrameworkConfig)

    @property
    def layout(self) -> Layout:
        """Every parallel choice of the run, checked (`parallel.layout`); the one form of the
        layout that the runtime, trainer, checkpoints, cost model and reports take."""
        p = self.parallel
        try:
            # Every key of the parallel section is a field of the Layout, by the same name.
            choices = dataclasses.asdict(p)
            if is_schedule_file(p.schedule):
                choices.update(_schedule_file_choices(p))
            layout = Layout.for_batch(self.train.batch_size, self.train.microbatch_size, **choices)
        except LayoutError as exc:
            raise ConfigError(str(exc)) from None
        if is_schedule_file(p.schedule):
            _check_schedule_file_batch(p.schedule, layout)
        return layout

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def microbatch_size(self) -> int:
        """Sequences per microbatch on one DP rank (default: the rank's whole share)."""
        return self.layout.microbatch_size

    @property
    def microbatches(self) -> int:
        return self.layout.microbatches

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@functools.lru_cache(maxsize=16)
def _read_schedule_file(path: str, mtime_ns: int) -> Schedule:
    del mtime_ns  # part of the cache key only: an edited file is read again
    try:
        return load_schedule(path)
    except ScheduleError as exc:
        raise ConfigError(f"parallel.schedule: {exc}") from None


def _schedule_file_choices(p: ParallelConfig) -> dict[str, Any]:
    """The layout's fields a schedule file sets: its stages per rank, actions and placement."""
    path = Path(p.schedule)
    if not path.is_file():
        raise ConfigError(f"parallel.schedule: schedule file {p.schedule!r} does not exist")
    schedule = _read_schedule_file(str(path), path.stat().st_mtime_ns)
    if schedule.pp != p.pp:
        raise ConfigError(
            f"parallel.schedule: {p.schedule!r} is for pp={schedule.pp}, parallel.pp={p.pp}"
        )
    if p.virtual_stages not in (1, schedule.virtual_stages):
        raise ConfigError(
            f"parallel.virtual_stages={p.virtual_stages}, but {p.schedule!r} has "
            f"{schedule.virtual_stages} stages per rank"
        )
    actions = tuple(tuple(str(a) for a in rank) for rank in schedule.actions)
    return {
        "virtual_stages": schedule.virtual_stages,
        "schedule_actions": actions,
        "placement": schedule.placement,
    }


def _check_schedule_file_batch(path: str, layout: Layout) -> None:
    schedule = _read_schedule_file(path, Path(path).stat().st_mtime_ns)
    if schedule.microbatches != layout.microbatches:
        raise ConfigError(
            f"parallel.schedule: {path!r} runs {schedule.microbatches} microbatches per step, "
            f"the batch gives {layout.microbatches} (train.batch_size / (parallel.dp · "
            "train.microbatch_size))"
        )


def _pipeline_layout(key: str, value: Any) -> str | None:
    """`parallel.pipeline_layout` as written: a string, or a list of stages, each a string or
    a number of layers (the embedding and head then go to the first and last stage)."""
    if value is None or isinstance(value, str):
        return value
    if (
        isinstance(value, list)
        and value
        and all(
            isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool) and v >= 0)
            for v in value
        )
    ):
        stages = [v if isinstance(v, str) else f"t*{v}" if v else "" for v in value]
        if all(isinstance(v, int) for v in value):
            stages[0], stages[-1] = "E" + stages[0], stages[-1] + "L"
        return "|".join(stages)
    raise ConfigError(
        f"{key} expected a string like 'Et*3|t*4|t*4|t*3L' or a list of layer counts per "
        f"stage, got {_describe(value)}"
    )


def model_description(config: ExperimentConfig) -> GPTConfig | LlamaConfig:
    """The model the config describes, as its family's description (`civetta.models`)."""
    m = config.model
    family = FAMILIES[m.kind]
    keys = {f.name for f in dataclasses.fields(family)}
    # Not `asdict`: it would turn the moe section into a dict.
    shape = {k: getattr(m, k) for k in keys if getattr(m, k) is not None}
    return family(**shape)


def resolve_model(model: ModelConfig) -> None:
    """Refuse the keys of another family, then fill the family's left-out keys with its
    defaults, so the section says what runs (and checkpoints record it whole)."""
    family = FAMILIES[model.kind]
    own = {f.name for f in dataclasses.fields(family)}
    for f in dataclasses.fields(ModelConfig):
        value = getattr(model, f.name)
        if f.name != "kind" and f.name not in own and value is not None:
            owners = [k for k, cls in FAMILIES.items() if f.name in _field_names(cls)]
            raise ConfigError(
                f"model.{f.name} is not a key of model.kind={model.kind} "
                f"(it is one of {' | '.join(owners)})"
            )
    try:
        described = family(**{k: getattr(model, k) for k in own if getattr(model, k) is not None})
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None
    for name in own:
        setattr(model, name, getattr(described, name))


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "parallel": ParallelConfig,
    "framework": FrameworkConfig,
}
# Top-level keys of an experiment file beside the sections (see `read_with_includes`).
EXPERIMENT_KEYS = ("include", "sweep")

CHOICES = {
    "model.kind": tuple(FAMILIES),
    "train.optimizer": ("adamw", "sgd"),
    "train.lr_schedule": ("constant", "cosine"),
    "train.dtype": ("float32", "float64", "bf16", "fp16"),
    "train.on_nonfinite": ("stop", "skip"),
    "parallel.cp_comm": ("ring", "all_gather", "a2a"),
    "model.moe.aux_loss_scope": AUX_LOSS_SCOPES,
    "framework.preset": tuple(PRESETS),
    "framework.zero3_unit": ZERO3_UNITS,
    "framework.attention": ATTENTION_KERNELS,
}


POSITIVE = {
    "model.vocab_size",
    "model.block_size",
    "model.n_layer",
    "model.n_head",
    "model.n_embd",
    "model.n_kv_head",
    "model.ffn_hidden",
    "model.rope_theta",
    "model.norm_eps",
    "model.head_dim",
    "model.moe.experts",
    "model.moe.top_k",
    "model.moe.ffn_hidden",
    "model.moe.capacity_factor",
    "train.steps",
    "train.batch_size",
    "train.microbatch_size",
    "train.lr",
    "train.eval_batches",
    "train.loss_scale",
    "train.loss_scale_window",
    "parallel.dp",
    "parallel.tp",
    "parallel.pp",
    "parallel.cp",
    "parallel.ep",
    "parallel.virtual_stages",
    "parallel.bucket_mb",
}
NON_NEGATIVE = {
    "framework.zero3_prefetch",
    "framework.collective_latency_us",
    "framework.allocator_reserve",
    "train.checkpoint_every",
    "train.weight_decay",
    "train.grad_clip",
    "train.warmup_steps",
    "data.seed",
    "model.moe.aux_loss_coef",
    "model.moe.shared_experts",
}


SCHEMA = Schema(
    ConfigError,
    positive=POSITIVE,
    non_negative=NON_NEGATIVE,
    choices=CHOICES,
    checks={"parallel.pipeline_layout": _pipeline_layout},
)


def _check_consistency(config: ExperimentConfig) -> None:
    m, t = config.model, config.train
    if m.head_dim is None and m.n_embd % m.n_head:
        raise ConfigError(f"model.n_head={m.n_head} does not divide model.n_embd={m.n_embd}")
    if m.n_kv_head is not None and m.n_head % m.n_kv_head:
        raise ConfigError(f"model.n_kv_head={m.n_kv_head} does not divide model.n_head={m.n_head}")
    resolve_model(m)
    if t.init_from is not None and not (t.init_from and Path(t.init_from).is_dir()):
        raise ConfigError(
            "train.init_from expected a Hugging Face checkpoint directory (config.json and "
            f"model.safetensors), got {t.init_from!r}, which is not a directory"
        )
    if t.warmup_steps > t.steps:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} exceeds train.steps={t.steps}")
    try:
        config.layout.check(m)
    except LayoutError as exc:
        raise ConfigError(str(exc)) from None


def from_dict(raw: Any, origin: str = "config") -> ExperimentConfig:
    """Validate a parsed YAML mapping into an ExperimentConfig."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin} expected a mapping of sections, got {_describe(raw)}")
    config = ExperimentConfig()
    raw = _framework_shorthand(raw)
    for section, values in raw.items():
        if section not in SECTIONS:
            hint = _did_you_mean(str(section), [*SECTIONS, *EXPERIMENT_KEYS])
            raise ConfigError(f"unknown section '{section}' in {origin}{hint}")
        if values is not None:  # an empty section keeps its defaults
            try:
                setattr(config, section, SCHEMA.build(SECTIONS[section], values, f"{section}."))
            except ConfigError:
                raise
            except ValueError as exc:  # a nested description's own check (model.moe's)
                raise ConfigError(f"{section}.{exc}") from None
    _check_consistency(config)
    return config


def _framework_shorthand(raw: dict[str, Any]) -> dict[str, Any]:
    """`framework: deepspeed` is `framework: {preset: deepspeed}`."""
    if isinstance(raw.get("framework"), str):
        return {**raw, "framework": {"preset": raw["framework"]}}
    return raw


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` → (["a", "b"], value), the value parsed as a YAML scalar (typed);
    `framework=name` selects a preset (`framework.preset=name`)."""
    if "=" not in text:
        raise ConfigError(f"--set expected key=value, got {text!r}")
    key, _, value = text.partition("=")
    if key.strip() == "framework":
        key = "framework.preset"
    path = key.strip().split(".")
    if len(path) != 2 or not all(path):
        raise ConfigError(f"--set expected a key like section.name, got {key!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return path, parsed


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None


def load(path: str | Path | None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment (or the defaults when `path` is None) and apply `--set`s.

    `include:`s are resolved; a `sweep:` section is ignored here (`civetta train` runs the base
    config; `load_experiment` and `civetta compare` run the sweep).
    """
    raw = _read_base(path, overrides)
    raw.pop("sweep", None)
    return from_dict(raw, origin=str(path) if path else "config")


def _read_base(path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The raw mapping of `path` with its includes merged and the `--set`s applied."""
    raw = read_with_includes(path) if path is not None else {}
    raw = _framework_shorthand(raw)
    for text in overrides:
        (section, name), value = parse_override(text)
        section_values = raw.setdefault(section, {})
        if not isinstance(section_values, dict):
            raise ConfigError(f"{section} expected a mapping, got {_describe(section_values)}")
        section_values[name] = value
    return raw


# ---- include: and sweep: -------------------------------------------------------------------
def read_with_includes(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping of `path` merged over the files it includes (`include: base.yaml` or a list;
    paths relative to the including file; later files and the including file win, key by key
    within a section). A `sweep:` is replaced whole, never merged."""
    path = Path(path)
    resolved = path.resolve()
    if resolved in _chain:
        names = [str(p) for p in _chain[_chain.index(resolved) :]] + [str(resolved)]
        raise ConfigError(f"include cycle: {' -> '.join(names)}")
    raw = read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} expected a mapping of sections, got {_describe(raw)}")
    for key in raw:
        # Checked per file, so the message names the file the stray key is in.
        if key not in SECTIONS and key not in EXPERIMENT_KEYS:
            hint = _did_you_mean(str(key), [*SECTIONS, *EXPERIMENT_KEYS])
            raise ConfigError(f"unknown section '{key}' in {path}{hint}")
    raw = _framework_shorthand(raw)
    includes = raw.pop("include", None)
    if includes is None:
        return raw
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(
            f"{path}: include expected a file name or a list of file names, "
            f"got {_describe(includes)}"
        )
    merged: dict[str, Any] = {}
    for name in includes:
        target = path.parent / name
        if not target.is_file():
            raise ConfigError(f"{path}: included file {str(target)!r} does not exist")
        merged = _merge(merged, read_with_includes(target, (*_chain, resolved)))
    return _merge(merged, raw)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if key in SECTIONS and value is None:
            continue  # an empty `train:` keeps the included section
        if key in SECTIONS and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **copy.deepcopy(value)}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


LABEL_TEXT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def _scalar_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _field_hint(name: str) -> str:
    """For a bare `dp:` in a sweep entry: the dotted key it probably meant."""
    owners = [s for s, cls in SECTIONS.items() if name in {f.name for f in dataclasses.fields(cls)}]
    return f" (did you mean '{owners[0]}.{name}'?)" if len(owners) == 1 else ""


def _entry_sections(entry: Any, where: str) -> tuple[str | None, dict[str, dict[str, Any]]]:
    """One sweep entry → (its `name:` if any, {section: {key: value}}).

    Keys are dotted (`parallel.dp: 2`) or nested (`parallel: {dp: 2}`), mixed as one likes."""
    if not isinstance(entry, dict):
        raise ConfigError(
            f"{where} expected a mapping of overrides such as {{parallel.dp: 2}}, "
            f"got {_describe(entry)}"
        )
    name: str | None = None
    sections: dict[str, dict[str, Any]] = {}

    def put(section: str, key: str, value: Any) -> None:
        if section not in SECTIONS:
            hint = _did_you_mean(section, list(SECTIONS))
            raise ConfigError(f"{where}: unknown section '{section}'{hint}")
        sections.setdefault(section, {})[key] = value

    for key, value in entry.items():
        key = str(key)
        if key == "name":
            if not isinstance(value, str) or not LABEL_TEXT.fullmatch(value):
                raise ConfigError(
                    f"{where}.name expected letters, digits and . _ + - "
                    f"(a directory name), got {_describe(value)}"
                )
            name = value
        elif "." in key:
            section, _, field_name = key.partition(".")
            if not section or not field_name or "." in field_name:
                raise ConfigError(f"{where}: expected a key like section.name, got {key!r}")
            put(section, field_name, value)
        elif isinstance(value, dict):
            for field_name, field_value in value.items():
                put(key, str(field_name), field_value)
        elif key == "framework":  # `framework: deepspeed`: the preset
            put(key, "preset", value)
        else:
            raise ConfigError(
                f"{where}: expected 'section.name: value' or a section mapping, "
                f"got {key!r}{_field_hint(key)}"
            )
    return name, sections


def _sweep_entries(sweep: Any) -> list[tuple[str, Any]]:
    """The sweep as (where, entry) pairs; a grid becomes one dotted-key entry per combination."""
    if isinstance(sweep, list):
        if not sweep:
            raise ConfigError("sweep expected at least one layout, got an empty list")
        return [(f"sweep[{i}]", entry) for i, entry in enumerate(sweep)]
    if not isinstance(sweep, dict):
        raise ConfigError(
            f"sweep expected a list of layouts or a mapping with 'grid', got {_describe(sweep)}"
        )
    for key in sweep:
        if key != "grid":
            hint = _did_you_mean(str(key), ["grid"], prefix="sweep.")
            raise ConfigError(f"unknown key 'sweep.{key}'{hint}")
    grid = sweep.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(
            f"sweep.grid expected a mapping of section.name: [values], got {_describe(grid)}"
        )
    axes: list[tuple[str, Any]] = []
    for key, values in grid.items():
        key = str(key)
        if "." not in key and isinstance(values, dict):
            axes.extend((f"{key}.{name}", v) for name, v in values.items())
        elif "." in key:
            axes.append((key, values))
        else:
            raise ConfigError(
                f"sweep.grid: expected 'section.name: [values]', got {key!r}{_field_hint(key)}"
            )
    for key, values in axes:
        if not isinstance(values, list) or not values:
            raise ConfigError(
                f"sweep.grid.{key} expected a non-empty list of values, got {_describe(values)}"
            )
    keys = [key for key, _ in axes]
    entries = []
    # The first grid key varies slowest, as in nested loops written in the file's order.
    for i, combination in enumerate(itertools.product(*(values for _, values in axes))):
        shown = ", ".join(f"{k}={_scalar_text(v)}" for k, v in zip(keys, combination, strict=True))
        entries.append((f"sweep[{i}] ({shown})", dict(zip(keys, combination, strict=True))))
    return entries


def load_experiment(
    path: str | Path | None, overrides: Sequence[str] = ()
) -> tuple[ExperimentConfig, list[tuple[str, ExperimentConfig]]]:
    """The base config and its sweep's layouts as (label, config), each validated in full.

    `--set`s change the base; each sweep entry then overrides the base. Without a `sweep:` the
    list is empty. An error in an entry names it: `sweep[2]: parallel.tp=3 does not divide
    model.n_head=4`.
    """
    raw = _read_base(path, overrides)
    sweep = raw.pop("sweep", None)
    origin = str(path) if path else "config"
    base = from_dict(copy.deepcopy(raw), origin=origin)
    if sweep is None:
        return base, []
    layouts: list[tuple[str, ExperimentConfig]] = []
    named: dict[str, str] = {}
    for where, entry in _sweep_entries(sweep):
        name, sections = _entry_sections(entry, where)
        try:
            config = from_dict(_merge(raw, sections), origin=origin)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if name is not None:
            if name.startswith("baseline"):
                raise ConfigError(
                    f"{where}.name {name!r} is reserved for the single-process baseline"
                )
            if name in named:
                raise ConfigError(f"{where}.name {name!r} is already used by {named[name]}")
            named[name] = where
        layouts.append((name or config.layout.label, config))
    return base, _unique_labels(layouts)


def _unique_labels(
    layouts: list[tuple[str, ExperimentConfig]],
) -> list[tuple[str, ExperimentConfig]]:
    """Two entries with the same layout (differing in, say, dtype) get -2, -3 suffixes."""
    seen: dict[str, int] = {}
    taken = {label for label, _ in layouts}
    unique = []
    for label, config in layouts:
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            suffix = seen[label]
            while f"{label}-{suffix}" in taken:
                suffix += 1
            taken.add(f"{label}-{suffix}")
            label = f"{label}-{suffix}"
        unique.append((label, config))
    return unique
