"""The analytic cost model: closed forms, sanity, link selection, `civetta simulate`, and the
Megatron-LM reproduction (Narayanan et al. 2021, Table 1) on the a100-dgx profile.

The a100-dgx profile's four fitted numbers (GEMM max efficiency, kernel overhead, elementwise
traffic, NVLink efficiency) are global: fitted once against Table 1 as a whole, never per row.
Table 2's PTD-P rows were not used for the fit and are checked as held-out data.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import closed_forms as closed
import pytest
from rich.console import Console

from civetta.models.gpt import GPTConfig
from launch.config import ConfigError
from launch.profiles import load_profile, profile_from_dict
from launch.simulate import simulate_command
from parallel.cost.collectives import all_reduce_time, group_link
from parallel.cost.hardware import CostModelError
from parallel.cost.projection import (
    CostOptions,
    Workload,
    device_memory_of,
    peak_in_flight_layers,
    project,
)
from parallel.cost.replay import (
    REPLAY_LIMIT,
    PipelineTimes,
    StageTimes,
    analytic_bubble,
    analytic_p2p,
    bubble_fraction_analytic,
    bubble_time,
    pipeline_time,
    replayed_makespan,
)
from parallel.cost.stages import StagedModel
from parallel.layout import Layout, LayoutError
from parallel.mesh import MeshLayout

REPO = Path(__file__).resolve().parent.parent
A100 = load_profile("a100-dgx")
SMALL = GPTConfig(vocab_size=512, block_size=128, n_layer=4, n_head=8, n_embd=256)


# ---- FLOPs: the traced projection against the papers' closed forms ------------------------------
def _projected(config: GPTConfig, layout: Layout, dtype: str = "bf16"):
    return project(config, layout, A100, CostOptions(replay=None), Workload(dtype))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tp", [1, 4])
def test_model_flops_are_6n_plus_attention(bias: bool, tp: int) -> None:
    """Per token: 6 × (matmul weights) + 12·L·h·s, the count of GPTConfig.flops_per_token
    (and of the engine's FLOP meter), whatever the tensor-parallel split."""
    c = dataclasses.replace(SMALL, bias=bias)
    L, h, s, V = c.n_layer, c.n_embd, c.block_size, c.vocab_size
    flops = _projected(c, Layout(tp=tp, microbatch_size=3))
    tokens = 3 * s
    assert flops.model_flops_per_step == tokens * (6 * (12 * L * h * h + V * h) + 12 * L * h * s)
    assert flops.model_flops_per_step == tokens * c.flops_per_token()
    assert flops.model_flops_per_step == closed.step_flops(c, 3).model
    assert flops.hardware_flops_per_step == flops.model_flops_per_step  # no recomputation


def test_recompute_adds_a_forward() -> None:
    c, b = SMALL, 5
    s = c.block_size
    none, full, selective = (
        _projected(c, Layout(microbatch_size=b, recompute=r)) for r in ("none", "full", "selective")
    )
    layers_forward = c.n_layer * (24 * b * s * c.n_embd**2 + 4 * b * s * s * c.n_embd)
    assert layers_forward == c.n_layer * closed.layer_forward_flops(c, b, s)
    model = none.model_flops_per_step
    assert full.model_flops_per_step == selective.model_flops_per_step == model
    assert full.hardware_flops_per_step - model == layers_forward  # the head is not recomputed
    assert selective.hardware_flops_per_step - model == c.n_layer * 4 * b * s * s * c.n_embd
    for recompute, projected in (("full", full), ("selective", selective)):
        hardware = closed.step_flops(c, b, recompute=recompute).hardware
        assert projected.hardware_flops_per_step == hardware


def test_megatron_equation_3_is_full_recompute_hardware_flops() -> None:
    c = GPTConfig(vocab_size=51200, block_size=2048, n_layer=96, n_head=96, n_embd=12288)
    layout = Layout(dp=16, tp=8, pp=12, microbatch_size=1, microbatches=96, recompute="full")
    exact = _projected(c, layout).hardware_flops_per_step
    assert closed.megatron_flops(c, 1536) == pytest.approx(exact, rel=1e-12)


# ---- memory -------------------------------------------------------------------------------------
def _params(config: GPTConfig, layout: Layout, device: int = 0) -> int:
    """Parameters the traced model puts on pipeline rank `device`."""
    model = StagedModel(config, layout, "bf16", config.block_size)
    return sum(p.elements for p in model.device_params(device))


@pytest.mark.parametrize("tie", [True, False])
def test_one_device_holds_every_parameter(tie: bool) -> None:
    c = dataclasses.replace(SMALL, tie_embeddings=tie)
    assert _params(c, Layout()) == c.num_parameters() == closed.device_params(c, 1, 1, 0)


@pytest.mark.parametrize(("tp", "pp", "tie"), [(4, 1, True), (2, 2, True), (2, 4, False)])
def test_traced_parameters_are_the_closed_form(tp: int, pp: int, tie: bool) -> None:
    c = dataclasses.replace(SMALL, tie_embeddings=tie)
    layout = Layout(tp=tp, pp=pp)
    for device in range(pp):
        assert _params(c, layout, device) == closed.device_params(c, tp, pp, device)


def test_tensor_parallel_shards_sum_to_the_model() -> None:
    c, tp = SMALL, 4
    h = c.n_embd
    replicated = c.n_layer * (2 * h + 4 * h) + c.block_size * h + 2 * h  # row biases, LNs, wpe
    assert tp * _params(c, Layout(tp=tp)) - (tp - 1) * replicated == c.num_parameters()


def _memory(zero: int, dtype: str = "bf16", optimizer: str = "adamw", dp: int = 4) -> dict:
    work = Workload(dtype, optimizer)
    return device_memory_of(SMALL, Layout(dp=dp, zero=zero), 0, work).as_dict()


def test_mixed_precision_adam_is_16_bytes_per_parameter() -> None:
    n = SMALL.num_parameters()
    mem = _memory(zero=0)
    assert (mem["params"], mem["grads"], mem["optimizer"]) == (2 * n, 2 * n, 12 * n)
    assert mem["params"] + mem["grads"] + mem["optimizer"] == 16 * n
    fp32 = _memory(zero=0, dtype="float32")
    assert (fp32["params"], fp32["grads"], fp32["optimizer"]) == (4 * n, 4 * n, 8 * n)
    assert _memory(zero=0, dtype="float32", optimizer="sgd")["optimizer"] == 0


def test_zero_stages_shard_over_dp() -> None:
    n, dp = SMALL.num_parameters(), 4
    shard = -(-n // dp)  # the parameter count happens to divide evenly or not: ceil is used
    z1, z2, z3 = (_memory(zero=z, dp=dp) for z in (1, 2, 3))
    assert (z1["params"], z1["grads"], z1["optimizer"]) == (2 * n, 2 * n, -(-12 * n // dp))
    assert (z2["params"], z2["grads"], z2["optimizer"]) == (
        2 * n,
        -(-2 * n // dp),
        -(-12 * n // dp),
    )
    assert (z3["params"], z3["grads"]) == (-(-2 * n // dp), -(-2 * n // dp))
    assert z3["params"] + z3["grads"] + z3["optimizer"] <= 16 * shard + 3
    assert z1["activations"] == z2["activations"] == _memory(0)["activations"]


def test_activation_bytes_follow_korthikanti() -> None:
    """Korthikanti et al. 2022, §4.1 and Table 2, for 2-byte activations."""
    c = GPTConfig(vocab_size=51200, block_size=2048, n_layer=4, n_head=32, n_embd=4096)
    s, b, h, a, t = 2048, 2, c.n_embd, c.n_head, 8
    sbh = s * b * h

    def act(**kw: object) -> float:
        return closed.block_activation_bytes(c, b, s, dtype="bf16", **kw)  # type: ignore[arg-type]

    assert act() == sbh * (34 + 5 * a * s / h)
    assert act(tp=t) == sbh * (10 + 24 / t + 5 * a * s / (h * t))
    assert act(tp=t, sequence_parallel=True) == sbh / t * (34 + 5 * a * s / h)
    assert act(tp=t, recompute="selective") == sbh * (10 + 24 / t)
    assert act(tp=t, sequence_parallel=True, recompute="selective") == 34 * sbh / t
    assert act(tp=t, recompute="full") == 2 * sbh
    assert act(tp=t, sequence_parallel=True, recompute="full") == 2 * sbh / t
    # fp32 activations double every tensor but the 1-byte dropout masks
    assert closed.block_activation_bytes(c, b, s, dtype="float32") == sbh * (66 + 9 * a * s / h)


@pytest.mark.parametrize(
    ("p", "m", "schedule", "v"),
    [(1, 16, "1f1b", 1), (4, 16, "1f1b", 1), (4, 16, "zb-h1", 1), (4, 2, "1f1b", 1),
     (4, 16, "gpipe", 1), (4, 16, "interleaved-1f1b", 3)],
)  # fmt: skip
def test_pipeline_first_stage_holds_the_microbatches_in_flight(p, m, schedule, v) -> None:
    """What the projection walks from the schedule equals the closed forms: 1F1B's p microbatches
    of L/p blocks (L: all of them), GPipe's m, interleaving's L·(1 + (p−1)/(p·v))."""
    L = 48
    layout = Layout(pp=p, microbatches=m, schedule=schedule, virtual_stages=v)
    blocks = tuple(len(r) for r in layout.stage_layers(L))
    layers, _ = peak_in_flight_layers(layout, 0, blocks)
    assert layers == closed.in_flight_layers(L, p, m, schedule, v)


# ---- pipeline bubble ----------------------------------------------------------------------------
@pytest.mark.parametrize(("p", "m"), [(2, 4), (4, 8), (8, 64)])
def test_bubble_fractions(p: int, m: int) -> None:
    assert bubble_fraction_analytic("1f1b", p, m) == pytest.approx((p - 1) / (m + p - 1))
    assert bubble_fraction_analytic("gpipe", p, m) == pytest.approx((p - 1) / (m + p - 1))
    v = 2
    frac = bubble_fraction_analytic("interleaved-1f1b", p, m, v)
    assert frac == pytest.approx((p - 1) / (v * m + p - 1))
    # zb-h1 with t_b = 2·t_f split evenly into input and weight gradients: (p - 1)·t_f idle
    assert bubble_fraction_analytic("zb-h1", p, m) == pytest.approx((p - 1) / (3 * m + p - 1))
    assert bubble_fraction_analytic("1f1b", 1, m) == 0.0


def test_bubble_seam_takes_a_replayed_makespan() -> None:
    times = StageTimes(forward_s=1.0, backward_s=2.0, weight_grad_s=1.0)
    calls = []

    def replay(schedule: str, p: int, m: int, v: int, t: PipelineTimes) -> float:
        calls.append((schedule, p, m, v, t))
        return 40.0

    assert bubble_time("1f1b", 4, 8, 1, times, replay) == pytest.approx(40.0 - 8 * 3.0)
    assert calls == [("1f1b", 4, 8, 1, PipelineTimes((times,) * 4))] * 2  # without, with p2p
    assert bubble_time("1f1b", 4, 8, 1, times) == pytest.approx(3 * 3.0)
    layout = Layout(pp=4, microbatches=8)
    replayed = project(SMALL, layout, A100, CostOptions(replay=lambda *a: 10.0))
    busy = replayed.breakdown_s["compute"] + replayed.breakdown_s["tp_exposed"]
    assert replayed.breakdown_s["bubble"] == pytest.approx(10.0 - busy)
    assert replayed.pipeline_model == "replay"
    too_short = project(SMALL, layout, A100, CostOptions(replay=lambda *a: 0.0))
    assert too_short.breakdown_s["bubble"] == 0.0


@pytest.mark.parametrize(
    ("schedule", "p", "m", "v"),
    [("gpipe", 4, 8, 1), ("1f1b", 4, 8, 1), ("interleaved-1f1b", 4, 8, 2), ("zb-h1", 4, 8, 1),
     ("zb-h2", 4, 8, 1), ("zb-v", 4, 8, 2), ("dualpipev", 4, 8, 2), ("zb-v", 2, 8, 2)],
)  # fmt: skip
def test_replay_matches_the_closed_forms_without_messages(
    schedule: str, p: int, m: int, v: int
) -> None:
    """Equal stages, messages free, m >= p: the replay of the real schedule gives the textbook
    bubble; messages then cost at most the closed form's 2 per tick."""
    device = StageTimes(1.0, 2.0, 1.0)
    stage = StageTimes(1.0 / v, 2.0 / v, 1.0 / v)
    replayed = bubble_time(schedule, p, m, v, device, replayed_makespan)
    assert replayed == pytest.approx(analytic_bubble(schedule, p, m, v, device))
    times = PipelineTimes((stage,) * (p * v), p2p_s=0.1)
    bubble, p2p, how = pipeline_time(schedule, p, m, v, times)
    assert how == "replay" and bubble == pytest.approx(replayed)
    assert 0 < p2p <= analytic_p2p(p, m, v, 0.1)


@pytest.mark.parametrize(
    "schedule", ["1f1b", "zb-h1", "zb-h2", "zb-v", "dualpipev", "interleaved-1f1b"]
)
@pytest.mark.parametrize("p", [2, 4])
def test_peaks_in_flight_saturate_where_the_projection_stops_walking(schedule, p) -> None:
    """The projection walks a schedule of SATURATION·pp microbatches when the batch has more:
    every generator's peaks (weighted by uneven stages too) are the same at 1, 1.5 and 2 times
    that; and the closed forms of GPipe, 1F1B and ZB-H1 equal the walk."""
    from parallel.cost import projection
    from parallel.schedules import make_schedule

    v = 2 if schedule == "interleaved-1f1b" else 1
    layout = Layout(pp=p, microbatches=4, schedule=schedule, virtual_stages=v)
    blocks = tuple(range(1, layout.num_stages + 1))  # uneven: 1, 2, 3, ... blocks

    def walk(m: int, device: int) -> tuple[int, int]:
        built = make_schedule(schedule, p, m, v)
        alive = peak = first = peak_first = 0
        for action in built.actions[device]:
            if action.kind == "F":
                alive += blocks[action.stage]
                first += action.stage == 0
                peak, peak_first = max(peak, alive), max(peak_first, first)
            elif action.kind in ("B", "I"):
                alive -= blocks[action.stage]
                first -= action.stage == 0
        return peak, peak_first

    saturated = projection.SATURATION * p
    for device in range(p):
        peaks = {walk(m, device) for m in (saturated, saturated * 3 // 2, 2 * saturated)}
        assert len(peaks) == 1, (device, peaks)
        if schedule in ("1f1b", "zb-h1"):
            for m in (1, p, 2 * saturated):
                big = Layout(pp=p, microbatches=m, schedule=schedule)
                assert peak_in_flight_layers(big, device, blocks) == walk(m, device)


def test_zero_bubble_with_few_microbatches_is_replayed_not_guessed() -> None:
    # ZB-H1's closed form assumes m >= p; with 2 microbatches on 4 stages its cool-down cannot be
    # filled and the replay shows the larger bubble.
    device = StageTimes(1.0, 2.0, 1.0)
    assert bubble_time("zb-h1", 4, 2, 1, device, replayed_makespan) > analytic_bubble(
        "zb-h1", 4, 2, 1, device
    )


def test_projections_replay_the_schedule_by_default() -> None:
    layout = Layout(pp=4, microbatches=8, schedule="zb-h1")
    replayed = project(SMALL, layout, A100)
    closed = project(SMALL, layout, A100, CostOptions(replay=None))
    assert (replayed.pipeline_model, closed.pipeline_model) == ("replay", "closed form")
    assert replayed.breakdown_s["compute"] == closed.breakdown_s["compute"]
    # Unequal stages (the embedding on the first, the head on the last) move the bubble away
    # from the closed form's equal-stage value, not far.
    assert replayed.breakdown_s["bubble"] == pytest.approx(closed.breakdown_s["bubble"], rel=0.3)
    # Messages overlap with other stages' compute in the replay; the closed form puts all of
    # them on the critical path.
    assert 0 < replayed.breakdown_s["pp_exposed"] <= closed.breakdown_s["pp_exposed"]
    assert project(SMALL, Layout(), A100).pipeline_model == "none"
    # Too long to replay quickly: the closed forms are used.
    huge = Layout(pp=4, microbatches=REPLAY_LIMIT)
    assert project(SMALL, huge, A100).pipeline_model == "closed form"


# ---- bytes per axis (ledger convention) ---------------------------------------------------------
def test_comm_bytes_closed_forms() -> None:
    c, b, m, e = SMALL, 2, 3, 2
    T, h, L, V = b * c.block_size, c.n_embd, c.n_layer, c.vocab_size
    x = T * h * e
    norm = 8  # the float64 all-reduce of the squared gradient norm, once per step
    tp = project(c, Layout(tp=2, microbatch_size=b, microbatches=m), A100)
    # 4 all-reduces per block, the embedding's forward, the head's backward, 3 loss all-reduces
    assert tp.comm_bytes["tp"] == m * (4 * L * x + x + x + 3 * T * e) + norm
    sp = project(c, Layout(tp=2, microbatch_size=b, microbatches=m, sequence_parallel=True), A100)
    per_block = 4 * (x + x // 2)  # all-gathers count their shard, reduce-scatters their input
    # Replicated parameters' gradients, all-reduced once per step: per block two layer norms
    # (weight, bias) and two row-parallel biases; the positions; the final layer norm.
    replicated = (L * 6 * h + c.block_size * h + 2 * h) * e
    assert sp.comm_bytes["tp"] == m * (L * per_block + (x + x // 2) * 2 + 3 * T * e) + (
        norm + replicated
    )
    dp = project(c, Layout(dp=4, microbatch_size=b, microbatches=m), A100)
    assert dp.comm_bytes == {"tp": 0, "pp": 0, "dp": 2 * c.num_parameters(), "cp": 0, "ep": 0}
    z1 = project(c, Layout(dp=4, microbatch_size=b, microbatches=m, zero=1), A100)
    assert z1.comm_bytes["dp"] == 2 * c.num_parameters() + 2 * c.num_parameters() // 4 + norm
    # pp = 2: each rank sends one message per microbatch (activations one way, gradients the
    # other) and its copy of the tied embedding's gradient to the other end.
    tied = V * h * e
    pp2 = project(c, Layout(pp=2, microbatch_size=b, microbatches=m), A100)
    assert pp2.comm_bytes["pp"] == m * x + tied + norm
    pp4 = project(c, Layout(pp=4, microbatch_size=b, microbatches=m), A100)
    assert pp4.comm_bytes["pp"] == max(2 * m * x, m * x + tied) + norm  # middle vs end ranks


# ---- links --------------------------------------------------------------------------------------
def test_a_tensor_parallel_group_inside_a_node_uses_nvlink() -> None:
    mesh = MeshLayout(dp=4, tp=8, pp=1)
    tp, dp = group_link(mesh, "tp", A100), group_link(mesh, "dp", A100)
    assert not tp.crosses_node and tp.link_name == A100.intra_node.name
    assert tp.bytes_per_s == A100.intra_node.bytes_per_s
    assert dp.crosses_node and dp.link_name == A100.inter_node.name
    assert dp.members_per_node == 1 and dp.bytes_per_s == A100.inter_node.bytes_per_s


def test_a_tensor_parallel_group_across_nodes_uses_the_network() -> None:
    # dp fastest: tp neighbours are 8 ranks apart, so every tp pair spans two nodes
    mesh = MeshLayout(dp=8, tp=2, pp=1, order="dp-tp-pp")
    tp, dp = group_link(mesh, "tp", A100), group_link(mesh, "dp", A100)
    assert tp.crosses_node and tp.link_name == A100.inter_node.name
    assert not dp.crosses_node
    # 16 ranks of one tp group over two nodes: 8 adapters each, still below NVLink
    wide = group_link(MeshLayout(tp=16), "tp", A100)
    assert wide.crosses_node and wide.members_per_node == 8
    assert wide.bytes_per_s == min(A100.intra_node.bytes_per_s, 8 * A100.inter_node.bytes_per_s)
    assert all_reduce_time(1e8, tp) > 5 * all_reduce_time(
        1e8, group_link(MeshLayout(tp=2), "tp", A100)
    )
    c = GPTConfig(vocab_size=51200, block_size=2048, n_layer=8, n_head=32, n_embd=4096)
    inside = project(c, Layout(dp=8, tp=2, microbatches=4, order="tp-dp-pp"), A100)
    across = project(c, Layout(dp=8, tp=2, microbatches=4, order="dp-tp-pp"), A100)
    assert across.breakdown_s["tp_exposed"] > 5 * inside.breakdown_s["tp_exposed"]
    assert "NVLink" in inside.links["tp"] and "InfiniBand" in across.links["tp"]


# ---- sanity -------------------------------------------------------------------------------------
def test_more_data_parallelism_is_faster_until_communication_dominates() -> None:
    c = GPTConfig(vocab_size=51200, block_size=2048, n_layer=24, n_head=16, n_embd=2048)
    slow = dataclasses.replace(
        A100, inter_node=dataclasses.replace(A100.inter_node, bandwidth_gbs=1.25)
    )
    sizes = (1, 2, 4, 8, 16, 32, 64, 128)

    def sweep(profile: object) -> list:
        return [
            project(
                c,
                Layout(
                    dp=dp, microbatch_size=4, microbatches=512 // (4 * dp), recompute="selective"
                ),
                profile,  # type: ignore[arg-type]
            )
            for dp in sizes
        ]

    fast, slow_runs = sweep(A100), sweep(slow)
    for runs in (fast, slow_runs):
        times = [r.step_time_s for r in runs]
        assert all(later < earlier for earlier, later in itertools.pairwise(times))
        mfus = [r.mfu for r in runs]
        assert all(later <= earlier + 1e-12 for earlier, later in itertools.pairwise(mfus))
    # On a 10 Gb/s network the exposed gradient reduction takes over once dp leaves the node.
    shares = [r.breakdown_s["dp_exposed"] / r.step_time_s for r in slow_runs]
    # dp 8 stays on NVLink (only the last bucket shows), dp 16 spans two nodes
    assert shares[3] < 1e-3 < 0.02 < shares[4]
    assert all(later > earlier for earlier, later in itertools.pairwise(shares[4:]))
    speedup = slow_runs[-2].step_time_s / slow_runs[-1].step_time_s
    assert speedup < 1.8 < fast[-2].step_time_s / fast[-1].step_time_s


def test_layout_errors_are_one_line() -> None:
    with pytest.raises(CostModelError, match=r"^parallel\.tp=3 does not divide model\.n_head=8$"):
        project(SMALL, Layout(tp=3), A100)
    with pytest.raises(LayoutError, match=r"needs parallel\.schedule=interleaved-1f1b"):
        Layout(pp=2, virtual_stages=2, microbatches=2)


# ---- hardware profiles --------------------------------------------------------------------------
def test_shipped_profiles_load() -> None:
    h100 = load_profile("h100-dgx")
    assert A100.device.peak_flops("bf16") == 312e12
    assert h100.device.peak_flops("bf16") == 989e12
    assert A100.gpus_per_node == h100.gpus_per_node == 8
    assert A100.inter_node.bandwidth_gbs == 25 and h100.inter_node.bandwidth_gbs == 50
    assert A100.intra_node.bandwidth_gbs == 300 and h100.intra_node.bandwidth_gbs == 450
    # the efficiency curve rises with size and saturates at gemm_max_efficiency
    curve = [A100.gemm_efficiency(n, n, n, "bf16", 2) for n in (256, 1024, 4096, 16384)]
    assert curve == sorted(curve) and curve[0] < 0.1
    assert curve[-1] == pytest.approx(A100.device.gemm_max_efficiency, rel=0.01)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda r: r["device"].update(peek_tflops=1),
            r"unknown key 'device\.peek_tflops'.*did you mean 'device\.peak_tflops'",
        ),
        (
            lambda r: r["intra_node"].update(bandwidth_gbs=-1),
            r"intra_node\.bandwidth_gbs expected a number > 0, got -1",
        ),
        (
            lambda r: r["inter_node"].update(efficiency=1.5),
            r"inter_node\.efficiency expected a number <= 1\.0, got 1\.5",
        ),
        (lambda r: r.pop("gpus_per_node"), r"gpus_per_node expected a positive integer, got None"),
        (
            lambda r: r["device"]["peak_tflops"].update(int8=624),
            r"device\.peak_tflops\.int8 is not a dtype",
        ),
        (lambda r: r.pop("intra_node"), r"hardware profile is missing 'intra_node'"),
    ],
)
def test_bad_profiles_are_one_line(edit: object, message: str) -> None:
    import yaml

    raw = yaml.safe_load((REPO / "configs/hardware/a100-dgx.yaml").read_text())
    edit(raw)  # type: ignore[operator]
    with pytest.raises(CostModelError, match=message) as info:
        profile_from_dict(raw)
    assert "\n" not in str(info.value) and not str(info.value).startswith("error")


# ---- civetta simulate ---------------------------------------------------------------------------
GPT3 = str(REPO / "configs" / "gpt3-175b.yaml")


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def test_simulate_writes_the_json_keys(tmp_path: Path) -> None:
    out = tmp_path / "sim.json"
    console = _quiet()
    assert simulate_command(GPT3, "a100-dgx", [], 300 * 10**9, out, console) == 0
    data = json.loads(out.read_text())
    for key in ("step_time_s", "tflops_per_gpu", "mfu", "hfu", "bubble_fraction"):
        assert isinstance(data[key], float) and data[key] > 0
    memory_keys = {"params", "grads", "optimizer", "activations", "gathered", "reserve", "total"}
    assert set(data["memory_per_gpu"]) == memory_keys
    assert data["framework"]["name"] == "generic"
    assert set(data["comm_bytes"]) == {"tp", "pp", "dp", "cp", "ep"}
    assert data["world_size"] == 1536 and data["hardware"] == "a100-dgx"
    assert data["training"]["tokens"] == 300 * 10**9 and data["training"]["cost"] > 0
    assert data["hfu"] > data["mfu"]  # full recomputation
    text = console.file.getvalue()  # type: ignore[attr-defined]
    for words in ("Step time", "MFU", "HFU", "Memory per GPU", "fits", "GPU-hours", "GiB = 2^30"):
        assert words in text


@pytest.mark.parametrize(
    ("hardware", "overrides", "message"),
    [
        ("nope", [], r"^hardware profile 'nope' is neither a file nor one of .*a100-dgx"),
        (
            "a100-dgx",
            ["parallel.tp=5"],
            r"^parallel\.tp=5 does not divide model\.n_head=96$",
        ),
    ],
)
def test_simulate_errors_are_config_errors(hardware: str, overrides: list, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        simulate_command(GPT3, hardware, overrides, None, None, _quiet())


# ---- Megatron-LM reproduction -------------------------------------------------------------------
@dataclass(frozen=True)
class MegatronRun:
    params_b: float
    heads: int
    hidden: int
    layers: int
    tp: int
    pp: int
    gpus: int
    batch: int
    tflops: float  # achieved teraFLOP/s per GPU, Eq. 3 (counts the recomputed forward)
    microbatch: int
    virtual_stages: int = 1
    overlap_dp: bool = False  # --DDP-impl torch overlaps the gradient all-reduce; local does not
    schedule: str = "1f1b"


# Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
# Megatron-LM" (SC21, arXiv:2104.04473), Table 1: weak scaling on Selene (DGX A100 80GB, 8×HDR
# InfiniBand per node), fp16, sequence 2048, vocabulary 51200, full activation recomputation.
# Microbatch sizes, interleaving (--num-layers-per-virtual-pipeline-stage) and --DDP-impl are not
# in the table: they come from the scripts that produced it, Megatron-LM's
# examples/sc21/run_table_1.sh.
TABLE_1 = [
    MegatronRun(1.7, 24, 2304, 24, 1, 1, 32, 512, 137, 16, overlap_dp=True),
    MegatronRun(3.6, 32, 3072, 30, 2, 1, 64, 512, 138, 16, overlap_dp=True),
    MegatronRun(7.5, 32, 4096, 36, 4, 1, 128, 512, 142, 16, overlap_dp=True),
    MegatronRun(18.4, 48, 6144, 40, 8, 1, 256, 1024, 135, 8, overlap_dp=True),
    MegatronRun(39.1, 64, 8192, 48, 8, 2, 512, 1536, 138, 4),
    MegatronRun(76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140, 2, virtual_stages=3),  # 5 layers
    MegatronRun(145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148, 2, virtual_stages=2),  # 5 layers
    MegatronRun(310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155, 1, virtual_stages=2),  # 3 layers
    MegatronRun(529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163, 1, virtual_stages=3),  # 1 layer
    MegatronRun(1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163, 1),
]

# Same paper, Table 2, the PTD-P rows (174.6B and 529.6B, microbatch 1): held out, not used to
# fit the profile. The paper does not give their schedule or DDP implementation; 1F1B without
# gradient overlap (its pipeline setting in Table 1's scripts) is assumed.
TABLE_2_PTDP = [
    MegatronRun(174.6, 96, 12288, 96, 8, 12, gpus, 1536, tflops, 1)
    for gpus, tflops in ((384, 153), (768, 149), (1536, 141))
] + [
    MegatronRun(529.6, 128, 20480, 105, 8, 35, gpus, 2240, tflops, 1)
    for gpus, tflops in ((560, 171), (1120, 167), (2240, 159))
]


def megatron_projection(run: MegatronRun, zero: int = 0) -> float:
    """Projected Eq. 3 teraFLOP/s per GPU of one Megatron run on the a100-dgx profile."""
    model = GPTConfig(
        vocab_size=51200, block_size=2048, n_layer=run.layers, n_head=run.heads, n_embd=run.hidden
    )
    assert model.num_parameters() / 1e9 == pytest.approx(run.params_b, rel=0.05)  # rounded
    dp = run.gpus // (run.tp * run.pp)
    layout = Layout(
        dp=dp,
        tp=run.tp,
        pp=run.pp,
        microbatch_size=run.microbatch,
        microbatches=run.batch // (dp * run.microbatch),
        schedule="interleaved-1f1b" if run.virtual_stages > 1 else run.schedule,
        virtual_stages=run.virtual_stages,
        recompute="full",
        zero=zero,
    )
    assert layout.world_size == run.gpus and layout.global_batch == run.batch
    # Megatron-LM §4.1 scatter/gather of pipeline messages was on in these runs.
    options = CostOptions(overlap_dp=run.overlap_dp, pp_scatter_gather=True)
    projection = project(model, layout, A100, options, Workload("fp16"))
    assert projection.fits
    return projection.hardware_tflops_per_gpu  # Eq. 3 counts the recomputed forward


@pytest.mark.parametrize("run", TABLE_1, ids=lambda r: f"{r.params_b}B")
def test_megatron_table_1_within_10_percent(run: MegatronRun) -> None:
    assert megatron_projection(run) == pytest.approx(run.tflops, rel=0.10)


@pytest.mark.parametrize("run", TABLE_2_PTDP, ids=lambda r: f"{r.params_b}B-{r.gpus}gpus")
def test_megatron_table_2_ptdp_held_out_within_10_percent(run: MegatronRun) -> None:
    assert megatron_projection(run) == pytest.approx(run.tflops, rel=0.10)
