"""The `framework:` section: presets, overrides, and what each behaviour changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch.config import ConfigError, load
from launch.profiles import load_profile
from launch.simulate import framework_of, simulate
from parallel.cost.framework import PRESETS

REPO = Path(__file__).resolve().parent.parent
GPT3 = REPO / "configs" / "gpt3-175b.yaml"
A100 = load_profile("a100-dgx")


def test_default_is_generic_on_a_cluster_and_civetta_here() -> None:
    config = load(GPT3)
    assert framework_of(config, A100) == PRESETS["generic"]
    assert framework_of(config, load_profile("local")).name == "civetta"


def test_preset_and_key_from_the_command_line() -> None:
    config = load(GPT3, ["framework=megatron-2021", "framework.overlap_dp=true"])
    fw = framework_of(config, A100)
    assert fw.pp_scatter_gather and fw.overlap_dp and fw.name == "megatron-2021 (modified)"


def test_profile_calibration_applies_to_its_preset() -> None:
    fw = framework_of(load(GPT3, ["framework=deepspeed"]), A100)
    assert fw.collective_latency_us == A100.frameworks["deepspeed"]["collective_latency_us"] > 0
    assert fw.name == "deepspeed"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("framework=fsdp", r"^framework\.preset expected one of generic \| civetta .*got 'fsdp'"),
        ("framework.overlap=true", r"unknown key 'framework\.overlap'"),
        ("framework.zero3_unit=block", r"framework\.zero3_unit expected one of tensor \| op"),
        ("framework.zero3_prefetch=-1", r"framework\.zero3_prefetch"),
    ],
)
def test_bad_framework_input_is_one_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load(GPT3, [override])
    assert "\n" not in str(info.value)


def _zero3(preset: str, *more: str):  # type: ignore[no-untyped-def]
    sets = ["parallel.dp=1536", "parallel.tp=1", "parallel.pp=1", "parallel.zero=3"]
    config = load(GPT3, [*sets, f"framework={preset}", *more])
    return simulate(config, A100)


def test_deepspeed_zero3_waits_for_every_tensor_gather() -> None:
    generic, deepspeed = _zero3("generic"), _zero3("deepspeed")
    # Without prefetch every gather is exposed: at least the bytes' wire time, more than generic.
    assert deepspeed.breakdown_s["dp_exposed"] > 2 * generic.breakdown_s["dp_exposed"]
    # The per-call cost adds up once per tensor collective.
    cheaper = _zero3("deepspeed", "framework.collective_latency_us=0")
    assert cheaper.step_time_s < deepspeed.step_time_s


def test_gathered_units_count_in_memory() -> None:
    layer = _zero3("torchtitan").memory_per_gpu["gathered"]
    op = _zero3("torchtitan", "framework.zero3_unit=op").memory_per_gpu["gathered"]
    deeper = _zero3("torchtitan", "framework.zero3_prefetch=2").memory_per_gpu["gathered"]
    assert layer > op > 0 and deeper > layer
    h = 12288  # a block's whole parameters: 12·h² (+ biases), 2 bytes each gathered, 2 grad
    assert layer == pytest.approx(12 * h * h * (2 * 2 + 2), rel=0.01)


def test_allocator_reserve_is_a_share_of_the_dynamic_memory() -> None:
    pr = _zero3("torchtitan", "framework.allocator_reserve=0.1")
    m = pr.memory_per_gpu
    assert m["reserve"] == pytest.approx(0.1 * (m["activations"] + m["gathered"]), rel=1e-6)


def test_tp_overlap_hides_sequence_parallel_collectives() -> None:
    sets = ["parallel.sequence_parallel=true"]
    plain = simulate(load(GPT3, [*sets, "framework=generic"]), A100)
    hidden = simulate(load(GPT3, [*sets, "framework.overlap_tp=true"]), A100)
    assert hidden.breakdown_s["tp_exposed"] < 0.5 * plain.breakdown_s["tp_exposed"]


def test_flash_attention_keeps_no_scores_and_skips_the_causal_half() -> None:
    sets = ["parallel.recompute=none", "parallel.pp=16", "parallel.dp=6"]
    eager = simulate(load(GPT3, [*sets, "framework.attention=eager"]), A100)
    flash = simulate(load(GPT3, [*sets, "framework.attention=flash"]), A100)
    # per block GPT-3 keeps 2·a·s²·b bytes of probabilities (a = 96/8 heads a tp rank, b = 1)
    heads, s = 96 // 8, 2048
    saved = eager.memory_per_gpu["activations"] - flash.memory_per_gpu["activations"]
    assert saved >= 6 * 2 * heads * s * s  # six blocks a stage, at least the probabilities
    assert flash.model_flops_per_step < eager.model_flops_per_step  # causal tiles skipped
    assert flash.hardware_flops_per_step > flash.model_flops_per_step  # scores recomputed


def test_deepspeed_persistent_tensors_are_not_gathered() -> None:
    # Biases and norms (under 1e5 elements) stay whole: fewer gathered bytes and calls.
    kept = _zero3("deepspeed")
    every = _zero3("deepspeed", "framework.zero3_persistence=0")
    assert kept.comm_bytes["dp"] < every.comm_bytes["dp"]
    assert kept.step_time_s < every.step_time_s


def test_deepspeed_reuse_keeps_the_last_weight_for_its_backward() -> None:
    # The recomputed forward's last weight (4h·h) is not gathered again for its backward in
    # each of the 96 blocks, nor the tied embedding (vocabulary · h) for the head and its
    # backward: one fp16 shard of 1536 each.
    h, vocab = 12288, 51200
    kept = _zero3("deepspeed")
    regathered = _zero3("deepspeed", "framework.zero3_max_reuse=0")
    shard = lambda elements: -(-elements // 1536) * 2  # noqa: E731
    saved = 96 * shard(4 * h * h) + 2 * shard(vocab * h)
    assert regathered.comm_bytes["dp"] - kept.comm_bytes["dp"] == saved


def test_deepspeed_gather_overlaps_the_previous_module() -> None:
    overlapped = _zero3("deepspeed")
    waited = _zero3("deepspeed", "framework.zero3_prefetch=0")
    assert overlapped.breakdown_s["dp_exposed"] < waited.breakdown_s["dp_exposed"]


def test_zero3_network_bandwidth_prices_the_cross_node_collectives() -> None:
    slow = _zero3("deepspeed", "framework.zero3_network_gbs=10")
    fast = _zero3("deepspeed", "framework.zero3_network_gbs=100")
    assert slow.breakdown_s["dp_exposed"] > fast.breakdown_s["dp_exposed"]
    assert slow.comm_bytes == fast.comm_bytes
    # Presets that do not state one keep the group's link.
    assert _zero3("generic", "framework.zero3_network_gbs=0").step_time_s == (
        _zero3("generic").step_time_s
    )
