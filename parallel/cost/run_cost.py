"""The cost of a training run: one projected step (`parallel.cost.projection.Projection`)
repeated over a token count, in steps, wall-clock time, GPU-hours, dollars and energy.

- steps = ⌈tokens / tokens per step⌉, wall-clock = steps × step time (the projected step, with
  no time for evaluation, checkpoints, failures or restarts);
- GPU-hours = GPUs × wall-clock hours; dollars = GPU-hours × the profile's price per GPU-hour;
- energy (kWh) = GPUs × board power × hours × PUE. This assumes every GPU board draws its rated
  power (datasheet TDP) for the whole run, an upper-bound style figure for the boards, and counts
  nothing else of a node (CPUs, NICs, switches, storage) except through the PUE. A profile
  without `board_power_w` and `pue` (`local`) has no energy figure: None.

`compute-optimal` tokens are Hoffmann et al. 2022's (Chinchilla) 20 tokens per parameter. For a
mixture of experts the parameters are the *active* ones (what one token's forward uses): the
rule trades parameters against tokens at a fixed compute C ≈ 6·N·D, and a token's compute is set
by its active parameters. This is an assumption: the rule was fitted on dense models only.

Also here: reading a token count (`--tokens`) and a budget (`--budget`) from the command line,
as `CostModelError`s of one line naming the flag.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from parallel.cost.hardware import CostModelError, HardwareProfile

if TYPE_CHECKING:
    from parallel.cost.projection import Projection

TOKENS_PER_PARAMETER = 20  # Hoffmann et al. 2022, Table 3's ratio at the compute-optimal frontier
COMPUTE_OPTIMAL = "compute-optimal"
SECONDS_PER_DAY = 86400

# The suffixes a count may carry: 300B tokens, 1.5T, 200k GPU-hours, $1.5M.
SCALES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_AMOUNT = re.compile(
    r"(?P<number>[0-9][0-9_]*(\.[0-9]*)?([eE][+-]?[0-9]+)?)(?P<scale>[kKmMbBgGtT]?)"
)

ENERGY_LEGEND = (
    "energy = GPUs × board power (datasheet TDP) × hours × PUE: every board at its rated power "
    "for the whole run, an upper-bound style assumption; hosts and network only through the PUE"
)


@dataclass(frozen=True)
class RunCost:
    """A training run of `tokens` tokens at one projected step. Times in seconds."""

    tokens: int
    steps: int
    wall_time_s: float
    gpus: int
    price_per_gpu_hour: float
    board_power_w: float | None = None
    pue: float | None = None

    @property
    def days(self) -> float:
        return self.wall_time_s / SECONDS_PER_DAY

    @property
    def gpu_hours(self) -> float:
        return self.gpus * self.wall_time_s / 3600

    @property
    def cost(self) -> float:
        """Dollars at the profile's assumed price per GPU-hour."""
        return self.gpu_hours * self.price_per_gpu_hour

    @property
    def energy_kwh(self) -> float | None:
        """kWh drawn with every board at its rated power, times the PUE; None when unknown."""
        if self.board_power_w is None or self.pue is None:
            return None
        return self.gpu_hours * self.board_power_w / 1000 * self.pue

    def as_dict(self) -> dict[str, Any]:
        """The keys `Projection.training` has always had, then days and energy."""
        return {
            "tokens": self.tokens,
            "steps": self.steps,
            "wall_time_s": self.wall_time_s,
            "gpu_hours": self.gpu_hours,
            "cost": self.cost,
            "days": self.days,
            "energy_kwh": self.energy_kwh,
        }


def run_cost(
    projection: Projection, tokens: int, profile: HardwareProfile | None = None
) -> RunCost:
    """Training on `tokens` tokens at `projection`'s step; energy from `profile`'s board power
    and PUE when given (the price is the projection's, as it was projected)."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise CostModelError(f"tokens expected a positive integer, got {tokens!r}")
    steps = math.ceil(tokens / projection.tokens_per_step)
    return RunCost(
        tokens=tokens,
        steps=steps,
        wall_time_s=steps * projection.step_time_s,
        gpus=projection.world_size,
        price_per_gpu_hour=projection.price_per_gpu_hour,
        board_power_w=profile.board_power_w if profile else None,
        pue=profile.pue if profile else None,
    )


# ---- compute-optimal tokens ---------------------------------------------------------------------
def scaling_parameters(config: Any) -> tuple[int, str]:
    """The parameter count the 20-tokens rule applies to, and which count it is: a mixture of
    experts' active parameters (see the module's docstring), a dense model's all."""
    if getattr(config, "moe", None) is not None:
        return config.active_parameters(), "active"
    return config.num_parameters(), "all"


def compute_optimal_tokens(config: Any) -> int:
    """Hoffmann et al. 2022: 20 tokens per (active) parameter."""
    return TOKENS_PER_PARAMETER * scaling_parameters(config)[0]


def compute_optimal_note(config: Any) -> str:
    """One line saying how `compute-optimal` was counted for this model."""
    n, which = scaling_parameters(config)
    text = (
        f"compute-optimal = {TOKENS_PER_PARAMETER} tokens per parameter (Hoffmann et al. 2022) "
        f"× {_count(n)} parameters"
    )
    if which == "active":
        total = config.num_parameters()
        text = text.replace(" parameters", " active parameters") + (
            f" (a MoE: active, as a token's compute is; the rule was fitted on dense models; "
            f"× all {_count(total)} would be {_count(TOKENS_PER_PARAMETER * total)} tokens)"
        )
    return text


def _count(n: float) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


# ---- reading the command line -------------------------------------------------------------------
def parse_amount(text: str) -> Decimal | None:
    """'300e9', '300B', '1.5T', '200k', '1_000' as an exact decimal; None if it is none of
    those. Suffixes: k 10^3, M 10^6, B or G 10^9, T 10^12 (either case)."""
    match = _AMOUNT.fullmatch(text.strip())
    if match is None:
        return None
    try:
        number = Decimal(match["number"].replace("_", ""))
    except InvalidOperation:
        return None
    amount = number * SCALES[match["scale"].lower()]
    # Beyond 10^18 is a typo, not a run (and a huge exponent would build a huge integer).
    return amount if amount.adjusted() <= 18 else None


TOKENS_EXPECTED = (
    "a positive whole number of tokens (300000000000, 300e9, 300B, 1.5T) or compute-optimal"
)


def parse_tokens(value: int | str) -> int | str:
    """--tokens: a positive integer, or the word compute-optimal (resolved per model later)."""
    if isinstance(value, int) and not isinstance(value, bool):
        amount: Decimal | None = Decimal(value)
    elif isinstance(value, str):
        if value.strip() == COMPUTE_OPTIMAL:
            return COMPUTE_OPTIMAL
        amount = parse_amount(value)
    else:
        amount = None
    if amount is None or amount < 1 or amount != amount.to_integral_value():
        raise CostModelError(f"--tokens expected {TOKENS_EXPECTED}, got {value!r}")
    return int(amount)


def resolve_tokens(value: int | str, config: Any) -> int:
    """A parsed --tokens for this model: compute-optimal counted from its parameters."""
    return compute_optimal_tokens(config) if value == COMPUTE_OPTIMAL else int(value)


@dataclass(frozen=True)
class Budget:
    """A cap on a run: GPU-hours ("gpuh") or dollars ("usd")."""

    amount: float
    unit: str

    def spent(self, run: RunCost) -> float:
        return run.gpu_hours if self.unit == "gpuh" else run.cost

    def describe(self) -> str:
        amount = f"{self.amount:,.0f}" if self.amount >= 100 else f"{self.amount:.3g}"
        return f"{amount} GPU-hours" if self.unit == "gpuh" else f"${amount}"


BUDGET_EXPECTED = "an amount with a unit: 200000gpuh or 200kgpuh (GPU-hours), 1.5Musd or '$1.5M'"


def parse_budget(text: str) -> Budget:
    """--budget: AMOUNT followed by gpuh (GPU-hours) or usd (dollars), or $AMOUNT; AMOUNT as
    `parse_amount` reads it (200000, 200k, 1.5M, 2e5)."""
    raw = text.strip() if isinstance(text, str) else ""
    unit, amount_text = None, raw
    if raw.startswith("$"):
        unit, amount_text = "usd", raw[1:]
    else:
        for suffix in ("gpuh", "usd"):
            if raw.lower().endswith(suffix):
                unit, amount_text = suffix, raw[: -len(suffix)]
    amount = parse_amount(amount_text) if unit else None
    if amount is None or amount <= 0:
        raise CostModelError(f"--budget expected {BUDGET_EXPECTED}, got {text!r}")
    return Budget(float(amount), unit)  # type: ignore[arg-type]
