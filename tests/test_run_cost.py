"""The cost of a run (`parallel.cost.run_cost`): days, GPU-hours, dollars and energy in closed
form from a projected step; compute-optimal tokens; `--tokens`, `--budget` and `--gpus` read or
refused in one line; and `tune` over several GPU counts ranked by cost or time, under a budget."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from civetta.models.gpt import GPTConfig
from launch import cli
from launch.config import ConfigError, load, model_description
from launch.profiles import load_profile, profile_from_dict
from launch.simulate import simulate_command
from launch.tune import parse_gpus, tune_command
from parallel.cost.hardware import CostModelError
from parallel.cost.projection import CostOptions, project
from parallel.cost.run_cost import (
    Budget,
    compute_optimal_note,
    compute_optimal_tokens,
    parse_budget,
    parse_tokens,
    run_cost,
)
from parallel.cost.tuning import SearchSpace, tune_counts
from parallel.layout import Layout

REPO = Path(__file__).resolve().parent.parent
A100 = load_profile("a100-dgx")
GPT3 = str(REPO / "configs" / "gpt3-175b.yaml")
QWEN3 = str(REPO / "configs" / "qwen3-235b-a22b.yaml")
# 1.2B parameters, as in tests/test_tune.py, for one projection.
MEDIUM = GPTConfig(vocab_size=51200, block_size=1024, n_layer=24, n_head=16, n_embd=2048)
CLOSED = CostOptions(replay=None)
# A search over 8 and 32 GPUs in well under a second: a small GPT, a narrower space.
SMALL = GPTConfig(vocab_size=32768, block_size=1024, n_layer=8, n_head=8, n_embd=1024)
SPACE = SearchSpace(max_microbatch=4, zero_stages=(0, 1), schedules=("1f1b",))


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=160)


# ---- closed forms -------------------------------------------------------------------------------
def test_a_run_is_steps_times_the_step_in_closed_form() -> None:
    """A step of 2 s over 8 GPUs, 1,000 tokens a step: 10,500 tokens are 11 steps (the last one
    whole), 22 s; every other figure follows from GPUs, price, board power and PUE."""
    base = project(MEDIUM, Layout(dp=8, microbatches=1), A100, CLOSED)
    pr = dataclasses.replace(base, step_time_s=2.0, tokens_per_step=1000, price_per_gpu_hour=2.5)
    run = run_cost(pr, 10_500, A100)
    assert run.steps == 11 and run.wall_time_s == 22.0
    assert run.days == 22.0 / 86400
    assert run.gpu_hours == pytest.approx(8 * 22 / 3600, rel=1e-12)
    assert run.cost == pytest.approx(8 * 22 / 3600 * 2.5, rel=1e-12)
    # 8 boards at 400 W for 22 s, times a PUE of 1.2, in kWh
    assert run.energy_kwh == pytest.approx(8 * 400 * 22 / 3600 / 1000 * 1.2, rel=1e-12)
    # Projection.training keeps its keys and adds days and energy.
    training = pr.training(10_500, A100)
    assert training == {**run.as_dict()}
    assert {"tokens", "steps", "wall_time_s", "gpu_hours", "cost", "days", "energy_kwh"} == set(
        training
    )
    assert pr.training(10_500)["energy_kwh"] is None  # no profile: no board power


def test_local_has_no_energy_and_half_a_power_pair_is_refused() -> None:
    local = load_profile("local")
    assert local.board_power_w is None and local.pue is None
    pr = project(MEDIUM, Layout(dp=8, microbatches=1), A100, CLOSED)
    assert run_cost(pr, 10**9, local).energy_kwh is None
    raw = yaml.safe_load((REPO / "configs/hardware/a100-dgx.yaml").read_text())
    for edit, message in (
        (
            {"pue": None},
            r"^pue is missing: the profile gives board_power_w, and energy needs both$",
        ),
        ({"board_power_w": -1}, r"^board_power_w expected a number > 0, got -1$"),
        ({"pue": 0.9}, r"^pue expected a number >= 1 \(facility over IT power\), got 0\.9$"),
        ({"pue": "high"}, r"^pue expected a number, got 'high' \(str\)$"),
    ):
        with pytest.raises(CostModelError, match=message):
            profile_from_dict({**raw, **edit})


# ---- compute-optimal ----------------------------------------------------------------------------
def test_compute_optimal_is_20_tokens_per_parameter_of_gpt3(tmp_path: Path) -> None:
    n = model_description(load(GPT3, [])).num_parameters()
    assert n == pytest.approx(175e9, rel=0.01)
    out = tmp_path / "sim.json"
    console = _quiet()
    assert simulate_command(GPT3, "a100-dgx", [], "compute-optimal", out, console) == 0
    training = json.loads(out.read_text())["training"]
    assert training["tokens"] == 20 * n
    assert training["days"] == pytest.approx(training["wall_time_s"] / 86400)
    assert training["energy_kwh"] == pytest.approx(training["gpu_hours"] * 0.4 * 1.2)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    for words in ("GPU-hours", "days", "kWh", "Hoffmann et al. 2022", "rated power"):
        assert words in text


def test_a_mixture_of_experts_counts_its_active_parameters() -> None:
    """The stated choice: 20 × active parameters (what a token's compute uses), not total."""
    qwen = model_description(load(QWEN3, []))
    active, total = qwen.active_parameters(), qwen.num_parameters()
    assert total > 5 * active  # a real difference for the test to see
    assert compute_optimal_tokens(qwen) == 20 * active
    note = compute_optimal_note(qwen)
    assert "active parameters" in note and "4.7T" in note  # 20 × all 235B, shown alongside


# ---- reading the command line -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "tokens"),
    [("300000000000", 300 * 10**9), ("300e9", 300 * 10**9), ("300B", 300 * 10**9),
     ("1.5T", 15 * 10**11), ("2_000_000", 2 * 10**6), ("20k", 20_000)],
)  # fmt: skip
def test_token_counts_are_read_exactly(text: str, tokens: int) -> None:
    assert parse_tokens(text) == tokens


@pytest.mark.parametrize("bad", ["lots", "0", "-5", "1.5", "300 B", "1e40", "2.5e-1", ""])
def test_bad_tokens_are_one_line(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["simulate", GPT3, "--tokens", bad]) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: --tokens expected a positive whole number of tokens (300000000000, 300e9, "
        f"300B, 1.5T) or compute-optimal, got {bad!r}\n"
    )


def test_budgets_are_read_and_bad_ones_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for text in ("1.5Musd", "$1.5M", "1500000usd"):
        assert parse_budget(text) == Budget(1.5e6, "usd")
    assert parse_budget("200kgpuh") == parse_budget("200000gpuh") == Budget(2e5, "gpuh")
    for bad in ("200000", ".5M", "0gpuh", "fivegpuh"):
        assert cli.main(["tune", GPT3, "--gpus", "8", "--budget", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --budget expected an amount with a unit") and bad in err
        assert err.count("\n") == 1


def test_gpu_counts_lists_and_doubling_ranges() -> None:
    assert parse_gpus("256-4096") == (256, 512, 1024, 2048, 4096)
    assert parse_gpus("768-3072,512") == (768, 1536, 3072, 512)
    assert parse_gpus("512,1024,512") == (512, 1024)
    assert parse_gpus(1024) == (1024,)
    for bad in ("many", "4096-256", "0-8", "8,", "1.5k"):
        with pytest.raises(ConfigError, match=r"^--gpus expected a positive integer, a list"):
            parse_gpus(bad)


def test_an_unknown_objective_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["tune", GPT3, "--gpus", "8", "--objective", "speed"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --objective expected one of throughput | cost | time, got 'speed'\n"


# ---- tune over several GPU counts ---------------------------------------------------------------
TOKENS = 10**10


@pytest.fixture(scope="module")
def by_cost() -> object:
    return _search("cost")


def _search(objective: str, budget: Budget | None = None) -> object:
    return tune_counts(
        SMALL, A100, (8, 32), 64, space=SPACE, options=CLOSED, replay_top=3,
        objective=objective, tokens=TOKENS, budget=budget,
    )  # fmt: skip


def test_time_picks_the_fastest_run_and_cost_the_most_efficient(by_cost: object) -> None:
    cost = by_cost
    time = _search("time")
    everything = cost.ranked  # type: ignore[attr-defined]
    assert {r.run.gpus for r in everything} == {8, 32}
    fastest = min(r.run.wall_time_s for r in everything)
    cheapest = min(r.run.gpu_hours for r in everything)
    most_per_gpu = max(r.projection.tokens_per_s / r.projection.world_size for r in everything)
    best_time, best_cost = time.ranked[0], cost.ranked[0]  # type: ignore[attr-defined]
    assert best_time.run.wall_time_s == fastest
    assert best_cost.run.gpu_hours == cheapest
    assert best_cost.projection.tokens_per_s / best_cost.projection.world_size == most_per_gpu
    # The trade the objective exists for: more GPUs finish sooner, fewer spend less.
    assert best_time.run.gpus == 32 and best_cost.run.gpus == 8
    assert best_time.run.gpu_hours > best_cost.run.gpu_hours
    assert best_cost.run.wall_time_s > best_time.run.wall_time_s
    # Dollars order as GPU-hours at one price.
    assert best_cost.run.cost == pytest.approx(best_cost.run.gpu_hours * A100.price_per_gpu_hour)
    assert cost.explanation[0].startswith("Best by cost (of 8, 32 GPUs): 8 GPUs")  # type: ignore[attr-defined]
    assert any("The best on 32 GPUs" in line for line in cost.explanation)  # type: ignore[attr-defined]


def test_a_budget_drops_layouts_and_says_the_cheapest_when_none_fits(by_cost: object) -> None:
    runs = sorted(r.run.gpu_hours for r in by_cost.ranked)  # type: ignore[attr-defined]
    middle = (runs[0] + runs[-1]) / 2
    capped = _search("time", Budget(middle, "gpuh"))
    kept = [r.run.gpu_hours for r in capped.ranked]
    assert kept and max(kept) <= middle and capped.over_budget == len(runs) - len(kept) > 0
    assert capped.ranked[0].run.wall_time_s == min(r.run.wall_time_s for r in capped.ranked)
    budget = Budget(runs[0] * A100.price_per_gpu_hour * 0.99, "usd")  # just below the cheapest
    none = _search("cost", budget)
    assert not none.ranked and len(none.explanation) == 1
    line = none.explanation[0]
    cheapest = by_cost.ranked[0].run  # type: ignore[attr-defined]
    assert line.startswith(f"No layout fits the budget of {budget.describe()}: the cheapest, ")
    assert f"on {cheapest.gpus} GPUs, needs" in line and f"${cheapest.cost:,.0f}" in line


def test_tune_command_shows_the_run_columns(tmp_path: Path) -> None:
    out = tmp_path / "tune.json"
    console = _quiet()
    config = str(REPO / "configs" / "quickstart.yaml")
    assert tune_command(config, "a100-dgx", "4,8", None, [], 3, out, console, objective="cost") == 0
    data = json.loads(out.read_text())
    tokens = compute_optimal_tokens(model_description(load(config, [])))
    assert data["gpus"] == [4, 8] and data["objective"] == "cost" and data["tokens"] == tokens
    for entry in data["layouts"]:
        assert entry["gpus"] in (4, 8) and entry["run"]["tokens"] == tokens
        assert entry["run"]["energy_kwh"] == pytest.approx(entry["run"]["gpu_hours"] * 0.48)
    hours = [entry["run"]["gpu_hours"] for entry in data["layouts"]]
    assert hours == sorted(hours)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    for words in ("GPUs", "days", "GPU-hours", "ranked by cost", "compute-optimal = 20"):
        assert words in text
    # One count: the objectives agree, and the output says so.
    console = _quiet()
    assert tune_command(config, "a100-dgx", 8, None, [], 3, None, console, objective="time") == 0
    assert "rank alike" in console.file.getvalue()  # type: ignore[attr-defined]


def test_tune_command_under_a_budget_nothing_fits(capsys: pytest.CaptureFixture[str]) -> None:
    config = str(REPO / "configs" / "quickstart.yaml")
    argv = ["tune", config, "--gpus", "4-8", "--budget", "1e-9gpuh", "--objective", "time"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "ranked by time within" not in out  # nothing to rank: no table
    assert "No layout fits the budget of 1e-09 GPU-hours: the cheapest, " in " ".join(out.split())
