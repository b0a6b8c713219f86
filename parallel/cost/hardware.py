"""Hardware profiles for the cost model: one device, the link inside a node, the network between
nodes, and a price, as frozen dataclasses. `launch.profiles` reads them from
`configs/hardware/*.yaml` (a bad file or value is one `CostModelError` line naming the key, what
was expected and what was given); the cost model only takes them as arguments.

Every bandwidth is in GB/s (1e9 bytes per second) per GPU and per direction; latencies are in
microseconds; peaks are dense tensor throughput in TFLOP/s (1e12 FLOP per second).

The compute side is a small roofline with three calibrated numbers:

- a GEMM of F FLOPs that moves B bytes takes ``max(F / (peak · gemm_max_efficiency),
  B / (memory_bandwidth · memory_efficiency)) + kernel_overhead``, so the achieved fraction of
  peak rises with size and saturates at ``gemm_max_efficiency`` (`gemm_efficiency` below);
- everything that is not a GEMM (layer norm, softmax, GELU, dropout, residual adds, casts) is
  memory-bound: ``elementwise_traffic`` bytes of HBM traffic per byte of activation a layer
  stores, at ``memory_bandwidth · memory_efficiency``, plus an optional fixed
  ``layer_overhead_us`` per layer and microbatch (the dispatch of many small ops: what dominates
  civetta's own numpy engine on small models); backward takes ``backward_elementwise_ratio``
  (default 2) times forward's non-GEMM time;
- the optimizer step sweeps each rank's state once, ``optimizer_traffic`` times the bytes a
  fused optimizer moves (default 1), plus ``optimizer_overhead_us`` per parameter tensor.

`configs/hardware/local.yaml` is written by `civetta calibrate` from measurements of this
machine (one core = one "GPU", the machine one node; its ``oversubscribed`` section says how
more ranks than cores share them); the GPU profiles carry datasheet figures and a few numbers
fitted to published runs, and a board power (datasheet TDP) and PUE (an assumption) for the
energy of a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

# Peaks are looked up by the experiment's train.dtype (float32 means strict FP32, not TF32).
DTYPES = ("float64", "float32", "tf32", "bf16", "fp16")


class CostModelError(ValueError):
    """A bad hardware profile or a layout the cost model cannot project; one line for the user."""


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    peak_tflops: dict[str, float]
    memory_gib: float
    memory_bandwidth_gbs: float
    memory_efficiency: float
    gemm_max_efficiency: float
    kernel_overhead_us: float
    elementwise_traffic: float
    memory_reserved_gib: float = 0.0
    # Fixed time of one layer's non-GEMM ops per microbatch, forward (kernel launches on a GPU,
    # op dispatch in civetta's interpreted engine); 0 where elementwise_traffic absorbs it.
    layer_overhead_us: float = 0.0
    # Backward's non-GEMM time over forward's: 2 when backward moves twice the bytes.
    backward_elementwise_ratio: float = 2.0
    # The optimizer step: its memory traffic over one read and write of the state a fused
    # optimizer moves (1 on a GPU; numpy's one-op-at-a-time update moves several times that),
    # and a fixed cost per parameter tensor (norm, clipping and update dispatched one by one).
    optimizer_traffic: float = 1.0
    optimizer_overhead_us: float = 0.0
    # What a fused (flash) attention kernel reaches of the dense peak: its products run tile by
    # tile with the softmax between them, far below a large GEMM's efficiency.
    attention_efficiency: float = 0.5

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)

    @property
    def usable_memory_bytes(self) -> int:
        """What a training process can fill: capacity minus context, NCCL buffers, fragments."""
        return int((self.memory_gib - self.memory_reserved_gib) * 2**30)

    def peak_flops(self, dtype: str) -> float:
        if dtype not in self.peak_tflops:
            known = ", ".join(sorted(self.peak_tflops))
            raise CostModelError(
                f"error: device {self.name} has no peak for dtype {dtype!r} (has {known})"
            )
        return self.peak_tflops[dtype] * 1e12

    @property
    def hbm_bytes_per_s(self) -> float:
        """Achievable memory bandwidth (bytes/s)."""
        return self.memory_bandwidth_gbs * 1e9 * self.memory_efficiency


@dataclass(frozen=True)
class LinkSpec:
    name: str
    bandwidth_gbs: float  # per GPU, per direction
    latency_us: float
    efficiency: float  # achieved fraction of the nominal bandwidth by the collective library

    @property
    def bytes_per_s(self) -> float:
        return self.bandwidth_gbs * 1e9 * self.efficiency

    @property
    def latency_s(self) -> float:
        return self.latency_us * 1e-6


@dataclass(frozen=True)
class Oversubscription:
    """A machine that runs more ranks than it has cores (only `local`: civetta on a CPU).

    The ranks time-share the cores: each computes at cores / ranks of one, further slowed by
    `compute_stretch` (switches, caches shared by more processes), and every collective runs at
    the latency and bandwidth measured with `ranks` ranks on the machine.
    """

    ranks: int  # the world size these numbers were measured with
    compute_stretch: float
    latency_us: float
    bandwidth_gbs: float


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    device: DeviceSpec
    intra_node: LinkSpec
    inter_node: LinkSpec
    gpus_per_node: int
    price_per_gpu_hour: float
    source: str = ""
    oversubscribed: Oversubscription | None = None
    # Calibrated behaviour of a framework on this cluster (`civetta fit`): preset name → the
    # `parallel.cost.framework` keys it changes, applied whenever that preset is projected here.
    frameworks: dict[str, dict[str, Any]] = field(default_factory=dict, hash=False, compare=False)
    # What `civetta fit` fitted, on which reference rows, and what those rows cover.
    calibration: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    # Energy (parallel.cost.run_cost): the GPU board's rated power in watts and the facility's
    # power usage effectiveness. Optional and given together: a profile without them (`local`,
    # a CPU core whose share of the package power nobody measured) has no energy figure.
    board_power_w: float | None = None
    pue: float | None = None

    def for_ranks(self, world: int, own_cores: bool = False) -> HardwareProfile:
        """The profile as each of `world` ranks sees it. Unchanged unless the profile is one
        machine that `world` oversubscribes (`oversubscribed`, and more ranks than cores): then
        the machine stays one node, each rank's device is slowed by its share of a core times the
        stretch (every rate divided, every fixed overhead multiplied; by the stretch alone with
        `own_cores`, the bound of a rank whose core-mates are idle), holds its share of the
        memory, and every link is the oversubscribed one."""
        over, cores = self.oversubscribed, self.gpus_per_node
        if over is None or world <= cores:
            return self
        slow = (1 if own_cores else world / cores) * over.compute_stretch
        d = self.device
        device = replace(
            d,
            name=f"{d.name}, {world} ranks on {cores} cores",
            peak_tflops={dtype: peak / slow for dtype, peak in d.peak_tflops.items()},
            memory_gib=d.memory_gib * cores / world,
            memory_reserved_gib=d.memory_reserved_gib * cores / world,
            memory_bandwidth_gbs=d.memory_bandwidth_gbs / slow,
            kernel_overhead_us=d.kernel_overhead_us * slow,
            layer_overhead_us=d.layer_overhead_us * slow,
            optimizer_overhead_us=d.optimizer_overhead_us * slow,
        )
        link = LinkSpec(
            f"{self.intra_node.name}, {world} ranks on {cores} cores",
            over.bandwidth_gbs,
            over.latency_us,
            1.0,
        )
        return replace(self, device=device, intra_node=link, inter_node=link, gpus_per_node=world)

    def gemm_time(self, flops: float, nbytes: float, dtype: str) -> float:
        """Seconds of one GEMM kernel of `flops` FLOPs moving `nbytes` bytes: roofline + launch."""
        d = self.device
        compute = flops / (d.peak_flops(dtype) * d.gemm_max_efficiency)
        memory = nbytes / d.hbm_bytes_per_s
        return max(compute, memory) + d.kernel_overhead_us * 1e-6

    def gemm_efficiency(self, m: int, k: int, n: int, dtype: str, element_bytes: int) -> float:
        """Achieved fraction of peak for an (m × k) @ (k × n) GEMM: the size-dependent curve."""
        flops = 2.0 * m * k * n
        nbytes = element_bytes * (m * k + k * n + m * n)
        return flops / (self.gemm_time(flops, nbytes, dtype) * self.device.peak_flops(dtype))
