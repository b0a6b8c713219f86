"""Measuring this machine for a `local` hardware profile, and fitting the profile's numbers.

What is measured (`launch/calibrate.py` runs each measurement in the process it belongs to, then
writes `configs/hardware/local.yaml`):

- GEMM time over sizes (sgemm and dgemm through numpy's BLAS, one thread: one core is one
  "GPU"), fitted to the roofline-plus-overhead curve of `HardwareProfile.gemm_time`;
- memory bandwidth: a large array copy and add;
- civetta's own engine: forward and backward of small GPTs, whose time beyond the fitted GEMMs
  gives the profile's elementwise numbers (traffic per activation byte, a fixed overhead per
  layer, backward over forward), fitted through the cost model's own formulas
  (`parallel.cost.projection.microbatch_times`);
- the optimizer step (gradient norm, clipping, AdamW) over tensors of several counts and sizes,
  fitted to `parallel.cost.projection.optimizer_time` (traffic multiplier, fixed cost per tensor);
- the collectives of the local MPI over a group of ranks (all-reduce, all-gather,
  reduce-scatter and a point-to-point ping-pong through `parallel.comm`), fitted to the
  alpha-beta formulas of `parallel.cost.collectives`;
- more ranks than cores: a fixed chunk of engine work alone on a core, then chunks and
  all-reduces in turn on twice as many ranks as cores, fitted to the profile's `oversubscribed`
  numbers (how much a rank's compute stretches beyond its share of a core, and the latency and
  bandwidth of its collectives).

Every timing is the best of several repetitions: other processes on the machine only ever slow a
run down, so the minimum is the closest to what the hardware does (the oversubscribed loops
excepted: sharing a core is the slowing down they measure, so they take means; and the engine's
passes, which take medians: they stand for a typical step). Fits minimise a squared log
error (every size counts the same, whatever its duration) that penalises predicting slower than
measured more than faster, for the same reason. Nothing here prints, reads YAML or starts
processes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from civetta.models.gpt import GPT, GPTConfig
from civetta.optim import AdamW, clip_coefficient
from civetta.tensor import Tensor
from parallel.cost.collectives import (
    GroupLink,
    all_gather_time,
    all_reduce_time,
    p2p_time,
    reduce_scatter_time,
)
from parallel.cost.hardware import HardwareProfile
from parallel.cost.projection import Workload, microbatch_times, optimizer_time
from parallel.layout import Layout
from parallel.runtime import Runtime

NUMPY_DTYPES = {"float32": np.float32, "float64": np.float64}


def best_time(fn: Callable[[], Any], min_time_s: float = 0.005, repeats: int = 25) -> float:
    """Seconds per call of `fn`: the best over `repeats` batches of calls, each batch long
    enough (`min_time_s`) for the clock to resolve it."""
    start = time.perf_counter()
    fn()  # warm-up: first-touch page faults, BLAS thread start
    once = max(time.perf_counter() - start, 1e-7)
    per_batch = max(1, int(min_time_s / once))
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(per_batch):
            fn()
        best = min(best, (time.perf_counter() - start) / per_batch)
    return best


# ---- GEMMs --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GemmSample:
    """`batch` (m × k) @ (k × n) products timed as one call."""

    m: int
    k: int
    n: int
    dtype: str
    seconds: float
    batch: int = 1

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n * self.batch

    def nbytes(self) -> int:
        size = np.dtype(NUMPY_DTYPES[self.dtype]).itemsize
        return size * self.batch * (self.m * self.k + self.k * self.n + self.m * self.n)

    @property
    def flops_per_s(self) -> float:
        return self.flops / self.seconds


def gemm_shapes(quick: bool = False) -> list[tuple[int, int, int, int]]:
    """(batch, m, k, n): squares over sizes, and the shapes a GPT's layers run (tokens × hidden
    against hidden × 3, 1, 4 hidden; batched attention scores)."""
    squares = (32, 128, 512) if quick else (16, 32, 64, 128, 256, 512, 1024)
    shapes = [(1, n, n, n) for n in squares]
    hiddens = (64, 256) if quick else (32, 64, 128, 256, 512)
    for h in hiddens:
        tokens = 1024
        shapes += [(1, tokens, h, 3 * h), (1, tokens, h, h), (1, tokens, h, 4 * h)]
        shapes += [(1, tokens, 4 * h, h)]
    for s, hd in ((64, 16), (128, 64)) if quick else ((32, 8), (64, 16), (128, 32), (128, 64)):
        shapes.append((16, s, hd, s))
    return shapes


def measure_gemms(
    shapes: Sequence[tuple[int, int, int, int]], dtype: str, min_time_s: float = 0.05
) -> list[GemmSample]:
    """Time `a @ b` into a preallocated result, as civetta's fused linear runs it."""
    rng = np.random.default_rng(0)
    np_dtype = NUMPY_DTYPES[dtype]
    samples = []
    for batch, m, k, n in shapes:
        lead = (batch,) if batch > 1 else ()
        a = rng.standard_normal((*lead, m, k)).astype(np_dtype)
        b = rng.standard_normal((*lead, k, n)).astype(np_dtype)
        out = np.empty((*lead, m, n), np_dtype)
        seconds = best_time(lambda a=a, b=b, out=out: np.matmul(a, b, out=out), min_time_s)
        samples.append(GemmSample(m, k, n, dtype, seconds, batch))
    return samples


@dataclass(frozen=True)
class GemmFit:
    """time = max(flops / rate, bytes / memory rate) + overhead."""

    rate_flops: float
    overhead_s: float
    rms_log_error: float  # root-mean-square of ln(predicted / measured)
    max_error: float  # largest |predicted / measured - 1|


# Other processes only ever slow a timing down: a prediction slower than a measurement is
# penalised this many times more than one faster, so the fit follows the fast envelope.
SLOWER_PENALTY = 4.0


def _loss(predicted: np.ndarray, measured: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean asymmetric squared log error."""
    r = np.log(predicted / measured)
    return np.mean(np.where(r > 0, SLOWER_PENALTY, 1.0) * r * r, axis=axis)


def _log_grid(low: float, high: float, points: int) -> np.ndarray:
    return np.exp(np.linspace(math.log(low), math.log(high), points))


def fit_gemm(
    samples: Sequence[GemmSample], memory_bytes_per_s: float, overhead_s: float | None = None
) -> GemmFit:
    """Fit rate and overhead (or the rate alone, the overhead given) by a coarse-to-fine grid
    search in log space: two parameters, a few dozen samples, no optimiser needed."""
    flops = np.array([s.flops for s in samples], dtype=float)
    nbytes = np.array([s.nbytes() for s in samples], dtype=float)
    measured = np.array([s.seconds for s in samples])
    memory = nbytes / memory_bytes_per_s
    best_rate = max(s.flops_per_s for s in samples)
    rates = _log_grid(best_rate / 4, best_rate * 2, 121)
    overheads = (
        np.array([overhead_s])
        if overhead_s is not None
        else np.concatenate([[0.0], _log_grid(1e-8, measured.min(), 120)])
    )
    for _ in range(3):  # refine twice around the best point
        pred = (
            np.maximum(flops[None, None, :] / rates[:, None, None], memory)
            + overheads[None, :, None]
        )
        loss = _loss(pred, measured, axis=2)
        i, j = np.unravel_index(np.argmin(loss), loss.shape)
        rate, overhead = rates[i], overheads[j]
        rates = _log_grid(rate / 1.1, rate * 1.1, 41)
        if overhead_s is None and overhead > 0:
            overheads = np.concatenate([[0.0], _log_grid(overhead / 1.5, overhead * 1.5, 41)])
    pred = np.maximum(flops / rate, memory) + overhead
    ratio = pred / measured
    return GemmFit(
        float(rate),
        float(overhead),
        float(np.sqrt(np.mean(np.log(ratio) ** 2))),
        float(np.max(np.abs(ratio - 1))),
    )


# ---- memory bandwidth ---------------------------------------------------------------------------
def measure_bandwidth(nbytes: int = 256 << 20) -> dict[str, float]:
    """GB/s of a copy (2 bytes moved per byte) and an add (3) of float32 arrays of `nbytes`:
    larger than any cache, so they stream from memory."""
    n = nbytes // 4
    a, b, c = np.ones(n, np.float32), np.ones(n, np.float32), np.empty(n, np.float32)
    copy = best_time(lambda: np.copyto(c, a), min_time_s=0.0, repeats=7)
    add = best_time(lambda: np.add(a, b, out=c), min_time_s=0.0, repeats=7)
    return {"copy_gbs": 2 * a.nbytes / copy / 1e9, "add_gbs": 3 * a.nbytes / add / 1e9}


# ---- civetta's engine ---------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineSample:
    """One microbatch of a GPT through civetta's engine: best forward and backward seconds."""

    config: GPTConfig
    batch: int
    forward_s: float
    backward_s: float


def engine_models(quick: bool = False) -> list[tuple[GPTConfig, int]]:
    """Small GPTs for the elementwise fit: several widths, lengths and depths (the quickstart's
    own size is left out, so predicting it is not a fit)."""
    shapes = [  # (n_embd, n_head, block_size, n_layer, batch)
        (32, 4, 32, 2, 8),
        (32, 4, 32, 6, 8),
        (128, 4, 64, 2, 8),
        (96, 4, 128, 2, 4),
        (256, 4, 128, 2, 4),
        (64, 4, 128, 2, 4),
        (48, 4, 64, 3, 8),
        (64, 4, 32, 4, 16),
        (128, 4, 32, 2, 16),
        (96, 4, 64, 2, 8),
    ]
    if quick:
        shapes = shapes[:5]
    return [
        (GPTConfig(vocab_size=256, block_size=s, n_layer=layers, n_head=heads, n_embd=h), b)
        for h, heads, s, layers, b in shapes
    ]


def measure_engine(
    models: Sequence[tuple[GPTConfig, int]], repeats: int = 8, dtype: str = "float32"
) -> list[EngineSample]:
    """Median forward (loss) and backward seconds of one batch through each model. The median,
    not the best: what the cost model predicts from these is a typical training step (the
    median step a run reports), and a pass of hundreds of small ops is seldom its best."""
    rng = np.random.default_rng(0)
    samples = []
    for config, batch in models:
        model = GPT(config, seed=0, dtype=NUMPY_DTYPES[dtype])
        x = rng.integers(0, config.vocab_size, (batch, config.block_size))
        y = rng.integers(0, config.vocab_size, (batch, config.block_size))
        forward, backward = [], []
        for i in range(repeats + 1):
            start = time.perf_counter()
            loss = model(x, y)
            middle = time.perf_counter()
            loss.backward()
            end = time.perf_counter()
            model.zero_grad()
            if i:  # the first pass warms the allocator up
                forward.append(middle - start)
                backward.append(end - middle)
        samples.append(
            EngineSample(config, batch, float(np.median(forward)), float(np.median(backward)))
        )
    return samples


def _nonnegative_fit(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares of `a @ x = y` for two non-negative coefficients: where the free fit makes
    one negative, it is held at zero and the other refitted alone."""
    solution, *_ = np.linalg.lstsq(a, y, rcond=None)
    if solution.min() < 0:
        keep = int(np.argmax(solution))
        only, *_ = np.linalg.lstsq(a[:, [keep]], y, rcond=None)
        solution = np.zeros(2)
        solution[keep] = max(0.0, float(only[0]))
    return solution


@dataclass(frozen=True)
class ElementwiseFit:
    traffic: float  # device.elementwise_traffic
    layer_overhead_s: float  # device.layer_overhead_us · 1e-6
    backward_ratio: float  # device.backward_elementwise_ratio
    max_error: float  # largest |predicted / measured - 1| of forward + backward


def engine_times(config: GPTConfig, batch: int, profile: HardwareProfile) -> tuple[float, float]:
    """The cost model's (forward, backward) seconds of one float32 microbatch on one device."""
    times = microbatch_times(config, Layout(microbatch_size=batch), profile, Workload("float32"))
    return times.forward_s, times.backward_s


def fit_elementwise(
    samples: Sequence[EngineSample],
    profile: HardwareProfile,
    times: Callable[[GPTConfig, int, HardwareProfile], tuple[float, float]] = engine_times,
) -> ElementwiseFit:
    """Fit the profile's elementwise numbers to the engine's measured times.

    `times(config, batch, profile)` is the cost model's (forward, backward) of one microbatch
    on one device. It is linear in the elementwise traffic and the layer overhead, so three
    evaluations per sample (both zero, each alone) give the GEMM part and the two basis terms;
    forward fixes traffic and overhead by non-negative least squares on relative error, then
    backward's non-GEMM time over forward's gives the ratio.
    """

    def variant(traffic: float, overhead_us: float, ratio: float = 1.0) -> HardwareProfile:
        device = dataclasses.replace(
            profile.device,
            elementwise_traffic=traffic,
            layer_overhead_us=overhead_us,
            backward_elementwise_ratio=ratio,
        )
        return dataclasses.replace(profile, device=device)

    base, per_traffic, per_overhead, rows, targets = [], [], [], [], []
    for s in samples:
        f0, b0 = times(s.config, s.batch, variant(0.0, 0.0))
        f1, _ = times(s.config, s.batch, variant(1.0, 0.0))
        f2, _ = times(s.config, s.batch, variant(0.0, 1.0))
        base.append((f0, b0))
        per_traffic.append(f1 - f0)
        # f2 - f0 is the model's time for 1 µs of overhead per layer: × 1e6, per second of it.
        per_overhead.append((f2 - f0) * 1e6)
        # Relative error: divide each row by the measured forward.
        rows.append([(f1 - f0) / s.forward_s, (f2 - f0) * 1e6 / s.forward_s])
        targets.append((s.forward_s - f0) / s.forward_s)
    solution = _nonnegative_fit(np.array(rows), np.array(targets))
    traffic, overhead = float(solution[0]), float(solution[1])  # overhead in seconds
    fwd_extra = [traffic * t + overhead * o for t, o in zip(per_traffic, per_overhead, strict=True)]
    bwd_extra = [s.backward_s - b0 for s, (_, b0) in zip(samples, base, strict=True)]
    weights = [1 / s.backward_s**2 for s in samples]  # relative least squares for the ratio
    num = sum(w * f * b for w, f, b in zip(weights, fwd_extra, bwd_extra, strict=True))
    den = sum(w * f * f for w, f in zip(weights, fwd_extra, strict=True))
    ratio = max(0.1, num / den) if den > 0 else 2.0
    fitted = variant(traffic, overhead * 1e6, ratio)
    errors = []
    for s in samples:
        f, b = times(s.config, s.batch, fitted)
        errors.append(abs((f + b) / (s.forward_s + s.backward_s) - 1))
    return ElementwiseFit(traffic, overhead, ratio, max(errors))


# ---- the optimizer step -------------------------------------------------------------------------
@dataclass(frozen=True)
class OptimizerSample:
    """Best seconds of one optimizer step over `tensors` float32 tensors of `elements` each."""

    tensors: int
    elements: int
    seconds: float


def optimizer_shapes(quick: bool = False) -> list[tuple[int, int]]:
    """(tensors, elements per tensor): many small tensors expose the fixed cost per tensor, a
    few large ones the bytes. Up to 1 MiB per array, what the small models trained here hold: a
    state far beyond the caches sweeps several times slower (not modelled)."""
    shapes = [(96, 64), (64, 1024), (32, 4096), (16, 16384), (8, 65536), (4, 262144)]
    return shapes[::2] if quick else shapes


def measure_optimizer(
    shapes: Sequence[tuple[int, int]], repeats: int = 10
) -> list[OptimizerSample]:
    """The end of a single-process `civetta train` step, timed: the global gradient norm,
    clipping (every step clips: the gradients are large), the AdamW update and dropping the
    gradients, through the same functions the trainer calls."""
    runtime = Runtime()
    rng = np.random.default_rng(0)
    samples = []
    for count, elements in shapes:
        params = {
            f"layer{i}.weight": Tensor(rng.standard_normal(elements, dtype=np.float32))
            for i in range(count)
        }
        grads = {name: rng.standard_normal(elements, dtype=np.float32) for name in params}
        optimizer = AdamW(params, lr=1e-4)

        def step(params: dict[str, Tensor] = params, grads: dict[str, np.ndarray] = grads,
                 optimizer: AdamW = optimizer) -> None:  # fmt: skip
            synced = runtime.synchronize_gradients(grads)
            norm = math.sqrt(runtime.global_grad_sq_norm(synced))
            coef = clip_coefficient(norm, 1.0)
            optimizer.step({name: g * g.dtype.type(coef) for name, g in synced.items()})
            for p in params.values():
                p.grad = None

        seconds = best_time(step, min_time_s=0.002, repeats=repeats)
        samples.append(OptimizerSample(count, elements, seconds))
    return samples


@dataclass(frozen=True)
class OptimizerFit:
    traffic: float  # device.optimizer_traffic
    overhead_s: float  # device.optimizer_overhead_us · 1e-6
    max_error: float  # largest |predicted / measured - 1|


def fit_optimizer(samples: Sequence[OptimizerSample], profile: HardwareProfile) -> OptimizerFit:
    """The profile's optimizer numbers by non-negative least squares on relative error, through
    the cost model's own formula (`parallel.cost.projection.optimizer_time`, linear in both)."""
    work = Workload(dtype="float32", optimizer="adamw")

    def predict(traffic: float, overhead_us: float, s: OptimizerSample) -> float:
        device = dataclasses.replace(
            profile.device, optimizer_traffic=traffic, optimizer_overhead_us=overhead_us
        )
        variant = dataclasses.replace(profile, device=device)
        return optimizer_time(s.tensors * s.elements, s.tensors, work, variant)

    rows = [[predict(1.0, 0.0, s) / s.seconds, predict(0.0, 1.0, s) / s.seconds] for s in samples]
    solution = _nonnegative_fit(np.array(rows), np.ones(len(samples)))
    traffic, overhead_us = float(solution[0]), float(solution[1])
    errors = [abs(predict(traffic, overhead_us, s) / s.seconds - 1) for s in samples]
    return OptimizerFit(traffic, overhead_us * 1e-6, max(errors))


# ---- collectives --------------------------------------------------------------------------------
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "p2p")


def message_sizes(quick: bool = False) -> list[int]:
    """Bytes from 64 B to 16 MiB (4 MiB when quick), two points per decade and a half."""
    top = 22 if quick else 24
    return [1 << e for e in range(6, top + 1, 2)]


def measure_collectives(
    group: Any,
    sizes: Sequence[int],
    repeats: int = 10,
    flush_bytes: int = 64 << 20,
) -> dict[str, list[tuple[int, float]]]:
    """Per collective, (bytes, seconds) over `sizes`, on every rank of `group` (a
    `parallel.comm.Group`; collective: all its ranks call this).

    Bytes are the size the collectives model takes: the all-reduce buffer, the gathered
    result, the reduce-scatter input, the message. Each call is timed alone, after every rank
    has overwritten `flush_bytes` of scratch memory and met at a barrier: in a training step a
    collective follows compute that has evicted its buffers from the caches, and a warm
    repeated call is two to three times faster than that (measured here). A call's time is the
    slowest rank's (the collective ends when the last rank has its result), the best of
    `repeats`. The point-to-point time is half a ping-pong between group ranks 0 and 1.
    """
    n = group.size
    scratch = np.empty(max(1, flush_bytes // 4), np.float32)
    results: dict[str, list[tuple[int, float]]] = {op: [] for op in COLLECTIVES}
    for size in sizes:
        elements = max(n, size // 4 // n * n)  # float32, divisible by the group size
        full = np.ones(elements, np.float32)
        shard = np.ones(elements // n, np.float32)
        out = np.empty_like(full)
        calls: dict[str, Callable[[], Any]] = {
            "all_reduce": lambda full=full, out=out: group.all_reduce(full, out=out),
            "all_gather": lambda shard=shard, out=out: group.all_gather(shard, out=out),
            "reduce_scatter": lambda full=full: group.reduce_scatter(full),
            "p2p": lambda full=full: _ping_pong(group, full),
        }
        for op, call in calls.items():
            call()  # warm-up: first-touch pages, MPI connection set-up
            best = math.inf
            for _ in range(repeats):
                scratch.fill(1.0)  # evict the caches, as a step's compute would
                group.barrier()
                start = time.perf_counter()
                call()
                elapsed = np.array([time.perf_counter() - start])
                best = min(best, float(group.all_reduce(elapsed, op="max")[0]))
            results[op].append((full.nbytes, best / 2 if op == "p2p" else best))
    return results


def _ping_pong(group: Any, buffer: np.ndarray) -> None:
    if group.rank == 0:
        group.send(buffer, 1)
        group.recv(buffer.shape, buffer.dtype, 1, out=buffer)
    elif group.rank == 1:
        group.recv(buffer.shape, buffer.dtype, 0, out=buffer)
        group.send(buffer, 0)


def collective_time(op: str, nbytes: float, link: GroupLink) -> float:
    """The collectives model's time of `op` (p2p: one message) over `link`."""
    if op == "all_reduce":
        return all_reduce_time(nbytes, link)
    if op == "all_gather":
        return all_gather_time(nbytes, link)
    if op == "reduce_scatter":
        return reduce_scatter_time(nbytes, link)
    return p2p_time(nbytes, link.latency_s, link.bytes_per_s)


def _grid_search(
    loss: Callable[[float, float], float],
    latencies: np.ndarray,
    bandwidths: np.ndarray,
    bounds: tuple[float, float] = (0.0, math.inf),
) -> tuple[float, float]:
    """(latency, bandwidth) of least `loss` over the grids, refined twice around the best point
    (each time ±50%, 15 points a side, in log space); latency at least `bounds[0]`, bandwidth
    at most `bounds[1]`."""
    floor, ceiling = bounds
    best = (math.inf, 0.0, 0.0)
    for _ in range(3):
        for latency in np.maximum(latencies, floor):
            for bandwidth in np.minimum(bandwidths, ceiling):
                value = loss(float(latency), float(bandwidth))
                if value < best[0]:
                    best = (value, float(latency), float(bandwidth))
        _, latency, bandwidth = best
        latencies = _log_grid(latency / 1.5, latency * 1.5, 15)
        bandwidths = _log_grid(bandwidth / 1.5, bandwidth * 1.5, 15)
    return best[1], best[2]


@dataclass(frozen=True)
class LinkFit:
    latency_s: float
    bytes_per_s: float
    rms_log_error: float
    max_error: float


# Larger messages leave this machine's caches and move slower than the alpha-beta line of the
# sizes training sends; they are measured and reported, not fitted.
FIT_MAX_BYTES = 4 << 20


def fit_link(
    samples: dict[str, list[tuple[int, float]]], group_size: int, max_bytes: int = FIT_MAX_BYTES
) -> LinkFit:
    """Per-hop latency and bandwidth that best predict every given collective through the
    collectives model (ring or tree, whichever it picks), by grid search in log space, on
    messages up to `max_bytes`."""
    points = [
        (op, nbytes, t)
        for op, rows in samples.items()
        for nbytes, t in rows
        if t > 0 and nbytes <= max_bytes
    ]
    measured = np.array([t for _, _, t in points])
    shortest = float(measured.min())
    latencies = _log_grid(shortest / 200, shortest * 2, 61)
    fastest = max(nbytes / t for _, nbytes, t in points)
    bandwidths = _log_grid(fastest / 20, fastest * 20, 61)

    def predict(latency: float, bandwidth: float) -> np.ndarray:
        link = GroupLink("calibration", group_size, False, group_size, "", latency, bandwidth)
        return np.array([collective_time(op, nbytes, link) for op, nbytes, _ in points])

    latency, bandwidth = _grid_search(
        lambda lat, bw: float(_loss(predict(lat, bw), measured)), latencies, bandwidths
    )
    ratio = predict(latency, bandwidth) / measured
    return LinkFit(
        float(latency),
        float(bandwidth),
        float(np.sqrt(np.mean(np.log(ratio) ** 2))),
        float(np.max(np.abs(ratio - 1))),
    )


# ---- more ranks than cores ----------------------------------------------------------------------
class ComputeChunk:
    """A fixed piece of single-thread work: forward and backward of a one-block GPT through
    civetta's engine on `batch` sequences (about 1.5 ms for 2, 5.5 ms for 8 on a core), timed
    alone and then between the collectives of an oversubscribed job. The engine's own work, not
    a bare GEMM loop: sharing a core costs it more (its working set is evicted at each switch;
    measured here, a core shared by two ranks stretched a GEMM loop by 4%, the engine by 17%)."""

    def __init__(self, batch: int) -> None:
        config = GPTConfig(vocab_size=256, block_size=64, n_layer=1, n_head=4, n_embd=64)
        self.model = GPT(config, seed=0)
        rng = np.random.default_rng(0)
        self.x = rng.integers(0, config.vocab_size, (batch, config.block_size))
        self.y = rng.integers(0, config.vocab_size, (batch, config.block_size))

    def __call__(self) -> None:
        self.model(self.x, self.y).backward()
        self.model.zero_grad()


CHUNKS = (2, 8)  # sequences per chunk: spacings of a step's collectives
LOOP_BYTES = (16, 64 << 10, 1 << 20)  # all-reduce sizes between the chunks


def measure_chunks(repeats: int = 10) -> dict[int, float]:
    """Best seconds of each chunk of `CHUNKS` on this process (run with every core busy)."""
    return {b: best_time(ComputeChunk(b), min_time_s=0.01, repeats=repeats) for b in CHUNKS}


def measure_loops(
    group: Any, iterations: int = 40, repeats: int = 3
) -> list[tuple[int, int, float]]:
    """(sequences per chunk, all-reduce bytes, seconds per iteration) of a loop every rank of
    `group` runs: a chunk, then an all-reduce over the group. Each is the median over `repeats`
    of the mean over `iterations` (single iterations of an oversubscribed job vary severalfold,
    so their mean is what a training step sees)."""
    results = []
    for batch in CHUNKS:
        chunk = ComputeChunk(batch)
        for nbytes in LOOP_BYTES:
            buffer = np.ones(max(group.size, nbytes // 4 // group.size * group.size), np.float32)
            out = np.empty_like(buffer)
            means = []
            for _ in range(repeats):
                group.barrier()
                for _ in range(3):  # warm-up
                    chunk()
                    group.all_reduce(buffer, out=out)
                start = time.perf_counter()
                for _ in range(iterations):
                    chunk()
                    group.all_reduce(buffer, out=out)
                elapsed = np.array([(time.perf_counter() - start) / iterations])
                means.append(float(group.all_reduce(elapsed, op="max")[0]))
            results.append((batch, buffer.nbytes, float(np.median(means))))
    return results


@dataclass(frozen=True)
class OversubscriptionFit:
    compute_stretch: float
    latency_s: float
    bytes_per_s: float
    max_error: float  # largest |predicted / measured - 1| of a loop's iteration


def fit_oversubscription(
    loops: Sequence[tuple[int, int, float]],
    chunk_s: dict[int, float],
    ranks: int,
    cores: int,
    link: LinkFit | None = None,
) -> OversubscriptionFit:
    """Iteration = share · stretch · chunk alone + all-reduce time on the oversubscribed link
    (`collective_time`), share = ranks / cores: grid search over latency and bandwidth in log
    space, with the stretch solved in closed form (relative least squares) at each point.
    Sharing cores never speeds a collective up: given the machine's own `link`, the latency is
    at least its latency and the bandwidth at most its bandwidth (a collective's few
    microseconds hide in milliseconds of compute, so the loops alone barely fix them)."""
    share = ranks / cores
    measured = np.array([t for _, _, t in loops])
    compute = np.array([share * chunk_s[g] for g, _, _ in loops])

    def solve(latency: float, bandwidth: float) -> tuple[float, float, np.ndarray]:
        shared = GroupLink("oversubscribed", ranks, False, ranks, "", latency, bandwidth)
        comm = np.array([collective_time("all_reduce", b, shared) for _, b, _ in loops])
        a, rest = compute / measured, 1 - comm / measured
        stretch = max(float(np.dot(a, rest) / np.dot(a, a)), 1e-3)
        ratio = (stretch * compute + comm) / measured
        return float(np.sum((ratio - 1) ** 2)), stretch, ratio

    spare = max(float(np.min(measured - compute)), 1e-6)  # what a collective could take
    floor, ceiling = (link.latency_s, link.bytes_per_s) if link else (0.0, math.inf)
    latencies = _log_grid(max(spare / 1000, floor), max(spare * 2, 2 * floor), 41)
    bandwidths = _log_grid(min(1e8, ceiling / 10), min(1e11, ceiling), 41)
    latency, bandwidth = _grid_search(
        lambda lat, bw: solve(lat, bw)[0], latencies, bandwidths, (floor, ceiling)
    )
    _, stretch, ratio = solve(latency, bandwidth)
    return OversubscriptionFit(stretch, latency, bandwidth, float(np.max(np.abs(ratio - 1))))
