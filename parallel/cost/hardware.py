"""Hardware profiles for the cost model: one device, the link inside a node, the network between
nodes, and a price, read from `configs/hardware/*.yaml` into frozen dataclasses.

Every bandwidth is in GB/s (1e9 bytes per second) per GPU and per direction; latencies are in
microseconds; peaks are dense tensor throughput in TFLOP/s (1e12 FLOP per second). A bad file or
value is one `CostModelError` line naming the key, what was expected and what was given.

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
fitted to published runs.
"""

from __future__ import annotations

import difflib
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

# Peaks are looked up by the experiment's train.dtype (float32 means strict FP32, not TF32).
DTYPES = ("float64", "float32", "tf32", "bf16", "fp16")
PROFILE_DIR = Path(__file__).resolve().parents[2] / "configs" / "hardware"


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


# ---- loading ------------------------------------------------------------------------------------
def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _number(key: str, value: Any, *, positive: bool = True, at_most: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CostModelError(f"error: {key} expected a number, got {_describe(value)}")
    if (positive and value <= 0) or (not positive and value < 0):
        bound = "> 0" if positive else ">= 0"
        raise CostModelError(f"error: {key} expected a number {bound}, got {value!r}")
    if at_most is not None and value > at_most:
        raise CostModelError(f"error: {key} expected a number <= {at_most}, got {value!r}")
    return float(value)


def _section(raw: dict[str, Any], key: str, prefix: str = "") -> dict[str, Any]:
    name = f"{prefix}{key}"
    if key not in raw:
        raise CostModelError(f"error: hardware profile is missing '{name}'")
    value = raw[key]
    if not isinstance(value, dict):
        raise CostModelError(f"error: {name} expected a mapping, got {_describe(value)}")
    return value


def _check_keys(raw: dict[str, Any], allowed: list[str], prefix: str) -> None:
    for key in raw:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise CostModelError(f"error: unknown key '{prefix}{key}' in hardware profile{hint}")


def _build(cls: type, raw: dict[str, Any], prefix: str, numbers: dict[str, dict]) -> Any:
    names = [f.name for f in fields(cls)]
    _check_keys(raw, names, prefix)
    values: dict[str, Any] = {}
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        if f.name not in raw:
            if f.default is not MISSING:
                continue
            raise CostModelError(f"error: hardware profile is missing '{key}'")
        value = raw[f.name]
        if f.name in numbers:
            values[f.name] = _number(key, value, **numbers[f.name])
        elif f.name == "name":
            if not isinstance(value, str) or not value:
                raise CostModelError(f"error: {key} expected a name, got {_describe(value)}")
            values[f.name] = value
        else:
            values[f.name] = value
    return cls(**values)


def profile_from_dict(raw: Any, origin: str = "hardware profile") -> HardwareProfile:
    """Validate a parsed YAML mapping into a HardwareProfile."""
    if not isinstance(raw, dict):
        raise CostModelError(f"error: {origin} expected a mapping, got {_describe(raw)}")
    top = ["name", "source", "device", "intra_node", "inter_node", "gpus_per_node"]
    _check_keys(raw, [*top, "price_per_gpu_hour", "oversubscribed"], "")
    fraction = {"at_most": 1.0}
    dev_raw = _section(raw, "device")
    peaks = dev_raw.get("peak_tflops")
    if not isinstance(peaks, dict) or not peaks:
        raise CostModelError(
            f"error: device.peak_tflops expected a mapping of dtype to TFLOP/s, "
            f"got {_describe(peaks)}"
        )
    for dtype, value in peaks.items():
        if dtype not in DTYPES:
            raise CostModelError(
                f"error: device.peak_tflops.{dtype} is not a dtype "
                f"(expected one of {' | '.join(DTYPES)})"
            )
        _number(f"device.peak_tflops.{dtype}", value)
    device = _build(
        DeviceSpec,
        {**dev_raw, "peak_tflops": {k: float(v) for k, v in peaks.items()}},
        "device.",
        {
            "memory_gib": {},
            "memory_bandwidth_gbs": {},
            "memory_efficiency": fraction,
            "gemm_max_efficiency": fraction,
            "kernel_overhead_us": {"positive": False},
            "elementwise_traffic": {"positive": False},
            "memory_reserved_gib": {"positive": False},
            "layer_overhead_us": {"positive": False},
            "backward_elementwise_ratio": {},
            "optimizer_traffic": {},
            "optimizer_overhead_us": {"positive": False},
        },
    )
    if device.memory_reserved_gib >= device.memory_gib:
        raise CostModelError(
            f"error: device.memory_reserved_gib={device.memory_reserved_gib} leaves no memory "
            f"of device.memory_gib={device.memory_gib}"
        )
    link_numbers = {"bandwidth_gbs": {}, "latency_us": {"positive": False}, "efficiency": fraction}
    intra = _build(LinkSpec, _section(raw, "intra_node"), "intra_node.", link_numbers)
    inter = _build(LinkSpec, _section(raw, "inter_node"), "inter_node.", link_numbers)
    gpus = raw.get("gpus_per_node")
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise CostModelError(f"error: gpus_per_node expected a positive integer, got {gpus!r}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise CostModelError(f"error: name expected a profile name, got {_describe(name)}")
    price = _number("price_per_gpu_hour", raw.get("price_per_gpu_hour", 0.0), positive=False)
    source = raw.get("source", "")
    over = None
    if "oversubscribed" in raw:
        over_raw = _section(raw, "oversubscribed")
        over = _build(
            Oversubscription,
            over_raw,
            "oversubscribed.",
            {"compute_stretch": {}, "latency_us": {"positive": False}, "bandwidth_gbs": {}},
        )
        ranks = over_raw.get("ranks")
        if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks <= gpus:
            raise CostModelError(
                f"error: oversubscribed.ranks expected an integer above gpus_per_node={gpus}, "
                f"got {ranks!r}"
            )
    return HardwareProfile(name, device, intra, inter, gpus, price, str(source or ""), over)


def resolve_profile_path(name_or_path: str | Path) -> Path:
    """A path to a YAML file, or the name of a shipped profile (`a100-dgx`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = PROFILE_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
    raise CostModelError(
        f"error: hardware profile {str(name_or_path)!r} is neither a file nor one of "
        f"{', '.join(known) or '(none shipped)'}"
    )


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """Read and validate a hardware profile by shipped name or by path."""
    path = resolve_profile_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise CostModelError(f"error: {path}{where}: invalid YAML") from None
    return profile_from_dict(raw, origin=str(path))
