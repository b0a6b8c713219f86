"""The cost model of a mixture of experts: balanced data-free routing, the imbalance option,
and expert parallelism's place in the projection (executed counts: tests/test_cost_vs_run.py)."""

from __future__ import annotations

import numpy as np
import pytest

from civetta.models import LlamaConfig
from civetta.models.moe import MoEConfig, balanced_experts, balanced_routing, route
from launch.profiles import load_profile
from parallel.cost.hardware import CostModelError
from parallel.cost.projection import Workload, project
from parallel.cost.stages import staged_model
from parallel.cost.tuning import SearchSpace, _expert_choices
from parallel.layout import Layout

H100 = load_profile("h100-dgx")
MOE = LlamaConfig(
    vocab_size=1024,
    block_size=256,
    n_layer=4,
    n_head=8,
    n_kv_head=4,
    n_embd=256,
    moe=MoEConfig(experts=8, top_k=2, ffn_hidden=512),
)


@pytest.mark.parametrize(
    ("tokens", "experts", "k"), [(8, 4, 2), (13, 8, 2), (5, 8, 3), (64, 128, 8)]
)
def test_balanced_routing_counts_are_the_data_free_routers(tokens, experts, k) -> None:
    """The closed form gives the counts `route(balanced_experts(...))` computes slot by slot."""
    built = route(balanced_experts(tokens, experts, k), experts, None)
    closed = balanced_routing(tokens, experts, k, None)
    np.testing.assert_array_equal(closed.counts, built.counts)
    assert [m.size for m in closed.members] == [m.size for m in built.members]
    capped = balanced_routing(tokens, experts, k, 1)
    assert all(m.size <= 1 for m in capped.members)


def test_a_hot_rank_gets_its_share_and_the_total_is_kept() -> None:
    """Ep rank 0 of 4 holds experts 0 and 1: at 3× the mean (16 slots) each gets 48, and the
    other six share the remaining 32 slots as evenly as integers allow."""
    hot = balanced_routing(64, 8, 2, None, hot=(2, 3.0))
    assert list(hot.counts) == [48, 48, 6, 6, 5, 5, 5, 5]


def layout(ep: int, dp: int = 8) -> Layout:
    return Layout(dp=dp, ep=ep, microbatch_size=1, microbatches=2)


def test_expert_parallelism_divides_the_experts_state_and_adds_all_to_all() -> None:
    one, four = project(MOE, layout(1), H100), project(MOE, layout(4), H100)
    assert one.comm_bytes["ep"] == 0 and four.comm_bytes["ep"] > 0
    assert four.breakdown_s["ep_exposed"] > 0 == one.breakdown_s["ep_exposed"]
    # Each rank holds a quarter of the experts: params (and their gradients) shrink.
    experts = MOE.n_layer * 8 * 3 * 256 * 512
    assert one.memory_per_gpu["params"] - four.memory_per_gpu["params"] == 2 * experts * 3 // 4
    assert one.model_flops_per_step == four.model_flops_per_step  # balanced: the same work
    staged = staged_model(MOE, layout(4), "bf16", 256)
    assert sum(p.expert for p in staged.piece("block").params) == 3 * 2  # 2 experts × w1 w2 w3


def test_an_imbalanced_router_slows_the_busiest_rank_but_not_the_model_flops() -> None:
    balanced = project(MOE, layout(4), H100)
    skewed = project(MOE, layout(4), H100, work=Workload(moe_imbalance=2.0))
    assert skewed.step_time_s > balanced.step_time_s
    assert skewed.breakdown_s["ep_exposed"] > balanced.breakdown_s["ep_exposed"]
    assert skewed.breakdown_s["compute"] > balanced.breakdown_s["compute"]
    assert skewed.model_flops_per_step == balanced.model_flops_per_step
    assert skewed.mfu < balanced.mfu
    # ep 1: every rank runs every expert on its own tokens, so a skew changes nothing.
    assert project(MOE, layout(1), H100, work=Workload(moe_imbalance=2.0)) == project(
        MOE, layout(1), H100
    )


@pytest.mark.parametrize(
    ("imbalance", "ep", "message"),
    [
        (0.5, 4, "--moe-imbalance expected a number >= 1 (1: balanced), got 0.5"),
        (8.0, 4, "--moe-imbalance 8 exceeds parallel.ep=4: the busiest rank cannot receive"),
    ],
)
def test_bad_imbalances_are_refused(imbalance: float, ep: int, message: str) -> None:
    with pytest.raises(CostModelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        project(MOE, layout(ep), H100, work=Workload(moe_imbalance=imbalance))


def test_an_imbalance_needs_a_mixture_of_experts() -> None:
    dense = LlamaConfig(vocab_size=1024, block_size=256, n_layer=2, n_head=8, n_embd=256)
    with pytest.raises(CostModelError, match="needs a mixture-of-experts model"):
        project(dense, Layout(dp=2), H100, work=Workload(moe_imbalance=2.0))


def test_tune_tries_each_ep_that_divides_the_experts_and_the_data_parallel_ranks() -> None:
    assert _expert_choices(MOE, 16, SearchSpace()) == [1, 2, 4, 8]
    assert _expert_choices(MOE, 6, SearchSpace()) == [1, 2]
    assert _expert_choices(MOE, 16, SearchSpace(ep=4)) == [4]
    assert _expert_choices(MOE, 16, SearchSpace(min_ep=3.0)) == [1, 4, 8]
    dense = LlamaConfig(vocab_size=1024, block_size=256, n_layer=2, n_head=8, n_embd=256)
    assert _expert_choices(dense, 16, SearchSpace()) == [1]
