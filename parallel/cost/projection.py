"""The analytic cost model: one training step of the GPT, projected onto a hardware profile.

Nothing is executed. For a layout (dp × tp × pp, microbatches, schedule, ZeRO, recomputation,
sequence parallelism) the model builds every pipeline stage's time for one microbatch from its
exact GEMMs (`parallel.cost.flops`), memory-bound elementwise traffic and tensor-parallel
collectives (`parallel.cost.collectives`), replays the actual pipeline schedule with those times
and the p2p time of each message (`parallel.cost.replay`, a discrete-event replay of
`parallel.schedules`), adds the exposed data-parallel communication and the optimizer step, and
reports throughput, MFU/HFU, memory per GPU by category (`parallel.cost.memory`) and bytes per
axis.

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
  parameter tensor; op dispatch costs per graph node (`engine_nodes`): both are what dominates
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
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

from civetta.models.gpt import GPTConfig
from parallel.cost.collectives import (
    GroupLink,
    all_gather_time,
    all_reduce_time,
    group_link,
    p2p_time,
    reduce_scatter_time,
)
from parallel.cost.flops import (
    ATTENTION_CORE,
    Gemm,
    head_gemm,
    layer_gemms,
    step_flops,
)
from parallel.cost.hardware import CostModelError, HardwareProfile, LinkSpec
from parallel.cost.memory import (
    ELEMENT_BYTES,
    MemoryPerGPU,
    block_activation_bytes,
    ceil_div,
    device_memory,
    device_params,
    device_tensors,
    element_bytes,
    state_bytes_per_param,
)
from parallel.cost.replay import (
    PipelineTimes,
    Replay,
    StageTimes,
    pipeline_time,
    replayed_makespan,
)
from parallel.data_parallel import plan_buckets
from parallel.layout import Layout, LayoutError
from parallel.mesh import MeshLayout

MIB = 1 << 20
OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class Workload:
    """What one step computes beside how it is split (the `Layout`): the training dtype, the
    optimizer, and the tokens per sequence (default: the model's block)."""

    dtype: str = "bf16"
    optimizer: str = "adamw"
    seq_len: int | None = None

    def check(self) -> None:
        """Refuse what the cost model cannot price, with one bare line naming the value."""
        if self.dtype not in ELEMENT_BYTES:
            raise CostModelError(
                f"train.dtype expected one of {' | '.join(ELEMENT_BYTES)}, got {self.dtype!r}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise CostModelError(
                f"train.optimizer expected one of {' | '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )

    def seq(self, config: GPTConfig) -> int:
        return self.seq_len or config.block_size


def checked(config: GPTConfig, layout: Layout, work: Workload) -> None:
    """The one check of a projection's inputs: the layout's (`Layout.check`) and the
    workload's, as `CostModelError`s."""
    try:
        layout.check(config, work.seq_len)
    except LayoutError as exc:
        raise CostModelError(str(exc)) from None
    work.check()


@dataclass(frozen=True)
class CostOptions:
    """Software behaviour the layout does not say (defaults: a modern framework)."""

    # Gradient buckets reduced during the last backward, ZeRO-3 gathers prefetched behind compute.
    overlap_dp: bool = True
    # Megatron-LM §4.1: each tp rank sends 1/tp of a pipeline message over its own network
    # adapter and the receiving node all-gathers it over NVLink. civetta's executor sends whole.
    pp_scatter_gather: bool = False
    # Discrete-event replay of the schedule (parallel.cost.replay); None: closed forms.
    replay: Replay | None = replayed_makespan


# How civetta's executor runs a step: the gradient all-reduce waits for the last backward, and
# each ZeRO-3 gather for its op.
CIVETTA_EXECUTOR = CostOptions(overlap_dp=False)


def executor_options(profile: HardwareProfile) -> CostOptions:
    """The software a projection assumes by default: civetta's own executor on this machine's
    profile (`local`, as `civetta calibrate` names it), a framework that overlaps its
    communication with compute on a cluster's."""
    return CIVETTA_EXECUTOR if profile.name == "local" else CostOptions()


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

    def training(self, tokens: int) -> dict[str, float]:
        """Steps, wall-clock seconds, GPU-hours and cost of training on `tokens` tokens."""
        steps = math.ceil(tokens / self.tokens_per_step)
        wall = steps * self.step_time_s
        gpu_hours = wall * self.world_size / 3600
        return {
            "tokens": tokens,
            "steps": steps,
            "wall_time_s": wall,
            "gpu_hours": gpu_hours,
            "cost": gpu_hours * self.price_per_gpu_hour,
        }

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

    @property
    def forward(self) -> float:
        return self.compute_f + self.comm_f

    @property
    def backward(self) -> float:
        return self.compute_b + self.comm_b

    def times(self) -> StageTimes:
        return StageTimes(self.forward, self.backward, self.wgrad)


def engine_nodes(config: GPTConfig, tp: int) -> tuple[int, int]:
    """Autograd nodes civetta's engine builds per microbatch on one rank: (one block, the
    embedding with the head and the loss), as counted by tests/test_cost_vs_run.py. Tensor
    parallelism adds the region boundaries and the split bias adds of each block, and the
    reductions of the vocabulary-parallel loss."""
    bias = int(config.bias)
    if tp == 1:
        return 28 + 4 * bias, 9 + 2 * bias
    return 32 + 8 * bias, 25 + 2 * bias


class _Device:
    """Timing of the pieces of the model on one tensor-parallel rank."""

    def __init__(
        self,
        config: GPTConfig,
        layout: Layout,
        work: Workload,
        profile: HardwareProfile,
        tp_link: GroupLink,
    ) -> None:
        self.config, self.layout, self.profile, self.tp_link = config, layout, profile, tp_link
        self.work = work
        self.s = work.seq(config)
        self.b = layout.microbatch_size
        self.e = element_bytes(work.dtype)
        self.hbm = profile.device.hbm_bytes_per_s
        self.traffic = profile.device.elementwise_traffic
        # The fixed cost of dispatching ops: the profile's is one block's on one rank; a layout
        # that builds more graph nodes (the redirections of tensor parallelism, the
        # vocabulary-parallel loss) pays in proportion.
        block_nodes, rest_nodes = engine_nodes(config, layout.tp)
        per_node = profile.device.layer_overhead_us * 1e-6 / engine_nodes(config, 1)[0]
        self.overhead = per_node * block_nodes
        self.rest_overhead = per_node * rest_nodes
        self.backward_ratio = profile.device.backward_elementwise_ratio
        self.hidden_bytes = self.b * self.s * config.n_embd * self.e  # one (b, s, h) activation

    def gemm(self, g: Gemm) -> float:
        return self.profile.gemm_time(g.flops, g.nbytes(self.e), self.work.dtype)

    # tp collectives of one (b, s, h) activation, as civetta's redirections issue them
    def _enter(self) -> tuple[float, float, int, int]:
        """(forward, backward) seconds and ledger bytes of entering a tp region."""
        x, link = self.hidden_bytes, self.tp_link
        if link.size == 1:
            return 0.0, 0.0, 0, 0
        if self.layout.sequence_parallel:  # all-gather forward, reduce-scatter backward
            return all_gather_time(x, link), reduce_scatter_time(x, link), x // link.size, x
        return 0.0, all_reduce_time(x, link), 0, x  # copy forward, all-reduce backward

    def _exit(self) -> tuple[float, float, int, int]:
        x, link = self.hidden_bytes, self.tp_link
        if link.size == 1:
            return 0.0, 0.0, 0, 0
        if self.layout.sequence_parallel:  # reduce-scatter forward, all-gather backward
            return reduce_scatter_time(x, link), all_gather_time(x, link), x, x // link.size
        return all_reduce_time(x, link), 0.0, x, 0  # all-reduce forward, identity backward

    def block(self) -> _Tick:
        """One transformer block, one microbatch."""
        c, lay, tp = self.config, self.layout, self.layout.tp
        gemms = layer_gemms(c, self.b, self.s, tp)
        fwd = sum(self.gemm(g) for g in gemms)
        dgrad = sum(self.gemm(g.backward()[0]) for g in gemms)
        wgrad = sum(self.gemm(g.backward()[1]) for g in gemms)
        acts = block_activation_bytes(
            c, self.b, self.s, tp, lay.sequence_parallel, "none", self.work.dtype
        )
        elem_f = self.traffic * acts / self.hbm + self.overhead
        # Two regions per block (attention, MLP), each entered and exited once.
        en_f, en_b, en_fb, en_bb = self._enter()
        ex_f, ex_b, ex_fb, ex_bb = self._exit()
        comm_f, comm_b = 2 * (en_f + ex_f), 2 * (en_b + ex_b)
        fwd_bytes, bwd_bytes = 2 * (en_fb + ex_fb), 2 * (en_bb + ex_bb)
        tick = _Tick(
            compute_f=fwd + elem_f,
            comm_f=comm_f,
            compute_b=dgrad + wgrad + self.backward_ratio * elem_f,
            comm_b=comm_b,
            wgrad=wgrad,
            tp_bytes=fwd_bytes + bwd_bytes,
        )
        if lay.recompute == "full":
            tick.compute_b += fwd + elem_f
            tick.comm_b += comm_f
            tick.tp_bytes += fwd_bytes
        elif lay.recompute == "selective":
            # Scores, softmax and values again: their GEMMs and the a·s² elementwise traffic.
            core = sum(self.gemm(g) for g in gemms if g.name in ATTENTION_CORE)
            kept = block_activation_bytes(
                c, self.b, self.s, tp, lay.sequence_parallel, "selective", self.work.dtype
            )
            tick.compute_b += core + self.traffic * (acts - kept) / self.hbm
        return tick

    def embedding(self) -> _Tick:
        """Token + position lookup; the vocabulary-parallel lookup leaves the tp region."""
        f, b, fb, bb = self._exit()
        # No matmul: two (b, s, h) reads (token and position rows) and the sum written.
        return _Tick(
            compute_f=self.hidden_bytes * 3 / self.hbm, comm_f=f, comm_b=b, tp_bytes=fb + bb
        )

    def head(self) -> _Tick:
        """Final layer norm, logits and the vocabulary-parallel cross-entropy; the fixed
        overhead of the embedding's few ops is folded into it."""
        c, tp = self.config, self.layout.tp
        g = head_gemm(c, self.b, self.s, tp)
        dgrad, wgrad = (self.gemm(x) for x in g.backward())
        logits_bytes = 4 * self.b * self.s * c.vocab_size / tp  # fp32 for the loss
        elem_f = self.traffic * (logits_bytes + self.hidden_bytes) / self.hbm + self.rest_overhead
        en_f, en_b, en_fb, en_bb = self._enter()
        # max, sum of exponentials and the target logit: three all-reduces of (b, s) values
        small = self.b * self.s * self.e
        ce = 3 * all_reduce_time(small, self.tp_link)
        ce_bytes = 3 * small if self.tp_link.size > 1 else 0
        return _Tick(
            compute_f=self.gemm(g) + elem_f,
            comm_f=en_f + ce,
            compute_b=dgrad + wgrad + self.backward_ratio * elem_f,
            comm_b=en_b,
            wgrad=wgrad,
            tp_bytes=en_fb + en_bb + ce_bytes,
        )


def _combine(parts: list[tuple[_Tick, int]]) -> _Tick:
    total = _Tick()
    for tick, count in parts:
        for name in ("compute_f", "comm_f", "compute_b", "comm_b", "wgrad", "tp_bytes"):
            setattr(total, name, getattr(total, name) + count * getattr(tick, name))
    return total


def _bucketed(
    total_bytes: int, bucket_bytes: int, op: Callable[[float, GroupLink], float], link: GroupLink
) -> tuple[float, float]:
    """(all buckets, the last bucket) seconds of a bucketed collective."""
    if total_bytes == 0 or link.size == 1:
        return 0.0, 0.0
    full, rest = divmod(total_bytes, bucket_bytes)
    whole = full * op(bucket_bytes, link) + (op(rest, link) if rest else 0.0)
    return whole, op(min(bucket_bytes, total_bytes), link)


_LINKS: dict[tuple[MeshLayout, int, LinkSpec, LinkSpec], dict[str, GroupLink]] = {}


def _group_links(mesh: MeshLayout, profile: HardwareProfile) -> dict[str, GroupLink]:
    """The link of each axis, memoised: finding a spanning group's bottleneck visits every rank,
    and a tuner projects many layouts of the same mesh."""
    key = (mesh, profile.gpus_per_node, profile.intra_node, profile.inter_node)
    if key not in _LINKS:
        if len(_LINKS) > 512:
            _LINKS.clear()
        _LINKS[key] = {axis: group_link(mesh, axis, profile) for axis in ("tp", "dp", "pp")}
    return _LINKS[key]


def replicated_tensors(config: GPTConfig, pp: int, device: int) -> list[int]:
    """Element counts of the parameters a tensor-parallel rank holds whole at pipeline position
    `device`: layer norms, row-parallel biases, positions. Under sequence parallelism each saw
    only this rank's part of the sequence, so its gradient is all-reduced over tp, one tensor
    per call (`parallel.runtime`)."""
    h, bias = config.n_embd, bool(config.bias)
    norm = [h, h] if bias else [h]
    block = norm * 2 + ([h, h] if bias else [])  # ln_1, ln_2, attn.c_proj.bias, mlp.c_proj.bias
    sizes = block * (config.n_layer // pp)
    if device == 0:
        sizes.append(config.block_size * h)  # transformer.wpe
    if device == pp - 1:
        sizes += norm  # ln_f
    return sizes


def pipeline_sends(pp: int, virtual_stages: int, device: int) -> int:
    """Messages pipeline rank `device` sends per microbatch: an activation from each of its
    stages but the last, a gradient from each but the first."""
    if pp == 1:
        return 0
    stages = range(device, pp * virtual_stages, pp)
    last = pp * virtual_stages - 1
    return sum((s < last) + (s > 0) for s in stages)


@lru_cache(maxsize=256)
def _tensors(
    config: GPTConfig, tp: int, pp: int, device: int, v: int
) -> tuple[tuple[str, int], ...]:
    return tuple(device_tensors(config, tp, pp, device, v))


@lru_cache(maxsize=256)
def _buckets(
    config: GPTConfig, tp: int, pp: int, device: int, v: int, cap: int, element: int
) -> tuple[int, ...]:
    """Elements per gradient bucket of one rank, as `parallel.data_parallel` plans them
    (memoised: a tuner projects the same model many times)."""
    tensors = _tensors(config, tp, pp, device, v)
    sizes = dict(tensors)
    plan = plan_buckets([(name, n * element) for name, n in tensors], cap)
    return tuple(sum(sizes[name] for name in names) for names in plan)


@lru_cache(maxsize=1024)
def _zero3_shards(
    config: GPTConfig, tp: int, pp: int, device: int, v: int, dp: int
) -> tuple[int, int]:
    """(elements one rank gathers per pass over its ops, of which in blocks) under ZeRO-3:
    each parameter padded to dp equal chunks; a tied embedding used by the lookup and the head
    on one device counts for each."""
    tensors = _tensors(config, tp, pp, device, v)
    shard = sum(ceil_div(n, dp) for _, n in tensors)
    if config.tie_embeddings and pp == 1:
        shard += ceil_div(dict(tensors)["transformer.wte.weight"], dp)
    blocks = sum(ceil_div(n, dp) for name, n in tensors if name.startswith("transformer.h."))
    return shard, blocks


@lru_cache(maxsize=1024)
def zero3_ops(
    config: GPTConfig, tp: int, pp: int, device: int, v: int, dp: int
) -> tuple[tuple[int, bool], ...]:
    """(elements of the padded shards one rank contributes, in a block?) of each op that holds
    parameters under ZeRO-3, one all-gather and one reduce-scatter each (`parallel.zero`): a
    linear gathers its weight and bias together, but a row-parallel linear (tp > 1) adds its
    whole bias after the all-reduce, in an op of its own; a layer norm scales and shifts in two
    ops; each embedding is one op, and a tied head on the embedding's device is one more."""
    ops: dict[str, int] = {}
    for name, n in _tensors(config, tp, pp, device, v):
        module = name.rsplit(".", 1)[0]
        apart = "ln_" in module or (tp > 1 and module.endswith("c_proj"))
        key = name if apart else module
        ops[key] = ops.get(key, 0) + ceil_div(n, dp)
    out = [(n, key.startswith("transformer.h.")) for key, n in ops.items()]
    if config.tie_embeddings and pp == 1:  # (ZeRO-3 runs without pipelining)
        out.append((ops["transformer.wte"], False))
    return tuple(out)


def _zero3_bytes(config: GPTConfig, layout: Layout, device: int, w_b: int, g_b: int) -> int:
    """Ledger bytes of one microbatch under ZeRO-3 (`parallel.zero`): every op all-gathers its
    parameters' shards before its forward and again before its backward, full recomputation
    gathers the blocks' once more, and each op reduce-scatters its parameters' padded
    gradients."""
    dp = layout.dp
    shard, blocks = _zero3_shards(config, layout.tp, layout.pp, device, layout.virtual_stages, dp)
    gathered = 2 * shard + (blocks if layout.recompute == "full" else 0)
    return gathered * w_b + dp * shard * g_b


# ---- the projection -----------------------------------------------------------------------------
def project(
    config: GPTConfig,
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
    work = work or Workload()
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
    config: GPTConfig,
    layout: Layout,
    work: Workload,
    profile: HardwareProfile,
    options: CostOptions,
    peak: float,
) -> Projection:
    """`project` on a profile as each rank sees it (`HardwareProfile.for_ranks`)."""
    links = _group_links(layout.mesh, profile)
    dev = _Device(config, layout, work, profile, links["tp"])
    p, m, v, dp, tp = layout.pp, layout.microbatches, layout.virtual_stages, layout.dp, layout.tp
    s = dev.s
    num_stages = p * v
    blocks_per_stage = config.n_layer // num_stages
    w_b, g_b, _ = state_bytes_per_param(work.dtype, work.optimizer)

    block, embed, head = dev.block(), dev.embedding(), dev.head()
    # Three kinds of stage: the first (with the embedding), the last (the head), the others.
    kinds = {
        (first, last): _combine([(block, blocks_per_stage), (embed, first), (head, last)])
        for first, last in {(int(k == 0), int(k == num_stages - 1)) for k in range(num_stages)}
    }
    stage_ticks = [kinds[int(k == 0), int(k == num_stages - 1)] for k in range(num_stages)]
    # The devices that differ: the first (embedding), the last (head), and a middle one.
    positions = sorted({0, p - 1} | ({1} if p > 2 else set()))
    ticks = {d: _combine([(t, 1) for t in stage_ticks[d::p]]) for d in positions}
    slowest = max(positions, key=lambda d: ticks[d].forward + ticks[d].backward)
    tick = ticks[slowest]

    # Pipeline messages: one (b, s, h) activation forward, its gradient backward.
    message = dev.hidden_bytes // (tp if layout.sequence_parallel else 1)
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
    bubble, pp_exposed, pipeline_model = pipeline_time(
        layout.schedule, p, m, v, times, options.replay
    )
    # After backward: the first and last stage exchange their tied embedding gradients (one
    # message each way, one after the other), then the gradient norm is all-reduced.
    tied = config.tie_embeddings and p > 1
    tied_elements = config.vocab_size * config.n_embd // tp
    if layout.zero == 3:  # each dp rank exchanges its shard of the copies
        tied_elements = ceil_div(tied_elements, dp)
    tied_bytes = tied_elements * g_b if tied else 0
    if tied:
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
        for d in positions:
            sizes = replicated_tensors(config, p, d)
            tp_step_bytes[d] += sum(sizes) * g_b
            if d == slowest:
                tp_step_s += sum(all_reduce_time(n * g_b, tl) for n in sizes)

    # Data parallelism: gradient reduction (and ZeRO gathers) on each device; the slowest counts.
    cap = max(1, int(layout.bucket_mb * MIB))
    dl = links["dp"]
    dp_exposed, dp_bytes, optimizer_s = 0.0, 0, 0.0
    for d in positions:
        params = device_params(config, tp, p, d)
        exposed, nbytes = 0.0, 0
        if dp > 1 and layout.zero <= 2:
            # The buckets `parallel.data_parallel` plans (ZeRO-1/2 pad each to dp equal chunks).
            buckets = _buckets(config, tp, p, d, v, cap, g_b)
            chunks = [ceil_div(b, dp) for b in buckets]
            if layout.zero == 0:
                op, sent = all_reduce_time, [b * g_b for b in buckets]
                nbytes = sum(buckets) * g_b
            else:
                op, sent = reduce_scatter_time, [dp * c * g_b for c in chunks]
                nbytes = sum(chunks) * (dp * g_b + w_b)  # reduce-scatter input, gathered shard
            # Buckets mostly share one size: time each size once.
            whole = sum(k * op(size, dl) for size, k in Counter(sent).items())
            # Backward fills the buckets in reverse order; the last one (the model's first
            # parameters) is reduced after it, the others can hide behind the last microbatch.
            last = op(sent[-1], dl)
            window = ticks[d].backward
            exposed = max(last, whole - window) if options.overlap_dp else whole
            if layout.zero >= 1:
                exposed += sum(
                    k * all_gather_time(dp * c * w_b, dl) for c, k in Counter(chunks).items()
                )
        elif dp > 1:  # ZeRO-3: gather before each forward, recomputation and backward
            # Op by op, one collective each (so latency counts per op): a framework prefetches
            # them behind the microbatch's compute; civetta's executor waits for each.
            again = layout.recompute == "full"
            traffic = sum(
                (2 + (again and in_block)) * all_gather_time(dp * n * w_b, dl)
                + reduce_scatter_time(dp * n * g_b, dl)
                for n, in_block in zero3_ops(config, tp, p, d, v, dp)
            )
            busy = ticks[d].forward + ticks[d].backward
            exposed = m * (max(0.0, traffic - busy) if options.overlap_dp else traffic)
            nbytes = m * _zero3_bytes(config, layout, d, w_b, g_b)
        if dp > 1 and layout.zero >= 1:  # the norm's terms live on different dp ranks
            exposed += all_reduce_time(norm_bytes, dl)
            nbytes += norm_bytes
        exposed += all_reduce_time(loss_bytes, dl)
        dp_exposed = max(dp_exposed, exposed)
        dp_bytes = max(dp_bytes, nbytes)
        mine = params / dp if layout.zero >= 1 else params
        tensors = len(device_tensors(config, tp, p, d, v))
        optimizer_s = max(optimizer_s, optimizer_time(mine, tensors, work, profile))

    compute = m * (tick.compute_f + tick.compute_b)
    tp_exposed = m * (tick.comm_f + tick.comm_b) + (tp_step_s if tp > 1 else 0.0)
    step = compute + tp_exposed + bubble + pp_exposed + dp_exposed + optimizer_s
    breakdown = {
        "compute": compute,
        "optimizer": optimizer_s,
        "tp_exposed": tp_exposed,
        "pp_exposed": pp_exposed,
        "dp_exposed": dp_exposed,
        "bubble": bubble,
    }

    flops = step_flops(config, layout.global_batch, s, layout.recompute)
    world = layout.world_size
    memory = max(
        (device_memory_of(config, layout, d, work) for d in sorted({0, p - 1})),
        key=lambda mem: mem.total,
    )
    capacity = profile.device.usable_memory_bytes
    tp_bytes = max(m * ticks[d].tp_bytes + tp_step_bytes[d] for d in positions)
    pp_bytes = 0
    if p > 1:
        pp_bytes = max(
            m * pipeline_sends(p, v, d) * message
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
        comm_bytes={"tp": tp_bytes, "pp": pp_bytes, "dp": dp_bytes},
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


def device_memory_of(
    config: GPTConfig, layout: Layout, device: int, work: Workload | None = None
) -> MemoryPerGPU:
    """Memory of the GPU at pipeline position `device` (0 = first) under `layout`."""
    work = work or Workload()
    return device_memory(
        config,
        device=device,
        dp=layout.dp,
        tp=layout.tp,
        pp=layout.pp,
        microbatch=layout.microbatch_size,
        microbatches=layout.microbatches,
        seq_len=work.seq(config),
        schedule=layout.schedule,
        virtual_stages=layout.virtual_stages,
        sequence_parallel=layout.sequence_parallel,
        zero=layout.zero,
        recompute=layout.recompute,
        dtype=work.dtype,
        optimizer=work.optimizer,
    )


def microbatch_times(
    config: GPTConfig, layout: Layout, profile: HardwareProfile, work: Workload | None = None
) -> StageTimes:
    """One microbatch's forward and backward seconds on the busiest pipeline device (all its
    stages, tensor-parallel collectives included): the compute side of `project`, exposed for
    calibrating a profile against measured times (`parallel.cost.calibration`)."""
    work = work or Workload()
    checked(config, layout, work)
    profile = profile.for_ranks(layout.world_size)
    dev = _Device(config, layout, work, profile, _group_links(layout.mesh, profile)["tp"])
    p = layout.pp
    blocks = config.n_layer // p
    block, embed, head = dev.block(), dev.embedding(), dev.head()
    devices = [
        _combine([(block, blocks), (embed, int(d == 0)), (head, int(d == p - 1))])
        for d in sorted({0, p - 1})
    ]
    return max((t.times() for t in devices), key=lambda t: t.forward_s + t.backward_s)
