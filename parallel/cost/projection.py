"""The cost model: one training step, projected onto a hardware profile from the model's code.

Nothing is executed on data. For a layout (dp × tp × pp, microbatches, schedule, ZeRO,
recomputation, sequence parallelism) the model's own pieces (a block; the embeddings; the final
norm, head and loss) are run once each, data-free, on one representative rank of a virtual mesh
(`parallel.cost.trace`), and arranged into pipeline stages (`parallel.cost.stages`). What they
recorded is priced: every GEMM by its shape (the profile's efficiency curve), the bytes op
outputs write (memory-bound elementwise traffic) and the graph nodes built (the engine's fixed
cost per op), every collective by its op and size over the link its group crosses
(`parallel.cost.collectives`). The pipeline schedule is replayed with those times and the p2p
time of each message (`parallel.cost.replay`, a discrete-event replay of `parallel.schedules`);
the exposed data-parallel communication (buckets planned from the traced parameters as
`parallel.data_parallel` plans them) and the optimizer step are added. The report gives
throughput, MFU/HFU, memory per GPU by category (the traced model state and the activations the
pieces keep for backward) and bytes per axis. No formula here restates the model's shapes.

Step time = m·(t_f + t_b) + bubble + exposed pp + exposed tp + exposed dp + optimizer, where t_f
and t_b are one microbatch's forward and backward (with recomputation and the tensor-parallel
collectives, which are not overlapped) on the busiest device. Documented simplifications:

- DP gradient reduction runs bucket by bucket during the last microbatch's backward (what
  `parallel.data_parallel` buckets for): exposed = max(last bucket, dp time - that backward); with
  `CostOptions.overlap_dp=False` (civetta's own executor, `CIVETTA_EXECUTOR`) all of it is
  exposed. ZeRO-1/2 reduce-scatter the gradients the same way and all-gather the updated weights
  after the step (exposed); ZeRO-3 gathers the weights before every forward, recomputation and
  backward and reduce-scatters the gradients of every microbatch, overlapped with that
  microbatch's compute (prefetch).
- Pipeline messages: replayed (a message delays its receiver by its p2p time); with
  `CostOptions(replay=None)` or schedules too long to replay, 2 per tick over (m·v + p - 1) ticks.
- Time is that of the busiest device; every device of a data-parallel replica waits for it.
- The optimizer sweeps each rank's state once (`optimizer_time`), plus a fixed cost per
  parameter tensor; op dispatch costs per traced graph node: both are what dominates
  civetta's numpy engine on small models, and zero on the GPU profiles.
- More ranks than cores (the `local` profile's `oversubscribed` section): every rank computes at
  its share of a core, stretched, and communicates over the oversubscribed link; ranks idle in a
  pipeline bubble leave their core to the others (`project`).

Conventions. ``comm_bytes[axis]`` counts one training step of the GPU that sends the most on that
axis the way civetta's ledger counts (`parallel.comm`): the ``bytes`` of the buffer a rank passes
to each collective (all-reduce input, all-gather shard, reduce-scatter full input), messages
counted by their sender only (the ledger's "send" rows, not "recv"). Every collective of the
training step is in it, the 8-byte gradient-norm all-reduces and the tied-embedding gradient
exchange included; the bookkeeping outside the step's arithmetic (the ledger's phase "other":
the loss averaged for the log, shards gathered for a checkpoint) and evaluation are not.
`tests/test_cost_vs_run.py` checks these bytes, the FLOPs and the model-state bytes against
executed runs, exactly. Memory is in bytes (GB = 1e9, GiB = 2**30 when printed). MFU counts
model FLOPs (forward + backward), HFU adds recomputation; both divide by the dense peak of the
training dtype. The bubble fraction is the idle pipeline time over the step time.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from civetta.meters import Gemm
from civetta.models import ModelDescription
from parallel.cost.collectives import (
    GroupLink,
    all_gather_time,
    all_reduce_time,
    group_link,
    p2p_time,
    reduce_scatter_time,
)
from parallel.cost.framework import PRESETS, Framework, default_framework
from parallel.cost.hardware import CostModelError, HardwareProfile, LinkSpec
from parallel.cost.memory import (
    ELEMENT_BYTES,
    MemoryPerGPU,
    ceil_div,
    element_bytes,
    state_bytes_per_param,
)
from parallel.cost.replay import (
    PipelineTimes,
    StageTimes,
    cached_schedule,
    pipeline_time,
)
from parallel.cost.stages import StagedModel, staged_model
from parallel.cost.trace import Call, Piece, sharded_calls, zero3_calls
from parallel.layout import Layout, LayoutError, is_schedule_file
from parallel.mesh import MeshLayout
from parallel.schedules import Schedule, schedule_of

MIB = 1 << 20
OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class Workload:
    """What one step computes beside how it is split (the `Layout`): the training dtype, the
    optimizer, and the tokens per sequence (default: the model's block)."""

    dtype: str = "bf16"
    optimizer: str = "adamw"
    seq_len: int | None = None
    # The routing assumption of a mixture of experts: 1 routes every expert the mean load
    # (balanced); f > 1 sends the busiest expert-parallel rank f times the mean (and the step
    # waits for it), as a skewed router would.
    moe_imbalance: float = 1.0
    # The attention kernel the pieces are traced with (the framework's, set by `project`).
    attention: str = "eager"

    def check(self) -> None:
        """Refuse what the cost model cannot price, with one bare line naming the value."""
        if isinstance(self.moe_imbalance, bool) or not self.moe_imbalance >= 1.0:
            raise CostModelError(
                f"--moe-imbalance expected a number >= 1 (1: balanced), got {self.moe_imbalance}"
            )
        if self.dtype not in ELEMENT_BYTES:
            raise CostModelError(
                f"train.dtype expected one of {' | '.join(ELEMENT_BYTES)}, got {self.dtype!r}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise CostModelError(
                f"train.optimizer expected one of {' | '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )

    def seq(self, config: ModelDescription) -> int:
        return self.seq_len or config.block_size


def checked(config: ModelDescription, layout: Layout, work: Workload) -> None:
    """The one check of a projection's inputs: the layout's (`Layout.check`) and the
    workload's, as `CostModelError`s."""
    try:
        layout.check(config, work.seq_len)
    except LayoutError as exc:
        raise CostModelError(str(exc)) from None
    work.check()
    if work.moe_imbalance != 1.0 and getattr(config, "moe", None) is None:
        raise CostModelError("--moe-imbalance needs a mixture-of-experts model (model.moe)")
    if layout.ep > 1 and work.moe_imbalance > layout.ep:
        raise CostModelError(
            f"--moe-imbalance {work.moe_imbalance:g} exceeds parallel.ep={layout.ep}: the "
            "busiest rank cannot receive more than every slot"
        )


# The software a projection assumes (`parallel.cost.framework`); the old name stays for callers.
CostOptions = Framework
CIVETTA_EXECUTOR = PRESETS["civetta"]


def executor_options(profile: HardwareProfile) -> Framework:
    """The software a projection assumes by default: civetta's own executor on this machine's
    profile (`local`, as `civetta calibrate` names it), `generic` on a cluster's."""
    return default_framework(profile.name)


@dataclass(frozen=True)
class Projection:
    """One projected training step. Times in seconds, bytes per GPU, FLOP/s per GPU."""

    step_time_s: float
    breakdown_s: dict[str, float]  # compute, optimizer, tp/pp/dp exposed comm, bubble
    tflops_per_gpu: float  # model FLOPs / (step time · GPUs), in TFLOP/s
    hardware_tflops_per_gpu: float  # with recomputation
    mfu: float
    hfu: float
    bubble_fraction: float
    memory_per_gpu: dict[str, int]  # params, grads, optimizer, activations, total
    memory_capacity_bytes: int  # what the process can fill (capacity minus reserve)
    fits: bool
    comm_bytes: dict[str, int]  # tp, pp, dp per GPU per step (ledger convention)
    model_flops_per_step: int
    hardware_flops_per_step: int
    tokens_per_step: int
    world_size: int
    links: dict[str, str] = field(default_factory=dict)
    price_per_gpu_hour: float = 0.0
    pipeline_model: str = "none"  # "replay" | "closed form" | "none" (pp = 1)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_time_s

    def training(
        self, tokens: int, profile: HardwareProfile | None = None
    ) -> dict[str, float | None]:
        """Steps, wall-clock seconds and days, GPU-hours, cost and energy (kWh; None without
        `profile`'s board power and PUE) of training on `tokens` tokens
        (`parallel.cost.run_cost`)."""
        from parallel.cost.run_cost import run_cost

        return run_cost(self, tokens, profile).as_dict()

    def as_dict(self) -> dict[str, object]:
        return {
            "step_time_s": self.step_time_s,
            "breakdown_s": dict(self.breakdown_s),
            "tflops_per_gpu": self.tflops_per_gpu,
            "hardware_tflops_per_gpu": self.hardware_tflops_per_gpu,
            "mfu": self.mfu,
            "hfu": self.hfu,
            "bubble_fraction": self.bubble_fraction,
            "memory_per_gpu": dict(self.memory_per_gpu),
            "memory_capacity_bytes": self.memory_capacity_bytes,
            "fits": self.fits,
            "comm_bytes": dict(self.comm_bytes),
            "model_flops_per_step": self.model_flops_per_step,
            "hardware_flops_per_step": self.hardware_flops_per_step,
            "tokens_per_step": self.tokens_per_step,
            "tokens_per_s": self.tokens_per_s,
            "world_size": self.world_size,
            "links": dict(self.links),
            "pipeline_model": self.pipeline_model,
        }


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step over the whole global batch (all GPUs together)."""

    model: int  # forward + backward
    hardware: int  # model + recomputation


# ---- one microbatch on one device ---------------------------------------------------------------
@dataclass
class _Tick:
    """One microbatch's work on one stage or device, split into compute and tp communication."""

    compute_f: float = 0.0
    comm_f: float = 0.0
    compute_b: float = 0.0  # with recomputation
    comm_b: float = 0.0
    wgrad: float = 0.0  # weight-gradient GEMMs, what zb-h1 may defer
    tp_bytes: int = 0  # ledger bytes of tp collectives for this microbatch
    cp_bytes: int = 0  # ledger bytes of context-parallel messages and collectives
    cp_time: float = 0.0  # the part of comm_f + comm_b that is context-parallel
    ep_bytes: int = 0  # ledger bytes of expert-parallel all-to-alls (and their counts)
    ep_time: float = 0.0  # the part of comm_f + comm_b that is expert-parallel

    @property
    def forward(self) -> float:
        return self.compute_f + self.comm_f

    @property
    def backward(self) -> float:
        return self.compute_b + self.comm_b

    def times(self) -> StageTimes:
        return StageTimes(self.forward, self.backward, self.wgrad)


class _Device:
    """Timing of the traced pieces of the model on one tensor-parallel rank."""

    def __init__(
        self,
        model: StagedModel,
        work: Workload,
        profile: HardwareProfile,
        links: dict,
        layout: Layout,
        framework: Framework,
    ) -> None:
        self.model, self.work, self.profile, self.links = model, work, profile, links
        self.overlap_cp, self.overlap_tp = framework.overlap_cp, framework.overlap_tp
        self.call_latency = framework.collective_latency_us * 1e-6
        self.e = element_bytes(work.dtype)
        self.hbm = profile.device.hbm_bytes_per_s
        self.traffic = profile.device.elementwise_traffic
        self.backward_ratio = profile.device.backward_elementwise_ratio
        # The fixed cost of dispatching ops: the profile's is one block's on one rank without
        # tensor parallelism; every graph node pays its share.
        self.per_node = 0.0
        if profile.device.layer_overhead_us:
            alone = dataclasses.replace(layout, tp=1, sequence_parallel=False, zero=0)
            reference = model.piece("block", alone).forward.nodes
            self.per_node = profile.device.layer_overhead_us * 1e-6 / reference
        # A piece's tick depends on the piece, the device and the tp link alone: layouts that
        # share a staged model (a tuner's, differing in dp or schedule) share them.
        key = (repr(profile.device), work.dtype, links["tp"], links["cp"], links["ep"])
        key += (self.overlap_cp, self.overlap_tp, self.call_latency, self.per_node)
        self._ticks: dict[int, _Tick] = model.ticks.setdefault(key, {})

    def gemm(self, g: Gemm) -> float:
        if g.fused:  # inside flash attention: tiles on chip, the kernel's own efficiency
            d = self.profile.device
            return g.flops / (d.peak_flops(self.work.dtype) * d.attention_efficiency)
        nbytes = self.e * g.batch * (g.m * g.k + g.k * g.n + g.m * g.n)  # operands and result
        return self.profile.gemm_time(g.flops, nbytes, self.work.dtype)

    def call_time(self, call: Call) -> float:
        """Seconds of one recorded collective over its axis's link, with the framework's cost
        per call."""
        return self.wire_time(call) + self.call_latency

    def wire_time(self, call: Call) -> float:
        link = self.links[call.axis]
        if call.op == "all_reduce":
            return all_reduce_time(call.nbytes, link)
        if call.op == "all_gather":  # the ledger counts the shard; the time, the whole
            return all_gather_time(call.nbytes * link.size, link)
        if call.op == "reduce_scatter":
            return reduce_scatter_time(call.nbytes, link)
        if call.op == "sendrecv":  # one block to the next rank while one arrives
            return p2p_time(call.nbytes, link.latency_s, link.bytes_per_s)
        if call.op in ("all_to_all", "count_exchange"):  # each rank keeps 1/n, sends the rest
            n = link.size
            return link.latency_s * (n - 1) + call.nbytes * (n - 1) / n / link.bytes_per_s
        raise AssertionError(f"no time model for {call.op} inside a microbatch")

    def elementwise(self, nbytes: int, nodes: int) -> float:
        return self.traffic * nbytes / self.hbm + self.per_node * nodes

    def tick(self, piece: Piece) -> _Tick:
        """One microbatch of `piece`: GEMMs and elementwise traffic, forward and backward (the
        backward with what recomputation runs again), and its tensor-parallel collectives."""
        key = id(piece)
        if key not in self._ticks:
            f, b = piece.forward, piece.backward
            by_phase: dict[str, float] = dict.fromkeys(("forward", "backward-input"), 0.0)
            by_phase["backward-weight"] = 0.0
            for g in b.gemms:
                by_phase[g.phase] += self.gemm(g)
            elem_f = self.elementwise(f.output_bytes, f.nodes)
            elem_again = self.elementwise(b.output_bytes, b.nodes)  # recomputation
            tp_f, tp_b = f.calls_on("tp"), b.calls_on("tp")
            cp_f, cp_b = f.calls_on("cp"), b.calls_on("cp")
            # Expert parallelism's dispatch and combine: waited for (civetta overlaps nothing).
            ep_f = sum(self.call_time(c) for c in f.calls_on("ep"))
            ep_b = sum(self.call_time(c) for c in b.calls_on("ep"))
            gemm_f = sum(self.gemm(g) for g in f.gemms)
            compute_f = gemm_f + elem_f
            compute_b = sum(by_phase.values()) + self.backward_ratio * elem_f + elem_again
            cp_time_f, cp_time_b = (
                self.cp_exposed(cp_f, compute_f),
                self.cp_exposed(cp_b, compute_b),
            )
            self._ticks[key] = _Tick(
                compute_f=compute_f,
                comm_f=self.tp_exposed(tp_f, gemm_f) + cp_time_f + ep_f,
                compute_b=compute_b,
                comm_b=self.tp_exposed(tp_b, sum(by_phase.values())) + cp_time_b + ep_b,
                cp_time=cp_time_f + cp_time_b,
                wgrad=by_phase["backward-weight"],
                tp_bytes=sum(c.nbytes for c in tp_f + tp_b),
                cp_bytes=sum(c.nbytes for c in cp_f + cp_b),
                ep_bytes=sum(c.nbytes for c in f.calls_on("ep") + b.calls_on("ep")),
                ep_time=ep_f + ep_b,
            )
        return self._ticks[key]

    def tp_exposed(self, calls: tuple[Call, ...], gemms: float) -> float:
        """Seconds of tensor-parallel communication not hidden. With the framework's tp overlap,
        sequence parallelism's all-gathers and reduce-scatters travel in chunks while the GEMMs
        they feed or follow compute (hidden up to the pass's GEMM time); all-reduces (tp
        without sequence parallelism) are waited for, as Megatron-core's overlap leaves them."""
        total = sum(self.call_time(c) for c in calls)
        if not self.overlap_tp:
            return total
        split = sum(self.call_time(c) for c in calls if c.op in ("all_gather", "reduce_scatter"))
        return total - split + max(0.0, split - gemms)

    def cp_exposed(self, calls: tuple[Call, ...], compute: float) -> float:
        """Seconds of context-parallel communication not hidden: a ring's blocks travel while
        the previous block's attention computes (as Megatron-core's and ring-flash-attention's
        rings overlap them, hidden up to the pass's compute); all-gathered keys and values and
        all-to-alls are waited for."""
        ring = sum(self.call_time(c) for c in calls if c.op == "sendrecv")
        other = sum(self.call_time(c) for c in calls if c.op != "sendrecv")
        if self.overlap_cp:
            ring = max(0.0, ring - compute)
        return ring + other

    def ticks(self, pieces: list[tuple[Piece, int]]) -> _Tick:
        return _combine([(self.tick(piece), count) for piece, count in pieces])


def _combine(parts: list[tuple[_Tick, int]]) -> _Tick:
    total = _Tick()
    for tick, count in parts:
        names = ("compute_f", "comm_f", "compute_b", "comm_b", "wgrad", "tp_bytes", "cp_bytes")
        for name in (*names, "cp_time", "ep_bytes", "ep_time"):
            setattr(total, name, getattr(total, name) + count * getattr(tick, name))
    return total


_LINKS: dict[tuple[MeshLayout, int, LinkSpec, LinkSpec], dict[str, GroupLink]] = {}


def _group_links(mesh: MeshLayout, profile: HardwareProfile) -> dict[str, GroupLink]:
    """The link of each axis, memoised: finding a spanning group's bottleneck visits every rank,
    and a tuner projects many layouts of the same mesh."""
    key = (mesh, profile.gpus_per_node, profile.intra_node, profile.inter_node)
    if key not in _LINKS:
        if len(_LINKS) > 512:
            _LINKS.clear()
        links = {axis: group_link(mesh, axis, profile) for axis in ("tp", "pp", "cp")}
        # Gradients are averaged (and ZeRO shards) over dp × cp: one group, booked as dp.
        links["dp"] = group_link(mesh, ("dp", "cp"), profile)
        # Experts: all-to-all over ep, gradients over edp (both cut out of dp × cp).
        links["ep"] = group_link(mesh, ("ep",), profile)
        links["edp"] = group_link(mesh, ("edp",), profile)
        _LINKS[key] = links
    return _LINKS[key]


def pipeline_sends(placement: tuple[int, ...], device: int) -> int:
    """Messages pipeline rank `device` sends per microbatch: an activation from each of its
    stages whose next stage lives elsewhere, a gradient from each whose previous stage does
    (`placement`: each stage's rank)."""
    last = len(placement) - 1
    return sum(
        (s < last and placement[s + 1] != device) + (s > 0 and placement[s - 1] != device)
        for s, rank in enumerate(placement)
        if rank == device
    )


def _zero3_calls(piece: Piece, dp: int, element: int, edp: int, unit: str) -> list[Call]:
    """ZeRO-3's collectives of one microbatch of `piece`: every op gathers its parameters
    before its forward, recomputation and backward and reduce-scatters their gradients (as the
    traced piece issued them; experts over edp). Per layer, a piece's gathers of one pass are
    one collective over one flat buffer, and so are its reduce-scatters."""
    if unit == "tensor":
        ops = [(op, phase, (size,), group) for op, phase, sizes, group in piece.sharded_ops
               for size in sizes]  # fmt: skip
        return sharded_calls(ops, dp, element, edp)
    calls = zero3_calls(piece, dp, element, edp)
    if unit == "op":
        return calls
    merged: dict[tuple[str, str, str], Call] = {}
    for c in calls:
        key = (c.op, c.axis, c.phase)
        was = merged.get(key)
        if was is not None:
            c = Call(c.op, c.axis, c.phase, was.nbytes + c.nbytes, was.wire_bytes + c.wire_bytes)
        merged[key] = c
    return list(merged.values())


def _zero3_exposed(
    dev: _Device,
    pieces: list[tuple[Piece, int]],
    dp: int,
    element: int,
    edp: int,
    framework: Framework,
) -> tuple[float, int]:
    """(exposed seconds, ledger bytes) of ZeRO-3's collectives in one microbatch on one rank.
    Without prefetch each gather is waited for. With it, a unit's gathers travel while the
    previous unit computes: a unit whose communication outlasts its compute exposes the
    difference, and each pass waits for its first unit's gather. Per tensor with prefetch, the
    modules' timeline (`_zero3_tensor_timeline`), which waits for each call without it."""
    if framework.zero3_unit == "tensor":
        exposed, nbytes = 0.0, 0
        for piece, count in pieces:
            seconds, sent = _zero3_tensor_timeline(dev, piece, dp, element, edp, framework, count)
            exposed += count * seconds
            nbytes += count * sent
        return exposed, nbytes
    exposed, nbytes, first = 0.0, 0, 0.0
    for piece, count in pieces:
        calls = _zero3_calls(piece, dp, element, edp, framework.zero3_unit)
        comm = sum(dev.call_time(c) for c in calls)
        nbytes += count * sum(c.nbytes for c in calls)
        if not framework.zero3_overlaps:
            exposed += count * comm
            continue
        tick = dev.tick(piece)
        exposed += count * max(0.0, comm - tick.forward - tick.backward)
        gathers = [dev.call_time(c) for c in calls if c.op == "all_gather"]
        first = max(first, sum(gathers) / max(1, len(gathers)))
    return exposed + 2 * first, nbytes


@dataclass
class _ModuleUse:
    """One module's turn in a pass under per-tensor ZeRO-3: the tensors it gathers first, the
    gradients it reduce-scatters after, and its share of the pass's compute."""

    sizes: tuple[int, ...]
    group: str
    gathers: list[Call] = field(default_factory=list)
    reduces: list[Call] = field(default_factory=list)
    compute: float = 0.0


def _zero3_uses(
    piece: Piece, phase: str, dp: int, element: int, edp: int, framework: Framework
) -> list[_ModuleUse]:
    """The modules of one pass of `piece` in order, as the traced ops issued their gathers (a
    reduce-scatter belongs to the gather before it: the op's backward). A tensor of at most
    `zero3_persistence` elements is never gathered; a module used again within
    `zero3_max_reuse` elements of other modules' parameters (counted per use) keeps its
    tensors gathered."""
    uses: list[_ModuleUse] = []
    for op, ph, sizes, group in piece.sharded_ops:
        if ph != phase:
            continue
        if op == "all_gather":
            uses.append(_ModuleUse(sizes, group))
        elif uses:
            tensors = [(op, ph, (size,), group) for size in sizes]
            uses[-1].reduces.extend(sharded_calls(tensors, dp, element, edp))
    for k, use in enumerate(uses):
        earlier = [j for j in range(k) if uses[j].sizes == use.sizes]
        if earlier and framework.zero3_max_reuse:
            between = sum(sum(u.sizes) for u in uses[earlier[-1] + 1 : k])
            if between < framework.zero3_max_reuse:
                continue  # still gathered since its last use
        tensors = [("all_gather", phase, (size,), use.group) for size in use.sizes
                   if size > framework.zero3_persistence]  # fmt: skip
        use.gathers = sharded_calls(tensors, dp, element, edp)
    return uses


def _zero3_wire(dev: _Device, call: Call, framework: Framework) -> float:
    """Seconds of one ZeRO-3 collective on the wire; across nodes at the framework's
    `zero3_network_gbs` where it states one."""
    link = dev.links[call.axis]
    if framework.zero3_network_gbs and link.crosses_node:
        link = dataclasses.replace(link, bytes_per_s=framework.zero3_network_gbs * 1e9)
    if call.op == "all_gather":  # the ledger counts the shard; the time, the whole
        return all_gather_time(call.nbytes * link.size, link)
    return reduce_scatter_time(call.nbytes, link)


def _zero3_tensor_timeline(
    dev: _Device,
    piece: Piece,
    dp: int,
    element: int,
    edp: int,
    framework: Framework,
    count: int,
) -> tuple[float, int]:
    """(exposed seconds, ledger bytes) of one microbatch of `piece` under per-tensor ZeRO-3
    with prefetch, as DeepSpeed's coordinator runs it: before a module computes, the next
    module's tensors are gathered (one collective each) and the previous module's gradients
    reduce-scattered (one each), on one communication stream; the next module waits for all of
    it. A module takes the longer of its compute and that communication, plus the cost per
    collective of each call issued (`collective_latency_us`: host work and synchronisation,
    not overlapped). A pass's compute is shared among its modules by their parameters (a
    backward's modules twice a recomputation's); a piece repeated (`count` > 1: blocks) runs
    its passes back to back, so its first module's gathers overlap the previous block's last
    module; a piece run once waits for them. Without prefetch (`zero3_prefetch` 0) every call
    is waited for."""
    tick = dev.tick(piece)
    latency = dev.call_latency
    exposed, nbytes = 0.0, 0
    for phase, seconds in (("forward", tick.forward), ("backward", tick.backward)):
        uses = _zero3_uses(piece, phase, dp, element, edp, framework)
        if not uses:
            continue
        weights = [sum(u.sizes) * (2 if u.reduces else 1) for u in uses]
        total = sum(weights) or 1
        for use, w in zip(uses, weights, strict=True):
            use.compute = seconds * w / total
        wire = {id(c): _zero3_wire(dev, c, framework) for u in uses for c in u.gathers + u.reduces}
        nbytes += sum(c.nbytes for u in uses for c in u.gathers + u.reduces)
        if not framework.zero3_overlaps:  # every call waited for
            exposed += sum(t + latency for t in wire.values())
            continue
        k_last = len(uses) - 1
        for k, use in enumerate(uses):
            nxt = uses[(k + 1) % len(uses)] if count > 1 or k < k_last else None
            prev = uses[k - 1] if count > 1 or k > 0 else None
            issued = (nxt.gathers if nxt is not None else []) + (prev.reduces if prev else [])
            comm = sum(wire[id(c)] for c in issued)
            exposed += len(issued) * latency + max(0.0, comm - use.compute)
        if count == 1:  # waits for its first gathers and its last reduce-scatters
            edge = uses[0].gathers + uses[-1].reduces
            exposed += sum(wire[id(c)] + latency for c in edge)
    return exposed, nbytes


# ---- the projection -----------------------------------------------------------------------------
def project(
    config: ModelDescription,
    layout: Layout,
    profile: HardwareProfile,
    options: CostOptions | None = None,
    work: Workload | None = None,
) -> Projection:
    """Project one training step of `config` under `layout` onto `profile` (with
    `executor_options(profile)` unless `options` are given).

    On a machine with fewer cores than ranks (`HardwareProfile.for_ranks`) every rank computes
    at its share of a core, except that ranks idle in a pipeline bubble leave their core to the
    others: the step is the shared one without its bubble, unless the schedule alone (each rank
    stretched but on a core of its own) takes longer.
    """
    options = options or executor_options(profile)
    work = dataclasses.replace(work or Workload(), attention=options.attention)
    checked(config, layout, work)
    # MFU stays relative to the device's own peak.
    peak = profile.device.peak_flops(work.dtype)
    world = layout.world_size
    seen = profile.for_ranks(world)
    shared = _project(config, layout, work, seen, options, peak)
    if seen is profile or shared.breakdown_s["bubble"] == 0:
        return shared
    own = _project(config, layout, work, profile.for_ranks(world, own_cores=True), options, peak)
    busy = shared.step_time_s - shared.breakdown_s["bubble"]
    step = max(busy, own.step_time_s)
    scale = shared.step_time_s / step
    return dataclasses.replace(
        shared,
        step_time_s=step,
        breakdown_s={**shared.breakdown_s, "bubble": step - busy},
        tflops_per_gpu=shared.tflops_per_gpu * scale,
        hardware_tflops_per_gpu=shared.hardware_tflops_per_gpu * scale,
        mfu=shared.mfu * scale,
        hfu=shared.hfu * scale,
        bubble_fraction=(step - busy) / step,
    )


def _project(
    config: ModelDescription,
    layout: Layout,
    work: Workload,
    profile: HardwareProfile,
    options: CostOptions,
    peak: float,
) -> Projection:
    """`project` on a profile as each rank sees it (`HardwareProfile.for_ranks`)."""
    links = _group_links(layout.mesh, profile)
    model = staged_model(
        config, layout, work.dtype, work.seq(config), work.moe_imbalance, work.attention
    )
    dev = _Device(model, work, profile, links, layout, options)
    p, m, v, tp = layout.pp, layout.microbatches, layout.virtual_stages, layout.tp
    dp = layout.dp * layout.cp  # the ranks that average gradients (and that ZeRO shards over)
    s = model.seq_len
    w_b, g_b, _ = state_bytes_per_param(work.dtype, work.optimizer)

    stage_ticks = [dev.ticks(model.stage_pieces(k)) for k in range(model.num_stages)]
    # The devices that differ: with equal stages placed interleaved, the first (embedding), the
    # last (head) and a middle one; otherwise (uneven stages, a V) every device.
    uniform = len(set(model.stage_blocks)) == 1 and model.placement == tuple(
        k % p for k in range(model.num_stages)
    )
    positions = sorted({0, p - 1} | ({1} if p > 2 else set())) if uniform else list(range(p))
    ticks = {d: _combine([(stage_ticks[k], 1) for k in model.device_stages(d)]) for d in positions}
    slowest = max(positions, key=lambda d: ticks[d].forward + ticks[d].backward)
    tick = ticks[slowest]
    params = {d: model.device_params(d) for d in positions}

    # Pipeline messages: the activation a stage sends forward, its gradient backward.
    message = model.message_bytes(element_bytes(work.dtype))
    per_message = 0.0
    pl = links["pp"]
    # One message leaves through one network adapter when the pipeline crosses nodes.
    p2p_bandwidth = profile.inter_node.bytes_per_s if pl.crosses_node else pl.bytes_per_s
    if p > 1:
        wire, latency, bandwidth = message, pl.latency_s, p2p_bandwidth
        if options.pp_scatter_gather and not layout.sequence_parallel and tp > 1:
            wire = message // tp
            per_message += all_gather_time(message, links["tp"])
        per_message += p2p_time(wire, latency, bandwidth)
    times = PipelineTimes(tuple(t.times() for t in stage_ticks), per_message)
    schedule: str | Schedule = layout.schedule
    if is_schedule_file(layout.schedule):
        schedule = schedule_of(layout)
    bubble, pp_exposed, pipeline_model = pipeline_time(
        schedule, p, m, v, times, options.replay, model.placement
    )
    # After backward: the first and last stage exchange the gradients of the weights they both
    # hold (a tied embedding: one message each way, one after the other), then the gradient
    # norm is all-reduced.
    tied_elements = 0
    if p > 1:
        shared = set(model.piece("first").tied) | set(model.piece("last").tied)
        tied_elements = sum(
            x.elements for x in params[p - 1] if x.name in shared and x in params[0]
        )
    if layout.zero == 3:  # each dp rank exchanges its shard of the copies
        tied_elements = ceil_div(tied_elements, dp)
    tied_bytes = tied_elements * g_b
    if tied_bytes:
        pp_exposed += 2 * p2p_time(tied_bytes, pl.latency_s, p2p_bandwidth)
    norm_bytes = 8  # one float64: the squared gradient norm
    pp_exposed += all_reduce_time(norm_bytes, pl)
    # The loss averaged for the log (sum and count, float64): over pp, then over dp.
    loss_bytes = 16
    pp_exposed += all_reduce_time(loss_bytes, pl)

    # Tensor parallelism beyond the microbatches: sequence-parallel replicated gradients and
    # the gradient norm, once per step.
    tl = links["tp"]
    tp_step_s = all_reduce_time(norm_bytes, tl)
    tp_step_bytes = {d: (norm_bytes if tp > 1 else 0) for d in positions}
    if layout.sequence_parallel and tp > 1:
        # Parameters every tp rank holds whole saw only its part of the sequence: their
        # gradients are all-reduced over tp, one tensor per call (`parallel.runtime`).
        for d in positions:
            sizes = [x.elements for x in params[d] if not x.tp_split]
            tp_step_bytes[d] += sum(sizes) * g_b
            if d == slowest:
                tp_step_s += sum(all_reduce_time(n * g_b, tl) for n in sizes)
    elif tp > 1:
        # Replicated parameters applied to each rank's heads alone (per-head norms).
        for d in positions:
            sizes = [x.elements for x in params[d] if x.tp_partial]
            tp_step_bytes[d] += sum(sizes) * g_b
            if d == slowest:
                tp_step_s += sum(all_reduce_time(n * g_b, tl) for n in sizes)

    # Data parallelism: gradient reduction (and ZeRO gathers) on each device; the slowest counts.
    # A MoE's experts are reduced (and sharded) over their edp group, in buckets of their own.
    cap = max(1, int(layout.bucket_mb * MIB))
    dl = links["dp"]
    edp = dp // layout.ep
    groups = ((False, dp, links["dp"]), (True, edp, links["edp"]))
    dp_exposed, dp_bytes, optimizer_s = 0.0, 0, 0.0
    for d in positions:
        exposed, nbytes, whole, last, mine = 0.0, 0, 0.0, 0.0, 0.0
        for expert, n, link in groups:
            elements = model.device_elements(d, expert)
            mine += elements / n if layout.zero >= 1 else elements
            if n == 1 or not elements or layout.zero == 3:
                continue
            # The buckets `parallel.data_parallel` plans (ZeRO-1/2 pad each to n equal chunks).
            buckets = model.buckets(d, cap, g_b, expert)
            chunks = [ceil_div(b, n) for b in buckets]
            if layout.zero == 0:
                op, sent = all_reduce_time, [b * g_b for b in buckets]
                nbytes += sum(buckets) * g_b
            else:
                op, sent = reduce_scatter_time, [n * c * g_b for c in chunks]
                nbytes += sum(chunks) * (n * g_b + w_b)  # reduce-scatter input, gathered shard
            # Buckets mostly share one size: time each size once.
            lat = dev.call_latency
            whole += sum(k * (op(size, link) + lat) for size, k in Counter(sent).items())
            # Backward fills the buckets in reverse order; the last one (the model's first
            # parameters, dense) is reduced after it, the others can hide behind the last
            # microbatch.
            if not expert:
                last = op(sent[-1], link) + lat
            if layout.zero >= 1:
                exposed += sum(
                    k * (all_gather_time(n * c * w_b, link) + lat)
                    for c, k in Counter(chunks).items()
                )
        if whole:
            window = ticks[d].backward
            exposed += max(last, whole - window) if options.overlap_dp else whole
        if dp > 1 and layout.zero == 3:  # gather before each forward, recomputation, backward
            exposed, nbytes = _zero3_exposed(dev, model.device_pieces(d), dp, w_b, edp, options)
            exposed, nbytes = m * exposed, m * nbytes
        if dp > 1 and layout.zero >= 1:  # the norm's terms live on different dp ranks
            exposed += all_reduce_time(norm_bytes, dl)
            nbytes += norm_bytes
        elif layout.ep > 1:  # the experts' terms live on different ep ranks
            exposed += all_reduce_time(norm_bytes, links["ep"])
        exposed += all_reduce_time(loss_bytes, dl)
        dp_exposed = max(dp_exposed, exposed)
        dp_bytes = max(dp_bytes, nbytes)
        optimizer_s = max(optimizer_s, optimizer_time(mine, len(params[d]), work, profile))

    compute = m * (tick.compute_f + tick.compute_b)
    cp_exposed = m * tick.cp_time
    ep_exposed = m * tick.ep_time
    tp_exposed = m * (tick.comm_f + tick.comm_b) - cp_exposed - ep_exposed
    tp_exposed += tp_step_s if tp > 1 else 0.0
    step = compute + tp_exposed + cp_exposed + ep_exposed + bubble + pp_exposed + dp_exposed
    step += optimizer_s
    breakdown = {
        "compute": compute,
        "optimizer": optimizer_s,
        "tp_exposed": tp_exposed,
        "cp_exposed": cp_exposed,
        "ep_exposed": ep_exposed,
        "pp_exposed": pp_exposed,
        "dp_exposed": dp_exposed,
        "bubble": bubble,
    }

    # Model FLOPs over every GPU: an uneven router moves work between ranks, not its total.
    balanced = model
    if work.moe_imbalance != 1.0:
        balanced = staged_model(
            config, layout, work.dtype, work.seq(config), attention=work.attention
        )
    flops = _step_flops(balanced, layout)
    world = layout.world_size
    memory = max(
        (_memory(model, layout, d, work, options) for d in positions), key=lambda x: x.total
    )
    capacity = profile.device.usable_memory_bytes
    tp_bytes = max(m * ticks[d].tp_bytes + tp_step_bytes[d] for d in positions)
    cp_bytes = max(m * ticks[d].cp_bytes for d in positions)
    ep_bytes = max(m * ticks[d].ep_bytes for d in positions)
    if layout.ep > 1 and layout.zero == 0:  # the experts' share of the gradient norm
        ep_bytes += norm_bytes
    pp_bytes = 0
    if p > 1:
        pp_bytes = max(
            m * pipeline_sends(model.placement, d) * message
            + (tied_bytes if d in (0, p - 1) else 0)
            + norm_bytes
            for d in positions
        )
    return Projection(
        step_time_s=step,
        breakdown_s=breakdown,
        tflops_per_gpu=flops.model / (step * world) / 1e12,
        hardware_tflops_per_gpu=flops.hardware / (step * world) / 1e12,
        mfu=flops.model / (step * world * peak),
        hfu=flops.hardware / (step * world * peak),
        bubble_fraction=bubble / step,
        memory_per_gpu=memory.as_dict(),
        memory_capacity_bytes=capacity,
        fits=memory.total <= capacity,
        comm_bytes={"tp": tp_bytes, "pp": pp_bytes, "dp": dp_bytes, "cp": cp_bytes, "ep": ep_bytes},
        model_flops_per_step=flops.model,
        hardware_flops_per_step=flops.hardware,
        tokens_per_step=layout.global_batch * s,
        world_size=world,
        links={axis: link.describe() for axis, link in links.items()},
        price_per_gpu_hour=profile.price_per_gpu_hour,
        pipeline_model=pipeline_model,
    )


def optimizer_time(
    elements: float, tensors: int, work: Workload, profile: HardwareProfile
) -> float:
    """One optimizer step on one device over `elements` parameters in `tensors` tensors: a
    memory-bound sweep of the gradient, optimizer state and weights (read and written), times the
    device's `optimizer_traffic`, plus its `optimizer_overhead_us` per tensor."""
    w_b, g_b, o_b = state_bytes_per_param(work.dtype, work.optimizer)
    d = profile.device
    sweep = elements * (g_b + 2 * o_b + 2 * w_b) * d.optimizer_traffic / d.hbm_bytes_per_s
    return sweep + tensors * d.optimizer_overhead_us * 1e-6


def _step_flops(model: StagedModel, lay: Layout) -> StepFlops:
    """Model FLOPs (the GEMMs of forward and backward) and hardware FLOPs (with what
    recomputation runs again) of one step over every GPU, from the traced pieces: one rank's
    GEMMs are 1/tp of its stage's."""
    model_flops = recomputed = 0
    for stage in range(model.num_stages):
        for piece, count in model.stage_pieces(stage):
            model_flops += count * piece.flops
            recomputed += count * piece.recomputed_flops
    scale = lay.tp * lay.dp * lay.cp * lay.microbatches  # every rank's pieces
    return StepFlops(model=scale * model_flops, hardware=scale * (model_flops + recomputed))


def _memory(
    model: StagedModel,
    lay: Layout,
    device: int,
    work: Workload,
    framework: Framework | None = None,
) -> MemoryPerGPU:
    """Memory of pipeline rank `device` by category: the model state of the parameters it
    holds (sharded as the ZeRO stage says) and the activations it keeps for backward at its
    peak. The pieces' saved bytes times the block-microbatches in flight are alive at the end of
    a forward, with the ends' (the embeddings' output waits for each microbatch in flight, as
    every block's does; the head's lives for one microbatch); during a backward the head's are
    gone and recomputation rebuilds one block. The peak is the larger of the two."""
    w, g, o = state_bytes_per_param(work.dtype, work.optimizer)
    params = grads = opt = 0
    # Dense parameters are sharded over dp × cp, a MoE's experts over their edp group.
    for expert, n in ((False, lay.dp * lay.cp), (True, lay.dp * lay.cp // lay.ep)):
        count = model.device_elements(device, expert)
        params += ceil_div(count * w, n) if lay.zero >= 3 else count * w
        grads += ceil_div(count * g, n) if lay.zero >= 2 else count * g
        opt += ceil_div(count * o, n) if lay.zero >= 1 else count * o
    block = model.piece("block")
    # From the schedule itself: the most block-microbatches alive between a forward and its
    # backward on this device, and the most microbatches alive on the first stage.
    layers, in_flight = peak_in_flight_layers(lay, device, model.stage_blocks)
    ends_forward = ends_backward = 0.0
    for stage in model.device_stages(device):
        first, last = stage == 0, stage == model.num_stages - 1
        for piece in model.ends(stage):
            ends_forward += piece.saved_bytes * (in_flight if first and not last else 1.0)
        if first:
            ends_backward += model.piece("first").saved_bytes * in_flight
    rebuilt = block.peak_bytes - block.saved_bytes  # what recomputation brings back
    blocks = block.saved_bytes * layers
    acts = max(blocks + ends_forward, blocks + rebuilt + ends_backward)
    if framework is None:  # the tensors alone, as civetta's engine counts them
        return MemoryPerGPU(params, grads, opt, int(acts))
    gathered = _gathered_bytes(block, lay, framework, w, g)
    reserve = framework.allocator_reserve * (acts + gathered)
    return MemoryPerGPU(params, grads, opt, int(acts), gathered, int(reserve))


def _gathered_bytes(block: Piece, lay: Layout, framework: Framework, w: int, g: int) -> int:
    """ZeRO-3's whole parameters alive at once: the unit computing and the `zero3_prefetch`
    units gathered ahead, plus one unit's whole gradient before its reduce-scatter. A unit is a
    layer's parameters, or per op its largest tensor's (a weight; its bias is small)."""
    if lay.zero != 3 or lay.dp * lay.cp == 1:
        return 0
    dense = [p.elements for p in block.params if not p.expert]
    unit = sum(dense) if framework.zero3_unit == "layer" else max(dense, default=0)
    return unit * ((1 + framework.zero3_prefetch) * w + g)


def layout_schedule(layout: Layout) -> Schedule:
    """The layout's schedule: a file's (checked when the config was read), or its generator's,
    built once per pipeline shape (`parallel.cost.replay.cached_schedule`)."""
    if is_schedule_file(layout.schedule):
        return schedule_of(layout)
    return cached_schedule(layout.schedule, layout.pp, layout.microbatches, layout.virtual_stages)


# A generated schedule's peaks stop growing once its warm-up, one steady period and its cool-down
# fit (tests/test_cost.py checks this for every generator): the tuner walks a schedule of at most
# this many microbatches per pipeline rank instead of building one for every batch.
SATURATION = 4


@functools.lru_cache(maxsize=4096)
def _peak_in_flight(
    shape: tuple[Any, ...], layout: Layout, device: int, stage_blocks: tuple[int, ...]
) -> tuple[int, int]:
    m, pp = layout.microbatches, layout.pp
    if layout.schedule in ("gpipe", "1f1b", "zb-h1"):  # one stage per rank: closed forms
        # GPipe keeps every microbatch alive; 1F1B and ZB-H1 (whose I passes follow 1F1B) the
        # pp - device of their warm-up (tests/test_cost.py checks both against the walk).
        alive = m if layout.schedule == "gpipe" else min(pp - device, m)
        return alive * stage_blocks[device], alive * (device == 0)
    if is_schedule_file(layout.schedule) or m <= SATURATION * pp:
        schedule = layout_schedule(layout)
    else:
        schedule = cached_schedule(
            layout.schedule, layout.pp, SATURATION * layout.pp, layout.virtual_stages
        )
    alive_layers = peak_layers = alive_first = peak_first = 0
    for action in schedule.actions[device]:
        weight = stage_blocks[action.stage]
        if action.kind == "F":
            alive_layers += weight
            alive_first += action.stage == 0
            peak_layers = max(peak_layers, alive_layers)
            peak_first = max(peak_first, alive_first)
        elif action.kind in ("B", "I"):
            alive_layers -= weight
            alive_first -= action.stage == 0
    return peak_layers, peak_first


def peak_in_flight_layers(
    layout: Layout, device: int, stage_blocks: tuple[int, ...]
) -> tuple[int, int]:
    """(block-microbatches, first-stage microbatches) alive at their peaks on `device`, walking
    its actions in the layout's schedule: a forward keeps its stage's blocks until the stage's
    backward (B, or the input-gradient half I) frees them."""
    shape = (layout.schedule, layout.pp, layout.microbatches, layout.virtual_stages)
    shape += (layout.schedule_actions, layout.placement)
    first = _first_layout.setdefault(shape, layout)  # one per schedule shape: the cache stays small
    return _peak_in_flight(shape, first, device, stage_blocks)


_first_layout: dict[tuple[Any, ...], Layout] = {}


def device_memory_of(
    config: ModelDescription,
    layout: Layout,
    device: int,
    work: Workload | None = None,
    framework: Framework | None = None,
) -> MemoryPerGPU:
    """Memory of the GPU at pipeline position `device` (0 = first) under `layout`: the tensors
    alone, or with `framework`, as that software allocates them (`_memory`)."""
    return devices_memory_of(config, layout, [device], work, framework)[0]


def devices_memory_of(
    config: ModelDescription,
    layout: Layout,
    devices: Sequence[int],
    work: Workload | None = None,
    framework: Framework | None = None,
) -> list[MemoryPerGPU]:
    """`device_memory_of` for several pipeline positions, the layout checked once."""
    work = work or Workload()
    if framework is not None:
        work = dataclasses.replace(work, attention=framework.attention)
    checked(config, layout, work)
    model = staged_model(
        config, layout, work.dtype, work.seq(config), work.moe_imbalance, work.attention
    )
    return [_memory(model, layout, device, work, framework) for device in devices]


def microbatch_times(
    config: ModelDescription, layout: Layout, profile: HardwareProfile, work: Workload | None = None
) -> StageTimes:
    """One microbatch's forward and backward seconds on the busiest pipeline device (all its
    stages, tensor-parallel collectives included): the compute side of `project`, exposed for
    calibrating a profile against measured times (`parallel.cost.calibration`)."""
    work = work or Workload()
    checked(config, layout, work)
    profile = profile.for_ranks(layout.world_size)
    model = staged_model(
        config, layout, work.dtype, work.seq(config), work.moe_imbalance, work.attention
    )
    links = _group_links(layout.mesh, profile)
    dev = _Device(model, work, profile, links, layout, PRESETS["civetta"])
    devices = [dev.ticks(model.device_pieces(d)) for d in sorted({0, layout.pp - 1})]
    return max((t.times() for t in devices), key=lambda t: t.forward_s + t.backward_s)
