"""Published measurements as data: `configs/references/*.yaml`, one file a reference set.

A set names its source, the hardware profile and framework preset it was measured on, the
metric its rows hold, and its rows: each an experiment config (model, train, parallel; `include:`
relative to the file), the row's own software facts (`framework:`; keys civetta models are
applied, the others are kept as recorded facts), and what was measured. `project_row` projects a
row as the cost model sees it, under the set's preset and the row's facts, so a calibration
(`launch/fit.py`), the accuracy benchmark and the tests all price a row the same way.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launch.config import (
    ConfigError,
    ExperimentConfig,
    _merge,
    from_dict,
    model_description,
    read_with_includes,
    read_yaml,
)
from launch.simulate import framework_of, workload_of
from parallel.cost.framework import SETTABLE
from parallel.cost.hardware import HardwareProfile
from parallel.cost.projection import Projection, project

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "configs" / "references"
METRICS = ("tflops_per_gpu", "mfu", "tokens_per_s_per_gpu", "peak_memory_gib")
# How the source counts FLOPs: Narayanan et al.'s Eq. 3 counts the recomputed forward (civetta's
# hardware FLOPs); model FLOPs (MFU as Chowdhery et al. define it) do not.
FLOPS_FORMULAS = ("narayanan-eq3", "model")


@dataclass(frozen=True)
class ReferenceRow:
    set_name: str
    id: str
    config: ExperimentConfig
    measured: dict[str, float]
    facts: dict[str, Any] = field(default_factory=dict)  # software facts civetta does not model
    note: str = ""

    @property
    def key(self) -> str:
        return f"{self.set_name}/{self.id}"


@dataclass(frozen=True)
class ReferenceSet:
    name: str
    source: str
    hardware: str
    framework: str
    metric: str
    flops_formula: str
    rows: tuple[ReferenceRow, ...]


def _row_config(raw: Any, origin: Path, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}.config expected a mapping of sections, got {raw!r}")
    raw = dict(raw)
    includes = raw.pop("include", None)
    merged: dict[str, Any] = {}
    for name in [includes] if isinstance(includes, str) else includes or []:
        merged = _merge(merged, read_with_includes(origin.parent / name))
    return _merge(merged, raw)


def load_reference_set(path: str | Path) -> ReferenceSet:
    """Read and check one reference file; every row's config is validated as an experiment."""
    path = resolve_reference_path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("rows"), list):
        raise ConfigError(f"{path}: expected a mapping with a list of rows")
    for key in ("name", "source", "hardware", "framework", "metric"):
        if not isinstance(raw.get(key), str):
            raise ConfigError(f"{path}: {key} expected a string, got {raw.get(key)!r}")
    if raw["metric"] not in METRICS:
        raise ConfigError(f"{path}: metric expected one of {' | '.join(METRICS)}")
    formula = raw.get("flops_formula", "model")
    if formula not in FLOPS_FORMULAS:
        raise ConfigError(f"{path}: flops_formula expected one of {' | '.join(FLOPS_FORMULAS)}")
    rows = []
    for i, entry in enumerate(raw["rows"]):
        where = f"{path.name}: rows[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            raise ConfigError(f"{where} expected a mapping with an id")
        config_raw = _row_config(entry.get("config"), path, where)
        software = dict(entry.get("framework") or {})
        modelled = {k: v for k, v in software.items() if k in SETTABLE}
        config_raw["framework"] = {"preset": raw["framework"], **modelled}
        config = from_dict(config_raw, origin=f"{where} ({entry['id']})")
        measured = entry.get("measured")
        if not isinstance(measured, dict) or raw["metric"] not in measured:
            raise ConfigError(f"{where}.measured expected a mapping with {raw['metric']}")
        facts = {k: v for k, v in software.items() if k not in SETTABLE}
        note = str(entry.get("note", ""))
        rows.append(ReferenceRow(raw["name"], entry["id"], config, measured, facts, note))
    return ReferenceSet(
        raw["name"], raw["source"], raw["hardware"], raw["framework"], raw["metric"], formula,
        tuple(rows),
    )  # fmt: skip


def resolve_reference_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = REFERENCE_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    known = sorted(p.stem for p in REFERENCE_DIR.glob("*.yaml"))
    raise ConfigError(f"reference set {str(name_or_path)!r} is neither a file nor one of {known}")


def select_rows(patterns: list[str]) -> list[tuple[ReferenceSet, ReferenceRow]]:
    """Rows named `set` (all of them) or `set/id-pattern` (fnmatch), in the order given."""
    chosen: list[tuple[ReferenceSet, ReferenceRow]] = []
    for pattern in patterns:
        name, _, wanted = pattern.partition("/")
        ref = load_reference_set(name)
        rows = [r for r in ref.rows if fnmatch.fnmatchcase(r.id, wanted or "*")]
        if not rows:
            raise ConfigError(f"reference rows {pattern!r} match nothing in {ref.name}")
        chosen += [(ref, r) for r in rows if (ref, r) not in chosen]
    return chosen


def project_row(row: ReferenceRow, profile: HardwareProfile) -> Projection:
    config = row.config
    framework = framework_of(config, profile)
    return project(
        model_description(config), config.layout, profile, framework, workload_of(config)
    )


def projected_value(
    ref: ReferenceSet, row: ReferenceRow, profile: HardwareProfile, metric: str | None = None
) -> float:
    """The cost model's value of `metric` (default: the set's) for `row`, counted as the
    source counts it. Peak memory is what the framework allocates (`gathered` and `reserve`
    included): what a source reading the allocator's reserved bytes measures."""
    pr = project_row(row, profile)
    metric = metric or ref.metric
    eq3 = ref.flops_formula == "narayanan-eq3"
    if metric == "tflops_per_gpu":
        return pr.hardware_tflops_per_gpu if eq3 else pr.tflops_per_gpu
    if metric == "mfu":
        return pr.hfu if eq3 else pr.mfu
    if metric == "tokens_per_s_per_gpu":
        return pr.tokens_per_s / pr.world_size
    return pr.memory_per_gpu["total"] / 2**30


def with_framework(row: ReferenceRow, **changes: Any) -> ReferenceRow:
    """`row` with its framework keys changed (for what-if checks)."""
    fw = dataclasses.replace(row.config.framework, **changes)
    return dataclasses.replace(row, config=dataclasses.replace(row.config, framework=fw))
