"""`civetta fit SPEC [--write]`: fit a hardware profile's free numbers to published rows.

A calibration spec (`configs/calibration/*.yaml`) names the profile, the reference rows fitted
on (`fit_on`: in-sample), the rows held out (`held_out`: frozen before the fit, never seen by
it), each set's bound on the largest relative error, and the free parameters with their bounds:

    profile: a100-dgx
    fit_on: [narayanan-2021-table-1]            # a set, or set/row-pattern
    held_out: [narayanan-2021-table-2-ptdp]
    bounds: {fit_on: 0.05, held_out: 0.10}
    free:
      device.gemm_max_efficiency: [0.5, 0.95]

The command projects every row, fits, prints the per-row tables (measured, projected, error;
in-sample and held out apart), and with `--write` writes the fitted numbers into the profile
file, with a `calibration:` entry saying what was fitted, on which rows, their errors, and what
those rows cover (`coverage`, which `tune` checks layouts against).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from launch.config import ConfigError, read_yaml
from launch.profiles import load_profile, profile_from_dict, resolve_profile_path
from launch.references import ReferenceRow, ReferenceSet, projected_value, select_rows
from parallel.cost.fitting import (
    FitResult,
    FreeParameter,
    fit_from_starts,
    parameter_value,
    with_parameters,
)
from parallel.cost.hardware import HardwareProfile

CALIBRATION_DIR = Path(__file__).resolve().parents[1] / "configs" / "calibration"
Rows = list[tuple[ReferenceSet, ReferenceRow]]


@dataclass(frozen=True)
class Spec:
    name: str
    profile: str
    fit_on: list[str]
    held_out: list[str]
    bounds: dict[str, float]
    free: list[FreeParameter]
    metric: str | None = None  # the measurement compared (default: each set's own metric)


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    if not path.is_file():
        shipped = CALIBRATION_DIR / f"{path}.yaml"
        path = shipped if shipped.is_file() else path
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping")
    if "profile" not in raw:
        raise ConfigError(f"{path}: missing 'profile'")
    if not raw.get("fit_on") and not raw.get("held_out"):
        raise ConfigError(f"{path}: expected rows to fit on (fit_on) or to check (held_out)")
    free = []
    for key, span in (raw.get("free") or {}).items():
        if not (isinstance(span, list) and len(span) == 2 and span[0] < span[1]):
            raise ConfigError(f"{path}: free.{key} expected [low, high], got {span!r}")
        free.append(FreeParameter(str(key), float(span[0]), float(span[1])))
    bounds = {"fit_on": 0.05, "held_out": 0.10, **(raw.get("bounds") or {})}
    return Spec(
        path.stem, str(raw["profile"]), list(raw.get("fit_on") or []),
        list(raw.get("held_out") or []),
        bounds, free, raw.get("metric"),
    )  # fmt: skip


def errors_of(rows: Rows, profile: HardwareProfile, metric: str | None = None) -> list[float]:
    """Relative error of the projection against each row's measurement of `metric` (default:
    the row's set's)."""
    out = []
    for ref, row in rows:
        measured = float(row.measured[metric or ref.metric])
        out.append(projected_value(ref, row, profile, metric) / measured - 1)
    return out


def coverage(rows: Rows) -> dict[str, Any]:
    """What the rows exercise: a layout beyond these is outside the calibration."""
    layouts = [row.config.layout for _, row in rows]
    return {
        "frameworks": sorted({ref.framework for ref, _ in rows}),
        "zero": sorted({lay.zero for lay in layouts}),
        "recompute": sorted({lay.recompute for lay in layouts}),
        "sequence_parallel": sorted({lay.sequence_parallel for lay in layouts}),
        "max": {a: max(getattr(lay, a) for lay in layouts) for a in ("tp", "pp", "cp", "ep")},
        "dtypes": sorted({row.config.train.dtype for _, row in rows}),
    }  # fmt: skip


def outside(cover: dict[str, Any], layout: Any, framework: str, dtype: str) -> list[str]:
    """The choices of `layout` (under `framework`, in `dtype`) that `cover` does not include."""
    found = []
    if framework not in cover.get("frameworks", [framework]):
        found.append(f"framework {framework}")
    for key in ("zero", "recompute", "sequence_parallel"):
        if key in cover and getattr(layout, key) not in cover[key]:
            found.append(f"{key}={getattr(layout, key)}")
    for axis, most in cover.get("max", {}).items():
        if getattr(layout, axis) > most:
            found.append(f"{axis}={getattr(layout, axis)} > {most}")
    if dtype not in cover.get("dtypes", [dtype]):
        found.append(f"dtype {dtype}")
    return found


def calibration_gaps(
    profile: HardwareProfile, layout: Any, framework: str, dtype: str
) -> list[str]:
    """Nothing when one of the profile's calibrations covers the layout; otherwise what the
    closest one leaves uncovered."""
    gaps = [
        outside(e.get("coverage", {}), layout, framework, dtype)
        for e in profile.calibration.values()
    ]
    return min(gaps, key=len, default=["no calibration"])


@dataclass
class Calibration:
    spec: Spec
    profile: HardwareProfile
    fit_rows: Rows
    held_rows: Rows
    result: FitResult | None
    fit_errors: list[float]
    held_errors: list[float]


def calibrate(spec: Spec, log: Callable[[str], Any] | None = None) -> Calibration:
    """Fit `spec` (or, with no free parameters, only project its rows)."""
    profile = load_profile(spec.profile)
    fit_rows, held_rows = select_rows(spec.fit_on), select_rows(spec.held_out)
    for rows in (fit_rows, held_rows):
        for ref, row in rows:
            if ref.hardware != profile.name:
                raise ConfigError(f"{row.key} was measured on {ref.hardware}, not {profile.name}")
    result = None
    if spec.free:
        start = {p.key: parameter_value(profile, p.key) for p in spec.free}
        result = fit_from_starts(
            lambda v: errors_of(fit_rows, with_parameters(profile, v), spec.metric),
            spec.free,
            start,
            log=log,
        )
        profile = with_parameters(profile, result.values)
    return Calibration(
        spec, profile, fit_rows, held_rows, result, errors_of(fit_rows, profile, spec.metric),
        errors_of(held_rows, profile, spec.metric),
    )  # fmt: skip


def table(title: str, rows: Rows, errors: list[float], metric: str | None = None) -> list[str]:
    if not rows:
        return []
    lines = [title, f"{'row':<44} {'metric':<22} {'measured':>10} {'projected':>10} {'error':>7}"]
    for (ref, row), error in zip(rows, errors, strict=True):
        measured = float(row.measured[metric or ref.metric])
        lines.append(
            f"{row.key:<44.44} {metric or ref.metric:<22} {measured:>10.4g} "
            f"{measured * (1 + error):>10.4g} {error:>+7.1%}"
        )
    if errors:
        magnitudes = [abs(e) for e in errors]
        lines.append(
            f"largest error {max(magnitudes):.1%}, mean {sum(magnitudes) / len(magnitudes):.1%}"
        )
    return lines


def report(cal: Calibration) -> list[str]:
    spec = cal.spec
    lines = [f"calibration {spec.name}: profile {spec.profile}"]
    if cal.result is not None:
        fitted = ", ".join(f"{k} = {v:.4g}" for k, v in cal.result.values.items())
        lines.append(f"fitted ({cal.result.evaluations} evaluations): {fitted}")
    else:
        lines.append("nothing fitted: the profile's numbers as shipped")
    if not cal.fit_rows:
        lines.append("a check only: no rows fitted on, every row below is compared as shipped")
    lines += table(
        f"in-sample: {', '.join(spec.fit_on)} (bound {spec.bounds['fit_on']:.0%})",
        cal.fit_rows,
        cal.fit_errors,
        spec.metric,
    )
    if cal.held_rows:
        lines += table(
            f"held out: {', '.join(spec.held_out)} (bound {spec.bounds['held_out']:.0%})",
            cal.held_rows, cal.held_errors, spec.metric,
        )  # fmt: skip
    return lines


def _replace_number(text: str, section: str, key: str, value: float) -> str:
    """`key: number` inside `section:` of a profile's YAML text, comments kept."""
    block = re.search(rf"(?m)^{section}:\n((?:[ \t]+.*\n|\n)*)", text)
    if block is None:
        raise ConfigError(f"profile has no {section}: section to write {key} into")
    inner = re.sub(
        rf"(?m)^(\s+{key}:\s*)[-0-9.eE+]+",
        lambda m: f"{m.group(1)}{value:.4g}",
        block.group(1),
        count=1,
    )
    return text[: block.start(1)] + inner + text[block.end(1) :]


def write_profile(cal: Calibration, path: Path | None = None) -> Path:
    """Write the fitted numbers and the calibration entry into the profile's file (inside
    configs/hardware unless `path` is given)."""
    if cal.result is None:
        raise ConfigError(f"{cal.spec.name} fits no parameters: nothing to write (--write)")
    path = path or resolve_profile_path(cal.spec.profile)
    text = path.read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    for key, value in (cal.result.values if cal.result else {}).items():
        parts = key.split(".")
        if parts[0] != "frameworks":
            text = _replace_number(text, parts[0], parts[1], value)
    frameworks = raw.get("frameworks") or {}
    for key, value in (cal.result.values if cal.result else {}).items():
        parts = key.split(".")
        if parts[0] == "frameworks":
            frameworks.setdefault(parts[1], {})[parts[2]] = round(value, 4)
    entries = raw.get("calibration") or {}
    entries[cal.spec.name] = {
        "command": f"civetta fit configs/calibration/{cal.spec.name}.yaml --write",
        "fitted": {k: round(v, 4) for k, v in (cal.result.values if cal.result else {}).items()},
        "fit_on": cal.spec.fit_on,
        "held_out": cal.spec.held_out,
        "in_sample_max_error": round(max(map(abs, cal.fit_errors)), 4),
        "held_out_max_error": round(max(map(abs, cal.held_errors)), 4) if cal.held_errors else None,
        "coverage": coverage(cal.fit_rows + cal.held_rows),
    }
    text = re.sub(r"(?ms)^# ---- written by civetta fit.*\Z", "", text).rstrip() + "\n"
    tail = (
        {"frameworks": frameworks, "calibration": entries}
        if frameworks
        else {"calibration": entries}
    )
    text += "# ---- written by civetta fit (do not edit below: re-run the fits) ----\n"
    text += yaml.safe_dump(tail, sort_keys=False, width=100)
    profile_from_dict(yaml.safe_load(text), origin=str(path))  # what is written loads
    path.write_text(text, encoding="utf-8")
    return path


def fit_command(spec_path: str, write: bool) -> int:
    """Fit (or project) a spec's rows, print the tables, optionally write the profile."""
    spec = load_spec(spec_path)
    cal = calibrate(spec)
    for line in report(cal):
        print(line)
    if write:
        print(f"wrote {write_profile(cal)}")
    return 0
