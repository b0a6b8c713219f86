"""The shipped profiles against every published row they were fitted on or held out from.

    python benchmarks/bench_accuracy.py > benchmarks/results/accuracy.txt

For each calibration spec (`configs/calibration/*.yaml`), the rows it was fitted on (in-sample)
and the rows held out (frozen before the fit), projected with the profile as shipped: measured,
projected, relative error, largest and mean error per set. The same rows and bounds are the
tests' (`tests/test_reference_accuracy.py`); the README quotes this output. Re-fitting is
`civetta fit configs/calibration/NAME.yaml --write`.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.fit import CALIBRATION_DIR, calibrate, load_spec, report


def main() -> None:
    for path in sorted(CALIBRATION_DIR.glob("*.yaml")):
        spec = load_spec(path)
        cal = calibrate(dataclasses.replace(spec, free=[]))  # as shipped, nothing refitted
        entry = cal.profile.calibration.get(spec.name, {})
        fitted = ", ".join(f"{k} = {v:g}" for k, v in entry.get("fitted", {}).items())
        print(f"== {spec.name} ({path.name}); fitted: {fitted or 'nothing'}")
        for line in report(cal)[2:]:
            print(line)
        print()


if __name__ == "__main__":
    main()
