"""What the training software does that a layout does not say, as data.

Two runs of one layout on one cluster differ by the software that runs them: whether the
gradient all-reduce overlaps the backward, how ZeRO-3 gathers its parameters, how much the
allocator holds beyond the live tensors, which attention kernel runs.
A `Framework` names each such behaviour; `PRESETS` holds the ones of the frameworks the
published measurements were taken with (`configs/references/`), so that a projection states the
software it assumes and a reference row is projected under the software it was measured with.

Selected in a config by `framework: megatron-2021` (or `framework: {preset: deepspeed,
overlap_dp: false}`), on the command line by `--set framework=megatron-2021` and
`--set framework.<key>=value`. Without one, a projection on this machine's `local` profile is
of civetta's own executor and on a cluster's of `generic` (see `default_framework`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from parallel.cost.replay import Replay, replayed_makespan

ZERO3_UNITS = ("tensor", "op", "layer")
ATTENTION_KERNELS = ("eager", "flash")  # civetta.fused.ATTENTION_KERNELS


@dataclass(frozen=True)
class Framework:
    """Software behaviour the layout does not say. Defaults: `generic`."""

    name: str = "generic"
    # Gradient buckets reduced during the last backward (ZeRO-1/2 gathers after the step).
    overlap_dp: bool = True
    # Megatron-LM §4.1: each tp rank sends 1/tp of a pipeline message over its own network
    # adapter and the receiving node all-gathers it over NVLink. civetta's executor sends whole.
    pp_scatter_gather: bool = False
    # A context-parallel ring's key/value blocks travel while attention computes.
    overlap_cp: bool = True
    # Tensor-parallel collectives split into chunks that travel while the neighbouring GEMMs
    # compute (Megatron-core's --tp-comm-overlap): hidden up to those GEMMs' time.
    overlap_tp: bool = False
    # ZeRO-3: one gather (and one gradient reduce-scatter) per parameter tensor, per op's
    # parameters (civetta's executor), or per layer (block) with its parameters flattened into
    # one buffer (FSDP units).
    zero3_unit: str = "op"
    # ZeRO-3: how many units ahead a gather is issued behind compute. 0 waits for each gather
    # (no overlap); k >= 1 overlaps unit by unit, k + 1 gathered units alive at once.
    zero3_prefetch: int = 1
    # ZeRO-3, per tensor: parameters of at most this many elements are never partitioned (kept
    # whole, so never gathered; their gradients are still reduce-scattered). DeepSpeed's
    # stage3_param_persistence_threshold. 0: every parameter is partitioned.
    zero3_persistence: int = 0
    # ZeRO-3, per tensor: a parameter used again before this many parameter elements have been
    # used in between stays gathered (DeepSpeed's stage3_max_reuse_distance: the last op of a
    # recomputed forward keeps its weight for its backward). 0: every use gathers.
    zero3_max_reuse: int = 0
    # ZeRO-3, per tensor: the bandwidth (GB/s per GPU) each gather and reduce-scatter reaches
    # when its group spans nodes, where the framework's collectives reach less than the group's
    # link (calibrated per cluster, `frameworks:` in the profile). 0: the group's link.
    zero3_network_gbs: float = 0.0
    # Seconds a collective costs beyond its wire time, per call: the framework's launch, stream
    # synchronisation and bookkeeping (microseconds).
    collective_latency_us: float = 0.0
    # eager keeps the attention probabilities (s² per head) for backward; flash keeps a
    # log-sum-exp per query row, recomputes the scores in backward and, causal, skips the tiles
    # above the diagonal (`civetta.fused.flash_attention`, traced as it runs).
    attention: str = "eager"
    # The caching allocator's memory beyond the live tensors (fragmentation, cached blocks), as
    # a fraction of the peak of live tensors.
    allocator_reserve: float = 0.0
    # Discrete-event replay of the schedule (parallel.cost.replay); None: closed forms.
    replay: Replay | None = replayed_makespan

    @property
    def zero3_overlaps(self) -> bool:
        return self.overlap_dp and self.zero3_prefetch > 0

    def describe(self) -> str:
        """One line: the preset's name and each behaviour."""
        parts = [
            f"dp overlap {'on' if self.overlap_dp else 'off'}",
            f"tp overlap {'on' if self.overlap_tp else 'off'}",
            f"pp scatter/gather {'on' if self.pp_scatter_gather else 'off'}",
            f"ZeRO-3 per {self.zero3_unit}, prefetch {self.zero3_prefetch}",
            f"{self.collective_latency_us:g} us a collective",
            f"{self.attention} attention",
            f"allocator reserve {self.allocator_reserve:.0%}",
        ]
        if self.zero3_persistence:
            parts.append(f"ZeRO-3 keeps tensors <= {self.zero3_persistence:g} elements whole")
        if self.zero3_max_reuse:
            parts.append(f"ZeRO-3 reuses a gather within {self.zero3_max_reuse:g} elements")
        if self.zero3_network_gbs:
            parts.append(f"ZeRO-3 across nodes at {self.zero3_network_gbs:g} GB/s")
        return f"{self.name}: " + ", ".join(parts)


# The behaviours each framework's documentation and published runs describe. Fitted numbers are
# marked: they come from `civetta fit` on the named reference set (configs/references/).
PRESETS: dict[str, Framework] = {
    # Communication overlapped where a framework commonly overlaps it, nothing else.
    "generic": Framework(),
    # civetta's own executor: every collective waits for its op, the gradient all-reduce for
    # the last backward, each ring step for its message.
    "civetta": Framework(
        name="civetta", overlap_dp=False, overlap_cp=False, zero3_prefetch=0, allocator_reserve=0.0
    ),
    # Megatron-LM as in Narayanan et al. 2021 (the sc21 scripts): scatter/gather of pipeline
    # messages on, --DDP-impl local (gradients all-reduced after the backward; the torch DDP rows
    # override overlap_dp), attention in eager PyTorch.
    "megatron-2021": Framework(name="megatron-2021", overlap_dp=False, pp_scatter_gather=True),
    # Megatron-core (2024-): distributed optimizer with overlapped gradient reduce-scatter and
    # parameter all-gather, tensor-parallel communication overlap. Its flash attention is not
    # the preset's default (see the note below `PRESETS`).
    "megatron-core": Framework(
        name="megatron-core",
        pp_scatter_gather=True,
        overlap_tp=True,
        zero3_unit="layer",
    ),
    # DeepSpeed ZeRO-3 as measured in Narayanan et al. 2021, Table 2 (DeepSpeed 0.3.13-0.3.16,
    # spring 2021: deepspeed/runtime/zero/stage3.py, partition_parameters.py). Each partitioned
    # parameter tensor is all-gathered by a collective of its own before its module runs, and its
    # fp16 gradient reduce-scattered by one of its own (`_allgather_param`,
    # `_reduce_scatter_gradient`). The coordinator prefetches the next module's parameters
    # (stage3_prefetch_bucket_size 5e7 elements: one weight of these models) on a stream of its
    # own while the current module computes, and waits for every gather in flight before the
    # next module runs (`fetch_sub_module`, `_synchronize_communication`): one tensor ahead. The
    # code's defaults: parameters under 1e5 elements persist (never partitioned), a parameter
    # reused within 1e9 elements stays gathered. Calibrated per cluster (`frameworks:` in the
    # profile, `civetta fit configs/calibration/a100-dgx-deepspeed.yaml`): its cost per
    # collective and the bandwidth its gathers reach across nodes.
    "deepspeed": Framework(
        name="deepspeed",
        zero3_unit="tensor",
        zero3_prefetch=1,
        zero3_persistence=100_000,
        zero3_max_reuse=1_000_000_000,
    ),
    # torchtitan (FSDP2): one all-gather per block, the next block's prefetched.
    "torchtitan": Framework(name="torchtitan", zero3_unit="layer", zero3_prefetch=1),
}

# The presets keep eager attention although Megatron-core and torchtitan run flash kernels: with
# `attention="flash"` the four torchtitan H100 rows of configs/calibration/h100-dgx.yaml could not
# be fitted within 5% (15% at best, also with device.attention_efficiency free), with eager within
# 2%. Until that is understood the fitted numbers carry the attention kernel's cost, and
# `framework.attention=flash` is a what-if.

# Keys a config or --set may give (`replay` and `name` are not behaviours a user sets).
SETTABLE = tuple(f.name for f in dataclasses.fields(Framework) if f.name not in ("name", "replay"))


def default_framework(profile_name: str) -> Framework:
    """Without a `framework:`: civetta's executor on this machine's `local` profile (what runs
    here), `generic` on a cluster's."""
    return PRESETS["civetta"] if profile_name == "local" else PRESETS["generic"]


class FrameworkError(ValueError):
    """A framework key or value the cost model does not know: one line naming it."""


def _checked(key: str, value: Any, default: Any) -> Any:
    where = f"framework.{key}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise FrameworkError(f"{where} expected true or false, got {value!r}")
        return value
    if key == "zero3_unit" and value not in ZERO3_UNITS:
        raise FrameworkError(f"{where} expected one of {' | '.join(ZERO3_UNITS)}, got {value!r}")
    if key == "attention" and value not in ATTENTION_KERNELS:
        raise FrameworkError(
            f"{where} expected one of {' | '.join(ATTENTION_KERNELS)}, got {value!r}"
        )
    if isinstance(default, int) and (isinstance(value, bool) or not isinstance(value, int)):
        raise FrameworkError(f"{where} expected a whole number >= 0, got {value!r}")
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FrameworkError(f"{where} expected a number >= 0, got {value!r}")
        value = float(value)
    if isinstance(value, (int, float)) and value < 0:
        raise FrameworkError(f"{where} expected a number >= 0, got {value!r}")
    return value


def framework_from(preset: str | None, overrides: dict[str, Any], default: Framework) -> Framework:
    """The preset (or `default` when None) with `overrides` applied, each checked."""
    if preset is None:
        base = default
    elif preset in PRESETS:
        base = PRESETS[preset]
    else:
        raise FrameworkError(f"framework expected one of {' | '.join(PRESETS)}, got {preset!r}")
    changes = {}
    for key, value in overrides.items():
        if key not in SETTABLE:
            raise FrameworkError(f"unknown key 'framework.{key}' (known: {', '.join(SETTABLE)})")
        changes[key] = _checked(key, value, getattr(base, key))
    if not changes:
        return base
    return dataclasses.replace(base, name=f"{base.name} (modified)", **changes)
