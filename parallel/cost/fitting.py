"""Fitting a profile's free numbers to published measurements, reproducibly.

The parameters are dotted keys of a hardware profile (`device.gemm_max_efficiency`,
`intra_node.efficiency`) or of a framework's calibrated behaviour on it
(`frameworks.deepspeed.collective_latency_us`), each searched within stated bounds. The
objective is the largest relative error over the rows plus a quarter of the mean: the tests
assert the largest, and the mean breaks ties between fits of equal worst rows. The search is a
deterministic pattern search (each parameter stepped up and down in turn, the step halved when
nothing improves), which needs no derivatives — a projection is piecewise in its numbers — and
gives the same result on every machine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from parallel.cost.hardware import HardwareProfile

SECTIONS = ("device", "intra_node", "inter_node")


@dataclass(frozen=True)
class FreeParameter:
    key: str  # dotted: device.x, intra_node.x, inter_node.x, frameworks.<preset>.x
    low: float
    high: float


def parameter_value(profile: HardwareProfile, key: str) -> float:
    parts = key.split(".")
    if parts[0] == "frameworks":
        return float(profile.frameworks.get(parts[1], {}).get(parts[2], 0.0))
    return float(getattr(getattr(profile, parts[0]), parts[1]))


def with_parameters(profile: HardwareProfile, values: dict[str, float]) -> HardwareProfile:
    """`profile` with the dotted keys set (a new profile; the one given is unchanged)."""
    for key, value in values.items():
        parts = key.split(".")
        if parts[0] == "frameworks":
            frameworks = {k: dict(v) for k, v in profile.frameworks.items()}
            frameworks.setdefault(parts[1], {})[parts[2]] = value
            profile = dataclasses.replace(profile, frameworks=frameworks)
        elif parts[0] in SECTIONS and len(parts) == 2:
            section = dataclasses.replace(getattr(profile, parts[0]), **{parts[1]: value})
            profile = dataclasses.replace(profile, **{parts[0]: section})
        else:
            raise ValueError(f"cannot fit {key!r}: expected device.*, intra_node.*, inter_node.* "
                             "or frameworks.<preset>.*")  # fmt: skip
    return profile


def objective(errors: Sequence[float]) -> float:
    magnitudes = [abs(e) for e in errors]
    return max(magnitudes) + 0.25 * sum(magnitudes) / len(magnitudes)


@dataclass
class FitResult:
    values: dict[str, float]
    errors: list[float]  # relative, per row, at the fitted values
    evaluations: int

    @property
    def max_error(self) -> float:
        return max(abs(e) for e in self.errors)

    @property
    def mean_error(self) -> float:
        return sum(abs(e) for e in self.errors) / len(self.errors)


def fit_from_starts(
    errors_at: Callable[[dict[str, float]], list[float]],
    free: Sequence[FreeParameter],
    start: dict[str, float],
    log: Callable[[str], Any] | None = None,
) -> FitResult:
    """`fit` from the given start and from the middle of each quarter of the box (a pattern
    search finds the nearest basin; the numbers trade off, so several starts find the best).
    The best objective wins; the evaluations of every start are counted."""
    starts = [start] + [
        {p.key: p.low + (p.high - p.low) * share for p in free} for share in (0.25, 0.5, 0.75)
    ]
    results = [fit(errors_at, free, s, log=log) for s in starts]
    best = min(results, key=lambda r: objective(r.errors))
    best.evaluations = sum(r.evaluations for r in results)
    return best


def fit(
    errors_at: Callable[[dict[str, float]], list[float]],
    free: Sequence[FreeParameter],
    start: dict[str, float],
    min_step: float = 1 / 256,
    max_evaluations: int = 400,
    log: Callable[[str], Any] | None = None,
) -> FitResult:
    """Minimise `objective(errors_at(values))` over `free`, from `start` (clipped into the
    bounds). Steps are fractions of each parameter's range, from 1/8 down to `min_step`."""
    position = {p.key: min(max(start[p.key], p.low), p.high) for p in free}
    seen: dict[tuple[float, ...], list[float]] = {}

    def evaluate(values: dict[str, float]) -> float:
        key = tuple(round(values[p.key], 12) for p in free)
        if key not in seen:
            seen[key] = errors_at(values)
        return objective(seen[key])

    best = evaluate(position)
    step = 1 / 8
    while step >= min_step and len(seen) < max_evaluations:
        improved = False
        for p in free:
            for sign in (1, -1):
                trial = dict(position)
                span = p.high - p.low
                trial[p.key] = min(max(position[p.key] + sign * step * span, p.low), p.high)
                if trial[p.key] == position[p.key]:
                    continue
                score = evaluate(trial)
                if score < best - 1e-12:
                    position, best, improved = trial, score, True
                    break
        if log is not None:
            log(f"step {step:.4f}: objective {best:.4f} at {position}")
        if not improved:
            step /= 2
    key = tuple(round(position[p.key], 12) for p in free)
    return FitResult(position, seen[key], len(seen))
