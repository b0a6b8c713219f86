"""The published measurements in configs/references: each file well formed, each row's config a
valid civetta experiment whose layout covers the GPUs the source names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from launch.config import from_dict, read_with_includes

REFERENCES = Path(__file__).resolve().parent.parent / "configs" / "references"
FILES = sorted(REFERENCES.glob("*.yaml"))

TOP_LEVEL = {"name", "source", "hardware", "framework", "metric", "rows"}
HARDWARE = {"a100-dgx", "h100-dgx", "h200-dgx", "b200-dgx"}
FRAMEWORKS = {"megatron-2021", "megatron-core", "deepspeed", "torchtitan"}
METRICS = {"tflops_per_gpu", "mfu", "tokens_per_s_per_gpu", "peak_memory_gib"}
ROW_KEYS = {"id", "gpus", "config", "framework", "measured", "note"}


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path.name}: expected a mapping"
    return data


def _row_config(path: Path, config: dict[str, Any], tmp_path: Path) -> Any:
    """The row's config read as civetta reads an experiment file: includes relative to the
    reference file (made absolute, so the copy in tmp_path resolves them the same way)."""
    raw = dict(config)
    includes = raw.get("include")
    if includes is not None:
        names = [includes] if isinstance(includes, str) else includes
        raw["include"] = [str((path.parent / name).resolve()) for name in names]
    copy = tmp_path / f"{path.stem}.yaml"
    copy.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return from_dict(read_with_includes(copy), origin=str(path))


def test_there_are_reference_files() -> None:
    assert FILES


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_reference_file(path: Path, tmp_path: Path) -> None:
    data = _load(path)
    missing = TOP_LEVEL - set(data)
    assert not missing, f"{path.name}: missing top-level keys {sorted(missing)}"
    assert data["name"] == path.stem
    assert isinstance(data["source"], str) and data["source"]
    assert data["hardware"] in HARDWARE
    assert data["framework"] in FRAMEWORKS
    assert data["metric"] in METRICS
    rows = data["rows"]
    assert isinstance(rows, list) and rows
    ids = [row.get("id") for row in rows]
    assert len(set(ids)) == len(ids), f"{path.name}: duplicate ids"
    for row in rows:
        where = f"{path.name} row {row.get('id')}"
        assert {"id", "gpus", "config", "measured"} <= set(row), where
        assert set(row) <= ROW_KEYS, f"{where}: unknown keys {sorted(set(row) - ROW_KEYS)}"
        assert isinstance(row.get("framework", {}), dict), where
        measured = row["measured"]
        assert isinstance(measured, dict) and data["metric"] in measured, where
        assert set(measured) <= METRICS, where
        assert all(isinstance(v, int | float) and v > 0 for v in measured.values()), where
        config = _row_config(path, row["config"], tmp_path)
        p = config.parallel
        assert p.dp * p.tp * p.pp * p.cp == row["gpus"], f"{where}: dp·tp·pp·cp != gpus"
        assert config.world_size == row["gpus"], where
