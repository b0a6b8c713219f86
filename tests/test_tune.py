"""`civetta tune`: the enumeration is complete, its pruning loses nothing, the ranking is the
cost model's, the explanation names what the runner-up loses on, and bad arguments are one
line."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
from pathlib import Path

import pytest
from rich.console import Console

from civetta.models.gpt import GPTConfig
from launch.config import ConfigError
from launch.profiles import load_profile
from launch.tune import tune_command
from parallel.cost.projection import CostOptions, device_memory_of, project
from parallel.cost.tuning import RECOMPUTE, SearchSpace, divisors, tune
from parallel.layout import Layout

REPO = Path(__file__).resolve().parent.parent
A100 = load_profile("a100-dgx")
GPT3 = str(REPO / "configs" / "gpt3-175b.yaml")
# 1.2B parameters: big enough that memory rules out some layouts on a small A100 variant.
MEDIUM = GPTConfig(vocab_size=51200, block_size=1024, n_layer=24, n_head=16, n_embd=2048)
CLOSED = CostOptions(replay=None)


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=160)


def _small_gpu() -> object:
    device = dataclasses.replace(A100.device, memory_gib=16, memory_reserved_gib=1)
    return dataclasses.replace(A100, device=device)


def test_the_best_layout_is_the_best_of_the_unpruned_space() -> None:
    """Brute force over every recompute setting (the tuner keeps only the least that fits)
    finds nothing faster than the tuner's best."""
    profile = _small_gpu()
    base = Layout()
    result = tune(MEDIUM, profile, 16, 32, base, options=CLOSED)  # type: ignore[arg-type]
    best = result.ranked[0].projection.step_time_s
    capacity = profile.device.usable_memory_bytes  # type: ignore[attr-defined]
    fastest = None
    for tp, pp in itertools.product(divisors(16), repeat=2):
        if 16 % (tp * pp) or tp > 8 or MEDIUM.n_layer % pp:
            continue
        dp = 16 // (tp * pp)
        if 32 % dp:
            continue
        for b, zero, recompute, sp in itertools.product(
            (1, 2), (0, 1, 2, 3) if dp > 1 else (0,), RECOMPUTE, (False, True)
        ):
            if (sp and tp == 1) or (32 // dp) % b:
                continue
            layout = dataclasses.replace(
                base, dp=dp, tp=tp, pp=pp, microbatch_size=b, microbatches=32 // (dp * b),
                zero=zero, recompute=recompute, sequence_parallel=sp, schedule="1f1b",
            )  # fmt: skip
            memory = max(device_memory_of(MEDIUM, layout, d).total for d in {0, pp - 1})
            if memory > capacity:
                continue
            t = project(MEDIUM, layout, profile, CLOSED).step_time_s  # type: ignore[arg-type]
            fastest = t if fastest is None else min(fastest, t)
    assert fastest is not None and best <= fastest * (1 + 1e-12)


def test_every_ranked_layout_fits_uses_all_gpus_and_is_sorted() -> None:
    profile = _small_gpu()
    result = tune(MEDIUM, profile, 16, 32, Layout())  # type: ignore[arg-type]
    assert result.fitting == len(result.ranked) > 0 and result.enumerated >= result.fitting
    head = [r.projection.step_time_s for r in result.ranked[: result.replayed]]
    assert head == sorted(head)
    for r in result.ranked:
        assert r.layout.world_size == 16 and r.layout.global_batch == 32
        assert r.projection.fits and r.layout.tp <= A100.gpus_per_node
    # Memory made some layouts recompute: the least recomputation that fits is kept.
    assert {r.layout.recompute for r in result.ranked} > {"none"}
    assert result.explanation[0].startswith("Best: ")
    assert any(line.startswith("The runner-up") for line in result.explanation)


def test_fixed_choices_are_held() -> None:
    space = SearchSpace(tp=2, zero_stages=(1,), schedules=("zb-h1",))
    result = tune(MEDIUM, A100, 16, 32, Layout(), space)
    assert result.ranked
    for r in result.ranked:
        assert r.layout.tp == 2 and r.layout.zero in (0, 1)  # dp = 1 has no ZeRO
        assert r.layout.pp == 1 or r.layout.schedule == "zb-h1"


def test_nothing_fits_is_explained() -> None:
    # 1.2B parameters × 16 bytes of mixed-precision Adam state on one 16 GiB GPU
    result = tune(MEDIUM, _small_gpu(), 1, 64, Layout())  # type: ignore[arg-type]
    assert not result.ranked and result.smallest_memory is not None
    assert result.explanation[0].startswith("No layout fits in 15.0 GiB per GPU")


def test_gpt3_on_1024_a100s(tmp_path: Path) -> None:
    out = tmp_path / "tune.json"
    console = _quiet()
    assert tune_command(GPT3, "a100-dgx", 1024, None, [], 5, out, console) == 0
    data = json.loads(out.read_text())
    assert data["gpus"] == 1024 and data["batch"] == 1536 and len(data["layouts"]) == 5
    first = data["layouts"][0]
    layout = first["layout"]
    assert layout["dp"] * layout["tp"] * layout["pp"] == 1024 and layout["tp"] <= 8
    assert first["projection"]["fits"]
    steps = [entry["projection"]["step_time_s"] for entry in data["layouts"]]
    assert steps == sorted(steps)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "Best: " in text and "The runner-up" in text and "Top 5 layouts" in text


def test_set_holds_parallel_choices_fixed(tmp_path: Path) -> None:
    out = tmp_path / "tune.json"
    overrides = ["parallel.tp=8", "parallel.zero=1"]
    assert tune_command(GPT3, "a100-dgx", 1024, None, overrides, 3, out, _quiet()) == 0
    for entry in json.loads(out.read_text())["layouts"]:
        assert entry["layout"]["tp"] == 8 and entry["layout"]["zero"] == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"gpus": 0}, r"^--gpus expected a positive integer, got 0$"),
        ({"gpus": 8, "batch": -1}, r"^--batch expected a positive integer, got -1$"),
        ({"gpus": 8, "hardware": "nope"}, r"^hardware profile 'nope' is neither"),
        ({"gpus": 8, "top": 0}, r"^--top expected a positive integer, got 0$"),
    ],
)
def test_bad_arguments_are_one_line(args: dict, message: str) -> None:
    kwargs = {"hardware": "a100-dgx", "batch": None, "top": 5, **args}
    with pytest.raises(ConfigError, match=message):
        tune_command(GPT3, kwargs["hardware"], kwargs["gpus"], kwargs["batch"], [],
                     kwargs["top"], None, _quiet())  # fmt: skip
