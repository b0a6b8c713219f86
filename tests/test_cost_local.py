"""The cost model's terms for civetta on a CPU (the `local` profile): more ranks than cores, the
optimizer step's per-tensor cost, and their calibration from synthetic timings. No wall-clock
time is asserted: predicted against measured is benchmarks/bench_cost_local.py."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from civetta.models.gpt import GPTConfig
from launch.profiles import PROFILE_DIR, load_profile, profile_from_dict
from parallel.cost import calibration as cal
from parallel.cost.collectives import GroupLink
from parallel.cost.hardware import CostModelError, HardwareProfile, Oversubscription
from parallel.cost.projection import CIVETTA_EXECUTOR, Workload, optimizer_time, project
from parallel.cost.stages import StagedModel
from parallel.layout import Layout

A100 = load_profile("a100-dgx")
CONFIG = GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=4, n_embd=64)
OVER = Oversubscription(ranks=4, compute_stretch=1.25, latency_us=40.0, bandwidth_gbs=2.0)


def machine(over: Oversubscription | None = OVER, cores: int = 2) -> HardwareProfile:
    """A two-core machine in the shape `civetta calibrate` writes."""
    device = dataclasses.replace(
        A100.device, optimizer_traffic=2.0, optimizer_overhead_us=10.0, layer_overhead_us=200.0
    )
    return dataclasses.replace(A100, device=device, gpus_per_node=cores, oversubscribed=over)


def test_as_many_ranks_as_cores_see_the_machine_unchanged() -> None:
    profile = machine()
    assert profile.for_ranks(1) is profile and profile.for_ranks(2) is profile
    assert machine(over=None).for_ranks(8) == machine(over=None)  # GPUs: nothing is shared


def test_more_ranks_than_cores_share_them() -> None:
    profile = machine()
    shared = profile.for_ranks(4)
    slow = 4 / 2 * OVER.compute_stretch
    d, s = profile.device, shared.device
    assert s.peak_tflops["bf16"] == pytest.approx(d.peak_tflops["bf16"] / slow)
    assert s.memory_bandwidth_gbs == pytest.approx(d.memory_bandwidth_gbs / slow)
    assert s.kernel_overhead_us == pytest.approx(d.kernel_overhead_us * slow)
    assert s.layer_overhead_us == pytest.approx(d.layer_overhead_us * slow)
    assert s.optimizer_overhead_us == pytest.approx(d.optimizer_overhead_us * slow)
    assert s.memory_gib == pytest.approx(d.memory_gib / 2)  # the machine's memory, 4 ways
    assert shared.gpus_per_node == 4  # still one machine: no link crosses a "node"
    for link in (shared.intra_node, shared.inter_node):
        assert (link.latency_us, link.bandwidth_gbs, link.efficiency) == (40.0, 2.0, 1.0)


def test_an_oversubscribed_projection_stretches_compute_not_mfu_peak() -> None:
    layout, fp32 = Layout(dp=4, microbatch_size=2), Workload("float32")
    shared = project(CONFIG, layout, machine(), CIVETTA_EXECUTOR, fp32)
    # The same 4 ranks on a machine with 4 cores: every compute time is `slow` times shorter.
    roomy = project(CONFIG, layout, machine(cores=4, over=None), CIVETTA_EXECUTOR, fp32)
    slow = 4 / 2 * OVER.compute_stretch
    assert shared.breakdown_s["compute"] == pytest.approx(slow * roomy.breakdown_s["compute"])
    # MFU stays relative to one core's peak: the shared run uses less of it.
    peak = A100.device.peak_flops("float32")
    assert shared.mfu == pytest.approx(
        shared.model_flops_per_step / (4 * shared.step_time_s * peak)
    )
    assert shared.mfu < roomy.mfu


def test_the_optimizer_pays_per_tensor_and_per_byte() -> None:
    profile, work = machine(), Workload(dtype="float32", optimizer="adamw")
    params = StagedModel(CONFIG, Layout(), "float32", CONFIG.block_size).device_params(0)
    tensors, elements = len(params), sum(x.elements for x in params)
    fused = dataclasses.replace(profile.device, optimizer_traffic=1.0, optimizer_overhead_us=0.0)
    sweep = optimizer_time(elements, tensors, work, dataclasses.replace(profile, device=fused))
    assert sweep == pytest.approx(elements * (4 + 2 * 8 + 2 * 4) / fused.hbm_bytes_per_s)
    expected = 2.0 * sweep + tensors * 10e-6
    assert optimizer_time(elements, tensors, work, profile) == pytest.approx(expected)
    projected = project(CONFIG, Layout(microbatch_size=2), profile, work=work)
    assert projected.breakdown_s["optimizer"] == pytest.approx(expected)


def test_oversubscription_fit_recovers_stretch_latency_and_bandwidth() -> None:
    chunks = {2: 1.5e-3, 8: 5.5e-3}
    link = GroupLink("dp", 4, False, 4, "", 30e-6, 3e9)
    loops = [
        (g, b, 2 * 1.1 * t + cal.collective_time("all_reduce", b, link))
        for g, t in chunks.items()
        for b in cal.LOOP_BYTES
    ]
    fit = cal.fit_oversubscription(loops, chunks, ranks=4, cores=2)
    assert fit.compute_stretch == pytest.approx(1.1, rel=0.01)
    assert fit.latency_s == pytest.approx(30e-6, rel=0.05)
    assert fit.bytes_per_s == pytest.approx(3e9, rel=0.05)
    assert fit.max_error < 0.01


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"ranks": 2}, r"^oversubscribed\.ranks expected an integer above gpus_per_node"),
        ({"compute_stretch": 0}, r"^oversubscribed\.compute_stretch expected a number > 0"),
        ({"latency": 3}, r"did you mean 'oversubscribed\.latency_us'"),
    ],
)
def test_bad_oversubscription_sections_are_one_line(edit: dict, message: str) -> None:
    raw = yaml.safe_load((PROFILE_DIR / "a100-dgx.yaml").read_text())
    raw["gpus_per_node"] = 2
    section = {"ranks": 4, "compute_stretch": 1.1, "latency_us": 30.0, "bandwidth_gbs": 3.0}
    raw["oversubscribed"] = {**section, **edit}
    if "latency" in edit:
        del raw["oversubscribed"]["latency_us"]
    with pytest.raises(CostModelError, match=message) as info:
        profile_from_dict(raw)
    assert "\n" not in str(info.value)


def test_sharing_cores_never_makes_a_collective_faster_than_the_machines_link() -> None:
    chunks = {2: 1.5e-3, 8: 5.5e-3}
    fast = GroupLink("dp", 4, False, 4, "", 1e-6, 50e9)  # a fit that would go below the link
    loops = [
        (g, b, 2 * 1.1 * t + cal.collective_time("all_reduce", b, fast))
        for g, t in chunks.items()
        for b in cal.LOOP_BYTES
    ]
    link = cal.LinkFit(latency_s=10e-6, bytes_per_s=5e9, rms_log_error=0.0, max_error=0.0)
    fit = cal.fit_oversubscription(loops, chunks, ranks=4, cores=2, link=link)
    assert fit.latency_s >= 10e-6 and fit.bytes_per_s <= 5e9
    assert fit.compute_stretch == pytest.approx(1.1, rel=0.05)


def test_ranks_idle_in_a_pipeline_bubble_leave_their_core_to_the_others() -> None:
    profile, config = machine(), dataclasses.replace(CONFIG, n_layer=4)
    layout, fp32 = Layout(pp=4, microbatch_size=1, microbatches=8), Workload("float32")
    # The same projection on the profiles each rank sees: all sharing, or each on its own core.
    shared = project(config, layout, profile.for_ranks(4), CIVETTA_EXECUTOR, fp32)
    own = project(config, layout, profile.for_ranks(4, own_cores=True), CIVETTA_EXECUTOR, fp32)
    result = project(config, layout, profile, CIVETTA_EXECUTOR, fp32)
    busy = shared.step_time_s - shared.breakdown_s["bubble"]
    assert shared.breakdown_s["bubble"] > 0
    assert result.step_time_s == pytest.approx(max(busy, own.step_time_s))
    assert own.step_time_s < result.step_time_s < shared.step_time_s
    assert result.breakdown_s["bubble"] == pytest.approx(result.step_time_s - busy)
    peak = profile.device.peak_flops("float32")  # a core's own, not its share
    assert result.mfu == pytest.approx(
        result.model_flops_per_step / (4 * result.step_time_s * peak)
    )
