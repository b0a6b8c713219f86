"""The layout tuner: every feasible way to split one model over N GPUs, ranked by the cost model.

`tune` enumerates dp × tp × pp = N, the microbatch size, the pipeline schedule and its virtual
stages, the ZeRO stage, recomputation and sequence parallelism; keeps the layouts whose memory
fits the profile's GPU; projects each (`parallel.cost.projection.project`) and ranks them by
throughput; then explains in a few sentences why the best one wins.

Pruning:

- what cannot run: tp divides the heads and the vocabulary, pp·v the layers, dp the batch, the
  microbatch size batch/dp;
- tp ≤ GPUs per node, a policy (a tensor-parallel group across nodes pays the network on every
  layer, as Megatron-LM's authors advise against); `SearchSpace.max_tp` widens it;
- recomputation only adds work in the cost model (none ≤ selective ≤ full in time, the reverse in
  memory), so each layout keeps the least recomputation that fits: nothing faster is lost.

One shortcut is a heuristic: the whole space is projected with the closed-form pipeline terms
(fast), and only the best `replay_top` are projected again with the replay of the actual
schedule (the default of `CostOptions`), which decides their final order. The replay moves a
layout by a few percent; a layout ranked below them would have to gain more than that.

`tune_counts` runs `tune` for each of several GPU counts (the traced pieces, cached by shape,
are shared between them) and ranks the union by an objective: throughput (tokens/s per GPU),
cost (GPU-hours, hence dollars at the profile's one price) or time (wall-clock for a token
count), optionally dropping the layouts whose run exceeds a budget. For one count the three
orders coincide: cost = GPUs × time × price.

Nothing here prints; `launch/tune.py` renders the result.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from civetta.models import ModelDescription
from parallel.cost.hardware import CostModelError, HardwareProfile
from parallel.cost.projection import (
    CostOptions,
    Projection,
    Workload,
    device_memory_of,
    devices_memory_of,
    executor_options,
    project,
)
from parallel.cost.replay import SCHEDULES
from parallel.cost.run_cost import Budget, RunCost, run_cost
from parallel.layout import Layout
from parallel.schedules import V_SHAPED

GIB = 2**30
RECOMPUTE = ("none", "selective", "full")  # least work first
TERMS = {
    "compute": "compute",
    "bubble": "pipeline bubble",
    "tp_exposed": "tensor-parallel communication",
    "cp_exposed": "context-parallel communication",
    "ep_exposed": "expert-parallel all-to-all",
    "pp_exposed": "pipeline messages",
    "dp_exposed": "exposed data-parallel communication",
    "optimizer": "optimizer step",
}


@dataclass(frozen=True)
class SearchSpace:
    """What the tuner may choose. Defaults: everything civetta can run or project."""

    max_microbatch: int = 16
    # Every schedule but ZB-H2 and DualPipeV, which the projection's one step (ended by the
    # optimizer's synchronisation, with no overlap of a paired forward and backward) never
    # ranks first: ZB-H2 has ZB-H1's bubble with up to twice the activations, DualPipeV twice
    # ZB-V's bubble with one more chunk. `--set parallel.schedule=zb-h2` asks for one.
    schedules: tuple[str, ...] = tuple(s for s in SCHEDULES if s not in ("zb-h2", "dualpipev"))
    max_virtual_stages: int = 8
    zero_stages: tuple[int, ...] = (0, 1, 2, 3)
    recompute: tuple[str, ...] = RECOMPUTE  # tried in this order: least work first
    sequence_parallel: tuple[bool, ...] = (False, True)
    max_tp: int | None = None  # default: GPUs per node
    order: str = "tp-dp-pp"
    # Held fixed when given (the user's --set parallel.tp=8 and the like).
    dp: int | None = None
    tp: int | None = None
    pp: int | None = None
    microbatch_size: int | None = None
    virtual_stages: int | None = None
    # Context parallelism: searched from this sequence length on (shorter sequences gain
    # nothing from splitting them), over these back ends; `--set parallel.cp=4` fixes it.
    cp: int | None = None
    cp_from_seq: int = 32768
    max_cp: int = 16
    cp_comms: tuple[str, ...] = ("ring", "all_gather", "a2a")
    # Expert parallelism (MoE models): every ep dividing both the experts and dp × cp, unless
    # `--set parallel.ep=8` fixes it.
    ep: int | None = None
    min_ep: float = 1.0  # under a routing imbalance F, ep > 1 must be at least F


def _expert_choices(config: Any, dp_cp: int, space: SearchSpace) -> list[int]:
    """The ep sizes to try: 1 for a dense model; for a MoE, the divisors of dp × cp that
    divide the experts (or the fixed one, where it fits)."""
    moe = getattr(config, "moe", None)
    if moe is None:
        return [1]
    sizes = [e for e in divisors(dp_cp) if moe.experts % e == 0 and (e == 1 or e >= space.min_ep)]
    if space.ep is not None:
        return [space.ep] if space.ep in sizes else []
    return sizes


def _context_choices(config: Any, seq: int, gpus: int, space: SearchSpace) -> list[tuple]:
    """(cp, back end) choices: none below `cp_from_seq` tokens unless cp is fixed."""
    if space.cp is not None:
        sizes = [space.cp]
    elif seq < space.cp_from_seq:
        return [(1, "ring")]
    else:
        sizes = [c for c in divisors(gpus) if c <= space.max_cp and seq % (2 * c) == 0]
    heads = getattr(config, "n_kv_head", 0) or config.n_head
    out = []
    for cp in sizes:
        if cp == 1:
            out.append((1, "ring"))
            continue
        out += [(cp, comm) for comm in space.cp_comms if comm != "a2a" or heads % cp == 0]
    return out


@dataclass(frozen=True)
class Ranked:
    layout: Layout
    projection: Projection
    run: RunCost | None = None  # the training run for the search's tokens, when it has some


@dataclass
class TuneResult:
    ranked: list[Ranked]  # best first: the replayed few, then the rest by closed form
    enumerated: int = 0  # layouts with dp·tp·pp = N that satisfy the divisibility rules
    fitting: int = 0  # of those, layouts some recomputation makes fit in memory
    replayed: int = 0  # re-projected with the schedule replay
    smallest_memory: tuple[int, Layout] | None = None  # when nothing fits
    explanation: list[str] = field(default_factory=list)
    # A search over several GPU counts (`tune_counts`): what it ranked by, for how many tokens,
    # under which budget, and how many layouts that budget dropped.
    counts: tuple[int, ...] = ()
    objective: str = "throughput"
    tokens: int | None = None
    budget: Budget | None = None
    over_budget: int = 0
    replays: int = 0  # projections replayed, those over the budget included (`replayed`: kept)


def tensor_parallel_divides(config: Any, tp: int) -> bool:
    """Whether `tp` splits the model's heads, key/value heads, MLP width and vocabulary."""
    sizes = [config.n_head, config.vocab_size, getattr(config, "n_kv_head", 0)]
    sizes.append(getattr(config, "ffn_hidden", 0))
    return not any(size and size % tp for size in sizes)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _pipelines(
    config: ModelDescription, pp: int, microbatches: int, space: SearchSpace
) -> list[tuple[str, int]]:
    """(schedule, virtual stages) choices for pp stages and this many microbatches."""
    if pp == 1:
        return [("1f1b", 1)]
    out = [
        (s, 1) for s in space.schedules if s != "interleaved-1f1b" and _builds(s, pp, microbatches)
    ]
    v_ok = config.n_layer >= 2 * pp  # a V needs two stages of layers per rank
    out = [(s, v) for s, v in out if s not in V_SHAPED or v_ok]
    if "interleaved-1f1b" in space.schedules and microbatches % pp == 0:
        chunks = config.n_layer // pp
        out += [
            ("interleaved-1f1b", v) for v in divisors(chunks) if 2 <= v <= space.max_virtual_stages
        ]
    return out


def _builds(schedule: str, pp: int, microbatches: int) -> bool:
    """Whether the generator builds this pipeline shape: DualPipeV needs 2·pp microbatches."""
    return schedule != "dualpipev" or microbatches >= 2 * pp


def _fits(
    config: ModelDescription,
    layout: Layout,
    work: Workload,
    capacity: int,
    framework: CostOptions | None = None,
) -> tuple[bool, int]:
    """Whether every pipeline position fits, and the largest total: the first and last
    device, or every device where the stages differ (uneven layers, a V); memory as
    `framework` allocates it."""
    uniform = config.n_layer % layout.num_stages == 0 and layout.schedule not in V_SHAPED
    positions = sorted({0, layout.pp - 1}) if uniform else range(layout.pp)
    memory = devices_memory_of(config, layout, positions, work, framework)
    total = max(m.total for m in memory)
    return total <= capacity, total


def enumerate_layouts(
    config: ModelDescription,
    profile: HardwareProfile,
    gpus: int,
    batch: int,
    base: Layout,
    space: SearchSpace,
    work: Workload,
    framework: CostOptions | None = None,
) -> tuple[list[Layout], int, tuple[int, Layout] | None]:
    """(layouts that fit, with their least recomputation; how many were enumerated; the
    smallest memory seen, when none fits)."""
    capacity = profile.device.usable_memory_bytes
    max_tp = space.max_tp or profile.gpus_per_node
    seq = work.seq(config)
    fitting: list[Layout] = []
    enumerated = 0
    smallest: tuple[int, Layout] | None = None
    for cp, cp_comm in _context_choices(config, seq, gpus, space):
        found, count, least = _enumerate_mesh(
            config, gpus // cp, cp, cp_comm, batch, base, space, work, capacity, max_tp, seq,
            framework,
        )  # fmt: skip
        fitting += found
        enumerated += count
        if least is not None and (smallest is None or least[0] < smallest[0]):
            smallest = least
    return fitting, enumerated, smallest


def _enumerate_mesh(
    config: ModelDescription,
    gpus: int,
    cp: int,
    cp_comm: str,
    batch: int,
    base: Layout,
    space: SearchSpace,
    work: Workload,
    capacity: int,
    max_tp: int,
    seq: int,
    framework: CostOptions | None = None,
) -> tuple[list[Layout], int, tuple[int, Layout] | None]:
    """`enumerate_layouts` for one context-parallel choice, over the other `gpus` ranks."""
    fitting: list[Layout] = []
    enumerated = 0
    smallest: tuple[int, Layout] | None = None
    for tp in divisors(gpus):
        if tp > max_tp or not tensor_parallel_divides(config, tp):
            continue
        if space.tp is not None and tp != space.tp:
            continue
        if cp_comm == "a2a" and (getattr(config, "n_kv_head", 0) or config.n_head) % (cp * tp):
            continue
        for pp in divisors(gpus // tp):
            dp = gpus // (tp * pp)
            # Equal stages, unless this pp is asked for: then as even as can be (uneven).
            uneven_ok = space.pp == pp and config.n_layer >= pp
            if (config.n_layer % pp and not uneven_ok) or batch % dp:
                continue
            if (space.pp is not None and pp != space.pp) or (
                space.dp is not None and dp != space.dp
            ):
                continue
            for b in divisors(batch // dp):
                if b > space.max_microbatch:
                    break
                if space.microbatch_size is not None and b != space.microbatch_size:
                    continue
                m = batch // (dp * b)
                for schedule, v in _pipelines(config, pp, m, space):
                    if space.virtual_stages is not None and v != space.virtual_stages:
                        continue
                    for sp in space.sequence_parallel:
                        if sp and (tp == 1 or (seq // cp) % tp):
                            continue
                        for zero, ep in itertools.product(
                            space.zero_stages if dp > 1 else (0,),
                            _expert_choices(config, dp * cp, space),
                        ):
                            enumerated += 1
                            layout = dataclasses.replace(
                                base,
                                dp=dp,
                                tp=tp,
                                pp=pp,
                                microbatch_size=b,
                                microbatches=m,
                                schedule=schedule,
                                virtual_stages=v,
                                sequence_parallel=sp,
                                zero=zero,
                                order=space.order,
                                cp=cp,
                                cp_comm=cp_comm,
                                ep=ep,
                            )
                            for recompute in space.recompute:
                                candidate = dataclasses.replace(layout, recompute=recompute)
                                ok, total = _fits(config, candidate, work, capacity, framework)
                                if ok:
                                    fitting.append(candidate)
                                    break
                                if smallest is None or total < smallest[0]:
                                    smallest = (total, candidate)
    return fitting, enumerated, smallest


def tune(
    config: ModelDescription,
    profile: HardwareProfile,
    gpus: int,
    batch: int,
    base: Layout | None = None,
    space: SearchSpace | None = None,
    options: CostOptions | None = None,
    replay_top: int = 30,
    work: Workload | None = None,
) -> TuneResult:
    """Every feasible layout of `config` on `gpus` GPUs for a global batch of `batch`
    sequences, best first. `base` carries what is not searched (the bucket size), `work` the
    dtype, optimizer and sequence length."""
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise CostModelError(f"gpus expected a positive integer, got {gpus!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise CostModelError(f"batch expected a positive integer, got {batch!r}")
    base = base or Layout()
    work = work or Workload()
    space = space or SearchSpace()
    options = options or executor_options(profile)
    layouts, enumerated, smallest = enumerate_layouts(
        config, profile, gpus, batch, base, space, work, options
    )
    result = TuneResult([], enumerated, len(layouts), smallest_memory=smallest)
    if not layouts:
        result.explanation = explain_nothing_fits(config, profile, gpus, batch, smallest)
        return result
    # Closed forms for the whole space, then the schedule replay for the best few.
    quick = dataclasses.replace(options, replay=None)
    ranked = sorted(
        (Ranked(layout, project(config, layout, profile, quick, work)) for layout in layouts),
        key=lambda r: r.projection.step_time_s,
    )
    top = [
        Ranked(r.layout, project(config, r.layout, profile, options, work))
        for r in ranked[:replay_top]
    ]
    top.sort(key=lambda r: r.projection.step_time_s)
    result.ranked = top + ranked[replay_top:]
    result.replayed = len(top)
    result.explanation = explain(config, profile, result.ranked, work)
    return result


# ---- several GPU counts, an objective, a budget ------------------------------------------------
OBJECTIVES = ("throughput", "cost", "time")


def objective_key(objective: str) -> Callable[[Ranked], tuple[float, ...]]:
    """The sort key of an objective, smaller first; ties broken by the other resource.
    Throughput is tokens/s per GPU: for one count (one batch) the step time's order."""
    if objective not in OBJECTIVES:
        raise CostModelError(
            f"--objective expected one of {' | '.join(OBJECTIVES)}, got {objective!r}"
        )

    def key(r: Ranked) -> tuple[float, ...]:
        pr, run = r.projection, r.run
        per_gpu = pr.tokens_per_s / pr.world_size
        if objective == "throughput" or run is None:
            return (-per_gpu, pr.step_time_s)
        if objective == "cost":
            return (run.gpu_hours, run.wall_time_s)
        return (run.wall_time_s, run.gpu_hours)

    return key


def with_runs(ranked: list[Ranked], tokens: int, profile: HardwareProfile) -> list[Ranked]:
    return [dataclasses.replace(r, run=run_cost(r.projection, tokens, profile)) for r in ranked]


def tune_counts(
    config: ModelDescription,
    profile: HardwareProfile,
    counts: Sequence[int],
    batch: int,
    base: Layout | None = None,
    space: SearchSpace | None = None,
    options: CostOptions | None = None,
    replay_top: int = 30,
    work: Workload | None = None,
    objective: str = "throughput",
    tokens: int | None = None,
    budget: Budget | None = None,
) -> TuneResult:
    """`tune` for every GPU count in `counts`, ranked together by `objective` ("cost" and
    "time" need `tokens`), without the layouts whose run of `tokens` exceeds `budget`.

    Each count's best `replay_top` (by step time, which within one count orders all three
    objectives alike) are replayed; those lead the ranking, the rest follow, each part sorted
    by the objective."""
    key = objective_key(objective)
    if (objective != "throughput" or budget is not None) and tokens is None:
        raise CostModelError("tokens are needed to rank by cost or time, or to hold a budget")
    counts = tuple(dict.fromkeys(counts))  # once each, in the order given
    results = {
        n: tune(config, profile, n, batch, base, space, options, replay_top, work) for n in counts
    }
    head: list[Ranked] = []
    rest: list[Ranked] = []
    for result in results.values():
        ranked = with_runs(result.ranked, tokens, profile) if tokens else result.ranked
        head += ranked[: result.replayed]
        rest += ranked[result.replayed :]
    merged = TuneResult(
        [],
        enumerated=sum(r.enumerated for r in results.values()),
        fitting=sum(r.fitting for r in results.values()),
        counts=counts,
        objective=objective,
        tokens=tokens,
        budget=budget,
    )
    smallest = [r.smallest_memory for r in results.values() if r.smallest_memory]
    merged.smallest_memory = min(smallest, key=lambda x: x[0]) if smallest else None
    if not head:
        merged.explanation = [
            f"On {n} GPUs: {line}" if len(counts) > 1 else line
            for n, result in results.items()
            for line in result.explanation
        ]
        return merged
    every = head + rest
    merged.replays = len(head)
    if budget is not None:
        head, rest = _within(head, budget), _within(rest, budget)
        merged.over_budget = len(every) - len(head) - len(rest)
    merged.ranked = sorted(head, key=key) + sorted(rest, key=key)
    merged.replayed = len(head)
    if budget is not None and not merged.ranked:
        cheapest = min(every, key=lambda r: _spent(r, budget))
        merged.explanation = [over_budget_line(cheapest, budget)]
        return merged
    merged.explanation = explain_counts(config, profile, merged, work)
    return merged


def _spent(r: Ranked, budget: Budget) -> float:
    assert r.run is not None, "a budget is held only with tokens"
    return budget.spent(r.run)


def _within(ranked: list[Ranked], budget: Budget) -> list[Ranked]:
    return [r for r in ranked if _spent(r, budget) <= budget.amount]


def run_summary(run: RunCost) -> str:
    """'12.3 days, 456,789 GPU-hours, $913,578' (hours for a run under a day)."""
    hours = run.wall_time_s / 3600
    time = f"{run.days:,.1f} days" if run.days >= 1 else f"{hours:.3g} hours"
    return f"{time}, {run.gpu_hours:,.0f} GPU-hours, ${run.cost:,.0f}"


def over_budget_line(cheapest: Ranked, budget: Budget) -> str:
    run = cheapest.run
    assert run is not None
    return (
        f"No layout fits the budget of {budget.describe()}: the cheapest, "
        f"{describe(cheapest.layout)} on {run.gpus} GPUs, needs {run_summary(run)} for "
        f"{run.tokens:,} tokens."
    )


WORDS = {"throughput": "tokens/s per GPU", "cost": "cost", "time": "wall-clock time"}


def explain_counts(
    config: ModelDescription,
    profile: HardwareProfile,
    result: TuneResult,
    work: Workload | None = None,
) -> list[str]:
    """The run of the best layout, `explain` among the layouts of its GPU count, and what the
    best of every other count would take instead."""
    best = result.ranked[0]
    n = best.projection.world_size
    same = [r for r in result.ranked if r.projection.world_size == n]
    lines = []
    if best.run is not None:
        where = f" (of {', '.join(map(str, result.counts))} GPUs)" if len(result.counts) > 1 else ""
        lines.append(
            f"Best by {WORDS[result.objective]}{where}: {n} GPUs, {run_summary(best.run)} for "
            f"{best.run.tokens:,} tokens."
        )
    lines += explain(config, profile, same, work)
    for count in result.counts:
        other = next((r for r in result.ranked if r.projection.world_size == count), None)
        if count == n or other is None or other.run is None or best.run is None:
            continue
        lines.append(
            f"The best on {count} GPUs ({describe(other.layout)}) would take "
            f"{run_summary(other.run)}: {other.run.wall_time_s / best.run.wall_time_s:.2f}× "
            f"the time, {other.run.gpu_hours / best.run.gpu_hours:.2f}× the GPU-hours."
        )
    if len(result.counts) == 1 and result.objective != "throughput":
        lines.append(
            "With one GPU count, throughput, cost and time rank alike (cost = GPUs × time × "
            "price); give --gpus several counts to trade them."
        )
    if result.budget is not None and result.over_budget:
        lines.append(
            f"{result.over_budget:,} layout(s) over the budget of {result.budget.describe()} "
            "were dropped."
        )
    return lines


# ---- why the best wins --------------------------------------------------------------------------
def describe(layout: Layout) -> str:
    """A layout in one line: dp×tp×pp, microbatches, schedule, ZeRO, recompute, SP."""
    parts = [f"dp={layout.dp} × tp={layout.tp} × pp={layout.pp}"]
    if layout.cp > 1:
        parts[0] += f" × cp={layout.cp} ({layout.cp_comm})"
    if layout.ep > 1:
        parts[0] += f", ep={layout.ep}"
    parts.append(f"microbatch {layout.microbatch_size} × {layout.microbatches}")
    if layout.pp > 1:
        v = f" v={layout.virtual_stages}" if layout.virtual_stages > 1 else ""
        parts.append(f"{layout.schedule}{v}")
    if layout.zero:
        parts.append(f"ZeRO-{layout.zero}")
    parts.append(f"recompute {layout.recompute}")
    if layout.sequence_parallel:
        parts.append("sequence parallel")
    return ", ".join(parts)


def differences(a: Layout, b: Layout) -> str:
    """What `b` changes from `a`, in the settings the tuner chooses."""
    names = {
        "dp": "dp",
        "tp": "tp",
        "pp": "pp",
        "microbatch_size": "microbatch",
        "schedule": "schedule",
        "virtual_stages": "v",
        "zero": "ZeRO",
        "recompute": "recompute",
        "sequence_parallel": "SP",
    }
    changed = []
    for attr, label in names.items():
        if getattr(a, attr) != getattr(b, attr):
            value = getattr(b, attr)
            if isinstance(value, bool):
                value = "on" if value else "off"
            changed.append(f"{label} {value}")
    return ", ".join(changed) or "the same settings"


def _why(term: str, loser: Ranked, best: Ranked) -> str:
    """A short reason why `term` is larger in `loser` than in `best`, from what differs."""
    lay, win, pr = loser.layout, best.layout, loser.projection
    if term == "bubble":
        v = f", v={lay.virtual_stages}" if lay.virtual_stages > 1 else ""
        return f" ({lay.schedule} over pp={lay.pp} with {lay.microbatches} microbatches{v})"
    if term == "tp_exposed":
        where = pr.links.get("tp", "")
        if "across nodes" in where:
            return f" (its tp={lay.tp} group crosses nodes: {where})"
        return f" (tp={lay.tp} over {where})"
    if term == "dp_exposed":
        zero = f", ZeRO-{lay.zero}" if lay.zero else ""
        return f" (dp={lay.dp}{zero} over {pr.links.get('dp', '')})"
    if term == "pp_exposed":
        return f" (2 messages per microbatch and stage boundary, pp={lay.pp})"
    if term == "compute":
        order = {name: i for i, name in enumerate(RECOMPUTE)}
        if order[lay.recompute] > order[win.recompute]:
            return f" (recompute {lay.recompute} runs more of the forward again)"
        if lay.microbatch_size != win.microbatch_size:
            return (
                f" (microbatch {lay.microbatch_size} instead of {win.microbatch_size}: GEMMs "
                "of another size, at another efficiency)"
            )
        if win.sequence_parallel and not lay.sequence_parallel:
            return " (without sequence parallelism every tp rank repeats the norms and dropouts)"
        if lay.tp != win.tp:
            return f" (tp={lay.tp} instead of {win.tp}: GEMMs of another shape)"
    return ""


def compare(best: Ranked, other: Ranked) -> str:
    """'X% slower, mostly <term> (+Y s)' for `other` against `best`."""
    slower = other.projection.step_time_s / best.projection.step_time_s - 1
    deltas = {
        term: other.projection.breakdown_s[term] - best.projection.breakdown_s[term]
        for term in TERMS
    }
    worst = max(deltas, key=lambda t: deltas[t])
    gain = min(deltas, key=lambda t: deltas[t])
    text = (
        f"{slower:.1%} slower: {_seconds(deltas[worst])} more {TERMS[worst]}"
        f"{_why(worst, other, best)}"
    )
    if deltas[gain] < -0.05 * deltas[worst]:
        text += f", though {_seconds(-deltas[gain])} less {TERMS[gain]}"
    return text


def _seconds(value: float) -> str:
    if abs(value) >= 1:
        return f"{value:.2f} s"
    if abs(value) >= 1e-3:
        return f"{value * 1e3:.1f} ms"
    return f"{value * 1e6:.0f} µs"


def explain(
    config: ModelDescription,
    profile: HardwareProfile,
    ranked: list[Ranked],
    work: Workload | None = None,
) -> list[str]:
    """A few sentences: the winner, what the runner-up loses on, why this much memory saving,
    and what a different tp and pp would cost."""
    best = ranked[0]
    pr = best.projection
    share = max(TERMS, key=lambda t: pr.breakdown_s[t] if t != "compute" else -1.0)
    lines = [
        f"Best: {describe(best.layout)}: {_seconds(pr.step_time_s)} per step, "
        f"{pr.tflops_per_gpu:.3g} TFLOP/s per GPU (MFU {pr.mfu:.1%}); compute is "
        f"{pr.breakdown_s['compute'] / pr.step_time_s:.0%} of the step, the largest overhead "
        f"is {TERMS[share]} ({pr.breakdown_s[share] / pr.step_time_s:.1%})."
    ]
    tolerance = 1e-3 * pr.step_time_s
    ties = [r for r in ranked[1:] if r.projection.step_time_s - pr.step_time_s <= tolerance]
    runner = next((r for r in ranked[1:] if r not in ties), None)
    if ties:
        example = differences(best.layout, ties[0].layout)
        lines.append(f"{len(ties)} other layout(s) tie within 0.1% (e.g. {example}).")
    if runner is not None:
        lines.append(
            f"The runner-up ({differences(best.layout, runner.layout)}) is {compare(best, runner)}."
        )
    # Memory: what the best layout would need without its memory savings.
    lay = best.layout
    if lay.recompute != "none" or lay.zero:
        plain = dataclasses.replace(lay, recompute="none", zero=0)
        positions = sorted({0, lay.pp - 1})
        need = max(device_memory_of(config, plain, d, work).total for d in positions)
        capacity = profile.device.usable_memory_bytes
        if need > capacity:
            saving = []
            if lay.recompute != "none":
                saving.append(f"recompute {lay.recompute}")
            if lay.zero:
                saving.append(f"ZeRO-{lay.zero}")
            them = "them" if len(saving) > 1 else "it"
            lines.append(
                f"Memory forces {' and '.join(saving)}: without {them} this layout needs "
                f"{need / GIB:.1f} GiB per GPU, over the {capacity / GIB:.1f} GiB usable."
            )
    for axis in ("tp", "pp"):
        mine = getattr(lay, axis)
        other = next((r for r in ranked if getattr(r.layout, axis) != mine), None)
        if other is not None:
            value = getattr(other.layout, axis)
            lines.append(
                f"The best with {axis}={value} ({describe(other.layout)}) is "
                f"{compare(best, other)}."
            )
    return lines


def explain_nothing_fits(
    config: ModelDescription,
    profile: HardwareProfile,
    gpus: int,
    batch: int,
    smallest: tuple[int, Layout] | None,
) -> list[str]:
    capacity = profile.device.usable_memory_bytes / GIB
    if smallest is None:
        return [
            f"No layout of {gpus} GPUs satisfies the divisibility rules for this model and a "
            f"batch of {batch} (dp must divide the batch, tp the heads and vocabulary, pp the "
            "layers)."
        ]
    total, layout = smallest
    return [
        f"No layout fits in {capacity:.1f} GiB per GPU: the smallest needs {total / GIB:.1f} GiB "
        f"({describe(layout)}). Use more GPUs or a smaller batch."
    ]
