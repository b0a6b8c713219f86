"""The shipped profiles against the published rows they were fitted on and held out from.

Every calibration spec (`configs/calibration/*.yaml`) is checked as shipped: the in-sample rows
within the spec's bound (at most 5%), and that bound tighter than the best constant guess
would need, so the check can tell a model from a number; each held-out row within its bound,
or, where the model does not reproduce it, a strict expected failure that says why. The fit
itself is checked on a problem with a known answer, and `--write` on a copy of a profile.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml

from launch.fit import (
    CALIBRATION_DIR,
    calibrate,
    errors_of,
    load_spec,
    outside,
    write_profile,
)
from launch.profiles import load_profile, resolve_profile_path
from launch.references import select_rows
from parallel.cost.fitting import FreeParameter, fit, with_parameters

SPECS = sorted(p.stem for p in CALIBRATION_DIR.glob("*.yaml"))
FITTED = [name for name in SPECS if load_spec(CALIBRATION_DIR / f"{name}.yaml").free]

# Held-out rows the model misses, each with the reason as far as it is known. Strict: a row
# that starts passing fails here, so the list stays true.
LLAMA3 = "dubey-2024-llama3-table-4"
TITAN_2024 = "torchtitan-2024-h100-llama3"
TITAN_2025 = "torchtitan-2025-h100-asynctp"
_MISSES = {
    "h100-dgx": {
        f"{LLAMA3}/405B-8192gpu-8k": "Meta's interleaved schedule (its V is not stated) is "
        "projected as 1F1B: 12% too slow",
        f"{LLAMA3}/405B-16384gpu-8k": "16 microbatches a replica under 1F1B leave a 48% bubble "
        "that Meta's interleaved schedule shrinks: 29% too slow",
        f"{LLAMA3}/405B-16384gpu-128k": "131K-token attention priced eager, the whole s x s "
        "product (the presets' kernel; flash is not traced under cp), 1F1B as above: 76% too slow",
        f"{TITAN_2024}/t1-8b-8gpu-fsdp-compile": "torch.compile's fused kernels are not modelled "
        "(the preset is eager): 15% too slow",
        f"{TITAN_2024}/t3-8b-128gpu-fsdp-compile": "as the 8-GPU compiled row: 13% too slow",
        f"{TITAN_2025}/70b-256gpu-bf16-asynctp": "async TP modelled as hiding every "
        "sequence-parallel collective behind the pass's GEMMs: 14% too fast",
        f"{TITAN_2025}/8b-64gpu-bf16-asynctp": "as the 70B async-TP row: 13% too fast",
    },
    "h100-dgx-torchtitan-memory": {
        f"{TITAN_2024}/t3-8b-128gpu-fsdp": "civetta's selective recomputation keeps other "
        "tensors than torchtitan's per-op checkpointing: 14% over",
        f"{TITAN_2024}/t1-8b-8gpu-fsdp-compile": "as the eager rows, and torch.compile's fusions "
        "keep fewer tensors: 18% over",
        f"{TITAN_2024}/t3-8b-128gpu-fsdp-compile": "as the 8-GPU compiled row: 24% over",
    },
}
NOT_REPRODUCED = {
    f"{spec}:{row}": why for spec, rows in _MISSES.items() for row, why in rows.items()
}


def _best_constant_error(values: list[float]) -> float:
    """The largest relative error of the best single guess c for every row (minimax:
    c = 2·lo·hi / (lo + hi))."""
    lo, hi = min(values), max(values)
    c = 2 * lo * hi / (lo + hi)
    return max(abs(c / v - 1) for v in values)


@pytest.fixture(scope="module", params=FITTED)
def shipped(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    spec = load_spec(CALIBRATION_DIR / f"{request.param}.yaml")
    return spec, calibrate(dataclasses.replace(spec, free=[]))


def test_in_sample_rows_within_their_bound(shipped) -> None:  # type: ignore[no-untyped-def]
    spec, cal = shipped
    worst = max(abs(e) for e in cal.fit_errors)
    assert worst <= spec.bounds["fit_on"] <= 0.05, (spec.name, worst)


def test_in_sample_bound_beats_a_constant_guess(shipped) -> None:  # type: ignore[no-untyped-def]
    spec, cal = shipped
    if len(cal.fit_rows) < 2:
        pytest.fail(f"{spec.name} fits on fewer than two rows")
    values = [float(row.measured[ref.metric]) for ref, row in cal.fit_rows]
    assert spec.bounds["fit_on"] < _best_constant_error(values), spec.name


def test_profile_records_what_was_fitted(shipped) -> None:  # type: ignore[no-untyped-def]
    spec, cal = shipped
    entry = cal.profile.calibration[spec.name]
    assert entry["fit_on"] == spec.fit_on and entry["held_out"] == spec.held_out
    assert set(entry["fitted"]) == {p.key for p in spec.free}
    assert entry["in_sample_max_error"] == pytest.approx(max(map(abs, cal.fit_errors)), abs=5e-4)


def _held_out_cases() -> list:
    cases = []
    for name in SPECS:
        spec = load_spec(CALIBRATION_DIR / f"{name}.yaml")
        for _, row in select_rows(spec.held_out):
            marks = []
            key = f"{name}:{row.key}"
            if key in NOT_REPRODUCED:
                marks = [pytest.mark.xfail(strict=True, reason=NOT_REPRODUCED[key])]
            cases.append(pytest.param(name, row.key, marks=marks, id=key))
    return cases


@pytest.mark.parametrize(("spec_name", "row_key"), _held_out_cases())
def test_held_out_row_within_its_bound(spec_name: str, row_key: str) -> None:
    spec = load_spec(CALIBRATION_DIR / f"{spec_name}.yaml")
    rows = select_rows([row_key])
    (error,) = errors_of(rows, load_profile(spec.profile), spec.metric)
    assert abs(error) <= spec.bounds["held_out"], f"{row_key}: {error:+.1%}"


def test_every_not_reproduced_row_is_a_held_out_row() -> None:
    held = set()
    for name in SPECS:
        rows = select_rows(load_spec(CALIBRATION_DIR / f"{name}.yaml").held_out)
        held |= {f"{name}:{row.key}" for _, row in rows}
    assert set(NOT_REPRODUCED) <= held


def test_fit_recovers_known_numbers() -> None:
    """Rows 'measured' at gemm_max_efficiency 0.62 and 12 µs overhead, fitted from elsewhere."""
    rows = select_rows(["narayanan-2021-table-1/1.7B-*", "narayanan-2021-table-1/39.1B-*",
                        "narayanan-2021-table-1/145.6B-*"])  # fmt: skip
    profile = load_profile("a100-dgx")
    truth = {"device.gemm_max_efficiency": 0.62, "device.kernel_overhead_us": 12.0}
    exact = errors_of(rows, with_parameters(profile, truth))
    synthetic = [
        (ref, dataclasses.replace(row, measured={ref.metric: row.measured[ref.metric] * (1 + e)}))
        for (ref, row), e in zip(rows, exact, strict=True)
    ]
    free = [
        FreeParameter("device.gemm_max_efficiency", 0.4, 0.9),
        FreeParameter("device.kernel_overhead_us", 1.0, 40.0),
    ]
    start = {"device.gemm_max_efficiency": 0.8, "device.kernel_overhead_us": 30.0}
    result = fit(lambda v: errors_of(synthetic, with_parameters(profile, v)), free, start)
    assert result.max_error < 0.003
    assert result.values["device.gemm_max_efficiency"] == pytest.approx(0.62, abs=0.01)


def test_write_keeps_comments_and_loads(tmp_path: Path) -> None:
    spec = load_spec(CALIBRATION_DIR / "a100-dgx-deepspeed.yaml")
    cal = calibrate(dataclasses.replace(spec, free=[]))
    cal.result = type("R", (), {"values": {"frameworks.deepspeed.collective_latency_us": 1234.0,
                                           "device.kernel_overhead_us": 9.5}})()  # fmt: skip
    copy = tmp_path / "a100-dgx.yaml"
    shutil.copy(resolve_profile_path("a100-dgx"), copy)
    before = copy.read_text()
    write_profile(cal, copy)
    text = copy.read_text()
    assert text.count("# NVIDIA DGX A100") == 1 and before.splitlines()[0] == text.splitlines()[0]
    written = load_profile(copy)
    assert written.device.kernel_overhead_us == 9.5
    assert written.frameworks["deepspeed"]["collective_latency_us"] == 1234.0
    assert yaml.safe_load(text)["calibration"]["a100-dgx-deepspeed"]["fitted"]


def test_coverage_names_what_a_layout_leaves() -> None:
    profile = load_profile("a100-dgx")
    cover = profile.calibration["a100-dgx"]["coverage"]
    layout = select_rows(["narayanan-2021-table-2-zero3/174.6B-384gpu"])[0][1].config.layout
    found = outside(cover, layout, "deepspeed", "bf16")
    assert found == ["framework deepspeed", "zero=3", "dtype bf16"]
