"""Reading hardware profiles: `configs/hardware/*.yaml` validated into the cost model's frozen
dataclasses (`parallel.cost.hardware`), by shipped name or by path.

The cost model never reads files; whoever needs a profile loads it here and passes it in. A bad
file or value is one `CostModelError` line naming the key, what was expected and what was given
(the CLI commands turn it into a `ConfigError`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from launch.schema import Check, Schema, describe
from parallel.cost.framework import PRESETS, FrameworkError, framework_from
from parallel.cost.hardware import DTYPES, CostModelError, HardwareProfile, Oversubscription

PROFILE_DIR = Path(__file__).resolve().parents[1] / "configs" / "hardware"


def bare(exc: Exception) -> str:
    """A cost-model error's message for a launch error to wrap, without the "error: " that the
    CLI adds (`HardwareProfile.peak_flops` in `parallel.cost.hardware` still writes one)."""
    return str(exc).removeprefix("error: ")


def _name(what: str) -> Check:
    """A check for a non-empty name; `what` says which kind in its error."""

    def check(key: str, value: Any) -> str:
        if not isinstance(value, str) or not value:
            PROFILE.fail(f"{key} expected {what}, got {describe(value)}")
        return value

    return check


def _gpus(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        PROFILE.fail(f"{key} expected a positive integer, got {value!r}")
    return value


def _peaks(key: str, value: Any) -> dict[str, float]:
    if not isinstance(value, dict) or not value:
        PROFILE.fail(f"{key} expected a mapping of dtype to TFLOP/s, got {describe(value)}")
    for dtype in value:
        if dtype not in DTYPES:
            PROFILE.fail(f"{key}.{dtype} is not a dtype (expected one of {' | '.join(DTYPES)})")
    return {dtype: PROFILE.value(f"{key}.{dtype}", v, float) for dtype, v in value.items()}


FRACTIONS = (
    "device.memory_efficiency",
    "device.gemm_max_efficiency",
    "intra_node.efficiency",
    "inter_node.efficiency",
)
PROFILE = Schema(
    CostModelError,
    positive={
        *(f"device.peak_tflops.{dtype}" for dtype in DTYPES),
        "device.memory_gib",
        "device.memory_bandwidth_gbs",
        "device.backward_elementwise_ratio",
        "device.optimizer_traffic",
        *FRACTIONS,
        "intra_node.bandwidth_gbs",
        "inter_node.bandwidth_gbs",
        "oversubscribed.compute_stretch",
        "oversubscribed.bandwidth_gbs",
        "board_power_w",
        "pue",
    },
    non_negative={
        "device.kernel_overhead_us",
        "device.elementwise_traffic",
        "device.memory_reserved_gib",
        "device.layer_overhead_us",
        "device.optimizer_overhead_us",
        "intra_node.latency_us",
        "inter_node.latency_us",
        "oversubscribed.latency_us",
        "price_per_gpu_hour",
    },
    at_most=dict.fromkeys(FRACTIONS, 1.0),
    checks={
        "name": _name("a profile name"),
        "source": lambda key, value: str(value or ""),
        "gpus_per_node": _gpus,
        "device.name": _name("a name"),
        "device.peak_tflops": _peaks,
        "intra_node.name": _name("a name"),
        "inter_node.name": _name("a name"),
        # A null section is refused, where `Oversubscription | None` alone would read it as none.
        "oversubscribed": lambda key, value: PROFILE.build(Oversubscription, value, f"{key}."),
        # Checked against gpus_per_node once the whole profile is read (`profile_from_dict`).
        "oversubscribed.ranks": lambda key, value: value,
    },
    # A file may leave out its price (free); a missing name, GPU count or peaks reads as the
    # null it lacks, as their messages always have.
    absent={
        "price_per_gpu_hour": 0.0,
        "name": None,
        "gpus_per_node": None,
        "device.peak_tflops": None,
    },
    unknown_in=" in hardware profile",
    missing="hardware profile is missing '{key}'",
    type_names={"float": "a number"},
    null=None,
    positive_words="a number > 0",
    quote_converted=False,
)


def profile_from_dict(raw: Any, origin: str = "hardware profile") -> HardwareProfile:
    """Validate a parsed YAML mapping into a HardwareProfile."""
    extras = {}
    if isinstance(raw, dict):  # free-form sections, checked here rather than by the schema
        raw = dict(raw)
        extras = {key: raw.pop(key) for key in ("frameworks", "calibration") if key in raw}
    profile = PROFILE.build(HardwareProfile, raw, origin=origin)
    if extras:
        profile = dataclasses.replace(profile, **_checked_extras(extras))
    device = profile.device
    if device.memory_reserved_gib >= device.memory_gib:
        PROFILE.fail(
            f"device.memory_reserved_gib={device.memory_reserved_gib} leaves no memory "
            f"of device.memory_gib={device.memory_gib}"
        )
    # A PUE is facility power over IT power: 1 at best, never below.
    if profile.pue is not None and profile.pue < 1:
        PROFILE.fail(f"pue expected a number >= 1 (facility over IT power), got {profile.pue:g}")
    # Energy needs both; one alone is a half-finished profile, not an unknown.
    if (profile.board_power_w is None) != (profile.pue is None):
        given, lacking = "board_power_w", "pue"
        if profile.board_power_w is None:
            given, lacking = lacking, given
        PROFILE.fail(f"{lacking} is missing: the profile gives {given}, and energy needs both")
    over, gpus = profile.oversubscribed, profile.gpus_per_node
    if over is not None:
        ranks = over.ranks
        if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks <= gpus:
            PROFILE.fail(
                f"oversubscribed.ranks expected an integer above gpus_per_node={gpus}, "
                f"got {ranks!r}"
            )
    return profile


def _checked_extras(extras: dict[str, Any]) -> dict[str, Any]:
    frameworks = extras.get("frameworks", {}) or {}
    if not isinstance(frameworks, dict):
        PROFILE.fail(f"frameworks expected a mapping of preset: {{key: value}}, got {frameworks!r}")
    for preset, overrides in frameworks.items():
        if not isinstance(overrides, dict):
            PROFILE.fail(f"frameworks.{preset} expected a mapping of keys, got {overrides!r}")
        try:
            framework_from(preset, overrides, PRESETS["generic"])
        except FrameworkError as exc:
            PROFILE.fail(f"frameworks.{preset}: {exc}")
    calibration = extras.get("calibration", {}) or {}
    if not isinstance(calibration, dict):
        PROFILE.fail(f"calibration expected a mapping, got {calibration!r}")
    return {"frameworks": frameworks, "calibration": calibration}


def shipped_file(name_or_path: str | Path, directory: Path) -> tuple[Path | None, list[str]]:
    """(the YAML file `name_or_path` names: a path, or a name shipped in `directory`; or None,
    with the names shipped there)."""
    path = Path(name_or_path)
    if path.is_file():
        return path, []
    shipped = directory / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped, []
    return None, sorted(p.stem for p in directory.glob("*.yaml"))


def resolve_profile_path(name_or_path: str | Path) -> Path:
    """A path to a YAML file, or the name of a shipped profile (`a100-dgx`)."""
    path, known = shipped_file(name_or_path, PROFILE_DIR)
    if path is not None:
        return path
    raise CostModelError(
        f"hardware profile {str(name_or_path)!r} is neither a file nor one of "
        f"{', '.join(known) or '(none shipped)'}"
    )


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """Read and validate a hardware profile by shipped name or by path."""
    path = resolve_profile_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise CostModelError(f"{path}{where}: invalid YAML") from None
    return profile_from_dict(raw, origin=str(path))
