"""What a profile's calibrations cover, and what a layout leaves outside them.

`civetta fit --write` records, per calibration, the frameworks, ZeRO stages, recomputation
modes, sequence parallelism, dtypes and the largest tp, pp, cp and ep of the rows it was fitted
on and checked against. A projection of a layout beyond all of them extrapolates the fitted
numbers; `simulate` and `tune` say so.
"""

from __future__ import annotations

from typing import Any

from parallel.cost.hardware import HardwareProfile


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
    closest one leaves uncovered. A preset with changed keys counts as its preset."""
    framework = framework.removesuffix(" (modified)")
    gaps = [
        outside(e.get("coverage", {}), layout, framework, dtype)
        for e in profile.calibration.values()
    ]
    return min(gaps, key=len, default=["no calibration"])
