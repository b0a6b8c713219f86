"""The a100-dgx projection against Megatron-LM's published throughput (Narayanan et al. 2021).

    python benchmarks/bench_megatron_tables.py > benchmarks/results/megatron_tables.txt

Prints, per row, the measured and projected teraFLOP/s per GPU (Eq. 3, recomputation counted)
and the relative error, for Table 1 (the ten rows the profile's four efficiency numbers were
fitted on: in-sample) and Table 2's PTD-P rows (not used in any fit: held out). The tables and
the projection of a row are the tests' own (`tests/test_cost.py`), so the figures quoted in the
README are what the tests check.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import test_cost  # the tables live with the tests that check them


def report(title: str, rows: list) -> None:
    print(title)
    header = ("params", 8), ("gpus", 5), ("tp", 3), ("pp", 3), ("measured", 9), ("projected", 10)
    print(" ".join(f"{name:>{width}}" for name, width in header), f"{'error':>7}")
    errors = []
    for run in rows:
        projected = test_cost.megatron_projection(run)
        error = projected / run.tflops - 1
        errors.append(abs(error))
        print(
            f"{run.params_b:>7}B {run.gpus:>5} {run.tp:>3} {run.pp:>3} {run.tflops:>9.0f} "
            f"{projected:>10.1f} {error:>+7.1%}"
        )
    print(f"largest error {max(errors):.1%}, mean {sum(errors) / len(errors):.1%}\n")


def main() -> None:
    report("Table 1 (in-sample: the profile was fitted on these rows)", test_cost.TABLE_1)
    report("Table 2, PTD-P rows (held out)", test_cost.TABLE_2_PTDP)


if __name__ == "__main__":
    main()
