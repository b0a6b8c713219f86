"""`civetta calibrate`: the fits recover known parameters from synthetic timings, the written
profile passes the schema validator, the shipped `local` profile loads, and the measuring
processes speak their protocol. No timing is asserted."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from civetta.models.gpt import GPTConfig
from launch.calibrate import (
    build_profile,
    header,
    measure_compute,
    run_comm,
    run_oversubscribed,
    write_profile,
)
from launch.profiles import load_profile, profile_from_dict
from parallel.cost import calibration as cal
from parallel.cost.collectives import GroupLink
from parallel.cost.hardware import HardwareProfile
from parallel.cost.projection import Workload, optimizer_time

REPO = Path(__file__).resolve().parent.parent
A100 = load_profile("a100-dgx")


def _gemm_samples(
    rate: float, overhead: float, memory: float, dtype: str = "float32"
) -> list[cal.GemmSample]:
    samples = []
    for batch, m, k, n in cal.gemm_shapes(quick=False):
        probe = cal.GemmSample(m, k, n, dtype, 1.0, batch)
        seconds = max(probe.flops / rate, probe.nbytes() / memory) + overhead
        samples.append(dataclasses.replace(probe, seconds=seconds))
    return samples


def test_gemm_fit_recovers_rate_and_overhead() -> None:
    samples = _gemm_samples(rate=80e9, overhead=2e-6, memory=20e9)
    fit = cal.fit_gemm(samples, 20e9)
    assert fit.rate_flops == pytest.approx(80e9, rel=0.01)
    assert fit.overhead_s == pytest.approx(2e-6, rel=0.02)
    assert fit.max_error < 0.01
    # Given the overhead, only the rate is fitted (dgemm shares sgemm's overhead).
    assert cal.fit_gemm(samples, 20e9, overhead_s=2e-6).rate_flops == pytest.approx(80e9, 0.01)


def test_a_slowed_timing_does_not_drag_the_fit() -> None:
    samples = _gemm_samples(rate=80e9, overhead=2e-6, memory=20e9)
    samples[5] = dataclasses.replace(samples[5], seconds=samples[5].seconds * 3)  # a busy moment
    assert cal.fit_gemm(samples, 20e9).rate_flops == pytest.approx(80e9, rel=0.03)


def _collective_samples(latency: float, bandwidth: float) -> dict[str, list[tuple[int, float]]]:
    link = GroupLink("dp", 2, False, 2, "test", latency, bandwidth)
    return {
        op: [(size, cal.collective_time(op, size, link)) for size in cal.message_sizes()]
        for op in cal.COLLECTIVES
    }


def test_link_fit_recovers_latency_and_bandwidth() -> None:
    fit = cal.fit_link(_collective_samples(3e-6, 6e9), group_size=2)
    assert fit.latency_s == pytest.approx(3e-6, rel=0.05)
    assert fit.bytes_per_s == pytest.approx(6e9, rel=0.05)
    assert fit.max_error < 0.05


def test_elementwise_fit_recovers_the_engine_numbers() -> None:
    """Synthetic engine timings made by the cost model itself from known numbers."""
    device = dataclasses.replace(
        A100.device,
        peak_tflops={"float32": 0.1},
        elementwise_traffic=6.0,
        layer_overhead_us=300.0,
        backward_elementwise_ratio=0.8,
        memory_bandwidth_gbs=25,
        memory_efficiency=1.0,
    )
    truth = dataclasses.replace(A100, device=device)
    samples = []
    for config, batch in cal.engine_models():
        forward, backward = cal.engine_times(config, batch, truth)
        samples.append(cal.EngineSample(config, batch, forward, backward))
    fit = cal.fit_elementwise(samples, truth)
    assert fit.traffic == pytest.approx(6.0, rel=1e-6)
    assert fit.layer_overhead_s == pytest.approx(300e-6, rel=1e-6)
    assert fit.backward_ratio == pytest.approx(0.8, rel=1e-6)
    assert fit.max_error < 1e-9


def _optimizer_samples(profile: HardwareProfile) -> list[cal.OptimizerSample]:
    """Synthetic optimizer timings made by the cost model itself from `profile`."""
    work = Workload(dtype="float32", optimizer="adamw")
    return [
        cal.OptimizerSample(n, e, optimizer_time(n * e, n, work, profile))
        for n, e in cal.optimizer_shapes()
    ]


def test_optimizer_fit_recovers_traffic_and_overhead_per_tensor() -> None:
    device = dataclasses.replace(A100.device, optimizer_traffic=3.5, optimizer_overhead_us=12.0)
    truth = dataclasses.replace(A100, device=device)
    fit = cal.fit_optimizer(_optimizer_samples(truth), A100)
    assert fit.traffic == pytest.approx(3.5, rel=1e-6)
    assert fit.overhead_s == pytest.approx(12e-6, rel=1e-6)
    assert fit.max_error < 1e-9


def test_the_optimizer_measurement_times_every_shape() -> None:
    samples = cal.measure_optimizer([(3, 16), (1, 64)], repeats=1)
    assert [(s.tensors, s.elements) for s in samples] == [(3, 16), (1, 64)]
    assert all(s.seconds > 0 and math.isfinite(s.seconds) for s in samples)


def _measurements() -> tuple[dict, dict]:
    gemms = {
        dtype: [dataclasses.asdict(s) for s in _gemm_samples(rate, 1e-6, 30e9, dtype)]
        for dtype, rate in (("float32", 100e9), ("float64", 50e9))
    }
    device = dataclasses.replace(
        A100.device, peak_tflops={"float32": 0.1}, elementwise_traffic=8.0,
        layer_overhead_us=250.0, backward_elementwise_ratio=0.7, memory_bandwidth_gbs=30,
        memory_efficiency=1.0, gemm_max_efficiency=1.0, kernel_overhead_us=1.0,
    )  # fmt: skip
    truth = dataclasses.replace(A100, device=device)
    engine = []
    for config, batch in cal.engine_models():
        forward, backward = cal.engine_times(config, batch, truth)
        row = {"config": dataclasses.asdict(config), "batch": batch}
        engine.append({**row, "forward_s": forward, "backward_s": backward})
    fused = dataclasses.replace(device, optimizer_traffic=4.0, optimizer_overhead_us=9.0)
    steps = _optimizer_samples(dataclasses.replace(truth, device=fused))
    compute = {
        "bandwidth": {"copy_gbs": 25.0, "add_gbs": 30.0},
        "gemms": gemms,
        "engine": engine,
        "optimizer": [dataclasses.asdict(s) for s in steps],
    }
    samples = _collective_samples(4e-6, 5e9)
    comm = {"ranks": 2, "samples": samples, "rank_rss_bytes": 120 << 20, "mpi": "MPICH 5.0.2"}
    return compute, comm


def test_the_written_profile_is_valid_and_reloads(tmp_path: Path) -> None:
    compute, comm = _measurements()
    raw, report = build_profile(compute, comm, cores=4, memory_bytes=32 << 30)
    path = tmp_path / "local.yaml"
    write_profile(path, raw, header(report, quick=True, load=(0.1, 0.2, 0.3)))
    text = path.read_text()
    assert text.startswith("# This machine as a hardware profile")
    assert "civetta calibrate --quick" in text and "MACHINE-SPECIFIC" in text
    profile = load_profile(path)
    assert profile.name == "local" and profile.price_per_gpu_hour == 0
    assert profile.gpus_per_node == 4 and profile.device.memory_gib == 8
    d = profile.device
    assert d.peak_flops("float32") * d.gemm_max_efficiency == pytest.approx(100e9, rel=0.02)
    assert d.peak_flops("float64") * d.gemm_max_efficiency == pytest.approx(50e9, rel=0.02)
    assert d.kernel_overhead_us == pytest.approx(1.0, rel=0.05)
    assert d.elementwise_traffic == pytest.approx(8.0, rel=0.02)
    assert d.layer_overhead_us == pytest.approx(250.0, rel=0.02)
    assert d.backward_elementwise_ratio == pytest.approx(0.7, rel=0.02)
    assert d.optimizer_traffic == pytest.approx(4.0, rel=0.02)
    assert d.optimizer_overhead_us == pytest.approx(9.0, rel=0.02)
    assert profile.intra_node.latency_us == pytest.approx(4.0, rel=0.05)
    assert profile.intra_node.bandwidth_gbs == pytest.approx(5.0, rel=0.05)
    assert profile.inter_node.bandwidth_gbs == profile.intra_node.bandwidth_gbs


def test_the_shipped_local_profile_loads() -> None:
    path = REPO / "configs" / "hardware" / "local.yaml"
    text = path.read_text()
    assert "civetta calibrate" in text.splitlines()[1]  # says when and how it was produced
    profile = load_profile("local")
    assert profile.name == "local" and profile.price_per_gpu_hour == 0
    for dtype in ("float32", "float64", "bf16", "fp16"):
        assert profile.device.peak_flops(dtype) > 0
    assert profile.device.layer_overhead_us >= 0


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("layer_overhead_us", -1, r"^device\.layer_overhead_us expected a number >= 0, "),
        ("backward_elementwise_ratio", 0, r"^device\.backward_elementwise_ratio expected a"),
        ("layer_overhead_us", "fast", r"^device\.layer_overhead_us expected a number, got"),
        ("layer_overheads_us", 1, r"did you mean 'device\.layer_overhead_us'"),
        ("optimizer_traffic", 0, r"^device\.optimizer_traffic expected a number > 0, "),
        ("optimizer_overhead_us", -2, r"^device\.optimizer_overhead_us expected a number"),
    ],
)
def test_new_profile_fields_are_validated(key: str, value: object, message: str) -> None:
    raw = yaml.safe_load((REPO / "configs/hardware/a100-dgx.yaml").read_text())
    raw["device"][key] = value
    with pytest.raises(ValueError, match=message) as info:
        profile_from_dict(raw)
    assert "\n" not in str(info.value)


def test_the_compute_measurement_runs_quickly_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compute process's protocol, on tiny inputs (no timing is checked)."""
    monkeypatch.setattr(cal, "gemm_shapes", lambda quick: [(1, 8, 8, 8), (2, 4, 4, 4)])
    small = GPTConfig(vocab_size=256, block_size=8, n_layer=1, n_head=2, n_embd=8)
    monkeypatch.setattr(cal, "engine_models", lambda quick: [(small, 2)])
    monkeypatch.setattr(cal, "measure_bandwidth", lambda nbytes: {"copy_gbs": 1.0, "add_gbs": 1.0})
    monkeypatch.setattr(cal, "optimizer_shapes", lambda quick: [(2, 8)])
    result = measure_compute(quick=True)
    assert set(result) == {"bandwidth", "gemms", "engine", "optimizer", "chunks"}
    assert set(result["chunks"]) == {str(g) for g in cal.CHUNKS}
    assert result["optimizer"][0]["tensors"] == 2
    assert len(result["gemms"]["float32"]) == 2 and result["engine"][0]["forward_s"] > 0


def test_the_comm_measurement_runs_under_mpiexec() -> None:
    comm = run_comm(quick=True)
    assert comm["ranks"] == 2 and set(comm["samples"]) == set(cal.COLLECTIVES)
    for rows in comm["samples"].values():
        assert [size for size, _ in rows] == cal.message_sizes(quick=True)
        assert all(seconds > 0 and math.isfinite(seconds) for _, seconds in rows)


def test_the_oversubscribed_measurement_runs_under_mpiexec() -> None:
    """Twice as many ranks as this machine has cores (at least 2) run chunks and all-reduces."""
    ranks = 4
    over = run_oversubscribed(quick=True, ranks=ranks)
    assert over["ranks"] == ranks
    loops = [tuple(row) for row in over["loops"]]
    assert [(g, b) for g, b, _ in loops] == [
        (g, max(ranks, b // 4 // ranks * ranks) * 4) for g in cal.CHUNKS for b in cal.LOOP_BYTES
    ]
    assert all(seconds > 0 and math.isfinite(seconds) for _, _, seconds in loops)


def test_the_written_profile_says_how_more_ranks_share_the_cores(tmp_path: Path) -> None:
    compute, comm = _measurements()
    chunks = {2: 1.5e-3, 8: 5.5e-3}
    compute["chunks"] = {str(g): t for g, t in chunks.items()}
    link = GroupLink("dp", 8, False, 8, "", 50e-6, 2e9)
    loops = [
        (g, b, 2 * 1.2 * t + cal.collective_time("all_reduce", b, link))
        for g, t in chunks.items()
        for b in cal.LOOP_BYTES
    ]
    raw, report = build_profile(compute, comm, 4, 32 << 30, {"ranks": 8, "loops": loops})
    path = tmp_path / "local.yaml"
    write_profile(path, raw, header(report, quick=False, load=(0.1, 0.2, 0.3)))
    assert "8 ranks on" in path.read_text()
    over = load_profile(path).oversubscribed
    assert over is not None and over.ranks == 8
    assert over.compute_stretch == pytest.approx(1.2, rel=0.02)
    assert over.latency_us == pytest.approx(50.0, rel=0.05)
    assert over.bandwidth_gbs == pytest.approx(2.0, rel=0.05)
