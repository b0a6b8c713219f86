"""Experiment configs: YAML validated into dataclasses.

Every mistake a user can make gets one `ConfigError` line that names the key, what was expected
and what was given; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config file, key or value; the message is the one line the user sees."""


@dataclass
class ModelConfig:
    kind: str = "gpt"
    vocab_size: int = 256
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    tie_embeddings: bool = True
    bias: bool = True


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


@dataclass
class ParallelConfig:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    order: str = "tp-dp-pp"
    schedule: str = "1f1b"
    virtual_stages: int = 1
    sequence_parallel: bool = False
    zero: int = 0
    recompute: str = "none"
    bucket_mb: float = 25.0


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @property
    def world_size(self) -> int:
        return self.parallel.dp * self.parallel.tp * self.parallel.pp

    @property
    def microbatch_size(self) -> int:
        """Sequences per microbatch on one DP rank (default: the rank's whole share)."""
        return self.train.microbatch_size or self.train.batch_size // self.parallel.dp

    @property
    def microbatches(self) -> int:
        return self.train.batch_size // (self.parallel.dp * self.microbatch_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "parallel": ParallelConfig,
}

CHOICES = {
    "model.kind": ("gpt",),
    "train.optimizer": ("adamw", "sgd"),
    "train.lr_schedule": ("constant", "cosine"),
    "train.dtype": ("float32", "float64", "bf16", "fp16"),
    "parallel.schedule": ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1"),
    "parallel.recompute": ("none", "full", "selective"),
    "parallel.zero": (0, 1, 2, 3),
}

# Values the schema accepts but this version cannot run yet; refused with a clear line.
NOT_YET = {
    "train.dtype": ("bf16", "fp16"),
}

POSITIVE = {
    "model.vocab_size",
    "model.block_size",
    "model.n_layer",
    "model.n_head",
    "model.n_embd",
    "train.steps",
    "train.batch_size",
    "train.microbatch_size",
    "train.lr",
    "train.eval_batches",
    "parallel.dp",
    "parallel.tp",
    "parallel.pp",
    "parallel.virtual_stages",
    "parallel.bucket_mb",
}
NON_NEGATIVE = {"train.weight_decay", "train.grad_clip", "train.warmup_steps", "data.seed"}


def _did_you_mean(name: str, options: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(key: str, value: Any, annotation: str) -> Any:
    """Check `value` against a dataclass field's annotation (kept as a string by __future__)."""
    optional = annotation.endswith("| None")
    base = annotation.replace("| None", "").strip()
    if value is None:
        if optional:
            return None
        raise ConfigError(f"error: {key} expected {base}, got null")
    if base == "bool":
        if isinstance(value, bool):
            return value
    elif base == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base == "float":
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads 1e-3 (no dot) as a string; accept what is plainly a number.
        if isinstance(value, str) and FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)
    elif base == "str" and isinstance(value, str):
        return value
    raise ConfigError(f"error: {key} expected {base}, got {_describe(value)}")


def _check_values(config: ExperimentConfig) -> None:
    for section in SECTIONS:
        values = getattr(config, section)
        for f in dataclasses.fields(values):
            key, value = f"{section}.{f.name}", getattr(values, f.name)
            if key in CHOICES and value not in CHOICES[key]:
                options = " | ".join(map(str, CHOICES[key]))
                raise ConfigError(f"error: {key} expected one of {options}, got {value!r}")
            if key in NOT_YET and value in NOT_YET[key]:
                raise ConfigError(f"error: {key}={value} is not supported yet in this version")
            if value is not None and key in POSITIVE and value <= 0:
                raise ConfigError(f"error: {key} expected a positive number, got {value!r}")
            if value is not None and key in NON_NEGATIVE and value < 0:
                raise ConfigError(f"error: {key} expected a number >= 0, got {value!r}")


def _check_consistency(config: ExperimentConfig) -> None:
    m, t, p = config.model, config.train, config.parallel
    if m.n_embd % m.n_head:
        raise ConfigError(f"error: model.n_head={m.n_head} does not divide model.n_embd={m.n_embd}")
    axes = p.order.split("-")
    if sorted(axes) != ["dp", "pp", "tp"]:
        raise ConfigError(
            f"error: parallel.order expected the axes dp, tp, pp joined by '-', got {p.order!r}"
        )
    if m.n_head % p.tp:
        raise ConfigError(f"error: parallel.tp={p.tp} does not divide model.n_head={m.n_head}")
    if m.vocab_size % p.tp:
        raise ConfigError(
            f"error: parallel.tp={p.tp} does not divide model.vocab_size={m.vocab_size}"
        )
    if p.sequence_parallel and m.block_size % p.tp:
        raise ConfigError(
            f"error: parallel.tp={p.tp} does not divide model.block_size={m.block_size} "
            "(sequence parallel splits the sequence)"
        )
    if t.batch_size % p.dp:
        raise ConfigError(
            f"error: parallel.dp={p.dp} does not divide train.batch_size={t.batch_size}"
        )
    micro = config.microbatch_size
    if t.batch_size % (p.dp * micro):
        raise ConfigError(
            f"error: parallel.dp·train.microbatch_size={p.dp * micro} does not divide "
            f"train.batch_size={t.batch_size}"
        )
    if t.warmup_steps > t.steps:
        raise ConfigError(
            f"error: train.warmup_steps={t.warmup_steps} exceeds train.steps={t.steps}"
        )
    if p.zero:
        raise ConfigError("error: parallel.zero > 0 (ZeRO sharding) is not supported yet")
    _check_pipeline(config)


def _check_pipeline(config: ExperimentConfig) -> None:
    m, p = config.model, config.parallel
    stages = p.pp * p.virtual_stages
    if m.n_layer % stages:
        raise ConfigError(
            f"error: parallel.pp·parallel.virtual_stages={stages} does not divide "
            f"model.n_layer={m.n_layer}"
        )
    if p.virtual_stages > 1 and p.schedule != "interleaved-1f1b":
        raise ConfigError(
            f"error: parallel.virtual_stages={p.virtual_stages} needs "
            f"parallel.schedule=interleaved-1f1b, got {p.schedule}"
        )
    if p.virtual_stages > 1 and p.pp == 1:
        raise ConfigError("error: parallel.virtual_stages > 1 needs parallel.pp > 1")
    if p.schedule == "interleaved-1f1b" and config.microbatches % p.pp:
        raise ConfigError(
            f"error: parallel.schedule=interleaved-1f1b needs the microbatches per step "
            f"({config.microbatches}) to be a multiple of parallel.pp={p.pp}"
        )


def from_dict(raw: Any, origin: str = "config") -> ExperimentConfig:
    """Validate a parsed YAML mapping into an ExperimentConfig."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"error: {origin} expected a mapping of sections, got {_describe(raw)}")
    config = ExperimentConfig()
    for section, values in raw.items():
        if section not in SECTIONS:
            hint = _did_you_mean(str(section), [*SECTIONS, *EXPERIMENT_KEYS])
            raise ConfigError(f"error: unknown section '{section}' in {origin}{hint}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"error: {section} expected a mapping, got {_describe(values)}")
        target = getattr(config, section)
        fields = {f.name: f for f in dataclasses.fields(target)}
        for name, value in values.items():
            key = f"{section}.{name}"
            if name not in fields:
                hint = _did_you_mean(str(name), list(fields), prefix=f"{section}.")
                raise ConfigError(f"error: unknown key '{key}'{hint}")
            setattr(target, name, _coerce(key, value, str(fields[name].type)))
    _check_values(config)
    _check_consistency(config)
    return config


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` → (["a", "b"], value), the value parsed as a YAML scalar (typed)."""
    if "=" not in text:
        raise ConfigError(f"error: --set expected key=value, got {text!r}")
    key, _, value = text.partition("=")
    path = key.strip().split(".")
    if len(path) != 2 or not all(path):
        raise ConfigError(f"error: --set expected a key like section.name, got {key!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return path, parsed


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"error: config file {str(path)!r} does not exist")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"error: {path}{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"error: {path} is not UTF-8 text") from None


def load(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment (or the defaults when `path` is None) and apply `--set`s.

    `include:`s are resolved; a `sweep:` section is ignored here (`civetta train` runs the base
    config; `load_experiment` and `civetta compare` run the sweep).
    """
    raw = _read_base(path, overrides)
    raw.pop("sweep", None)
    return from_dict(raw, origin=str(path) if path else "config")


def _read_base(path: str | Path | None, overrides: list[str] = ()) -> dict[str, Any]:
    """The raw mapping of `path` with its includes merged and the `--set`s applied."""
    raw = read_with_includes(path) if path is not None else {}
    for text in overrides:
        (section, name), value = parse_override(text)
        section_values = raw.setdefault(section, {})
        if not isinstance(section_values, dict):
            raise ConfigError(
                f"error: {section} expected a mapping, got {_describe(section_values)}"
            )
        section_values[name] = value
    return raw
