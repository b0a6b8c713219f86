"""Pipeline schedules on disk: CSV and YAML files a user can write by hand and run.

Loading checks the schedule (`parallel.schedules.check_schedule`) before returning it, and a
compute-only file gets its sends and receives inserted. YAML is read with `yaml.safe_load` only.
"""

from __future__ import annotations

import csv
import io
import itertools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from parallel.schedules import (
    Action,
    Schedule,
    ScheduleError,
    check_schedule,
    insert_communication,
)

CSV_COLUMNS = ("rank", "index", "kind", "microbatch", "stage")


def save_schedule(schedule: Schedule, path: str | Path) -> None:
    """Write `schedule` as CSV (.csv) or YAML (.yaml/.yml), chosen by the file's suffix.

    CSV: a first comment line "# name=...,pp=...,microbatches=...,virtual_stages=..." (and
    ",placement=0 1 1 0" where stages are not interleaved) then the columns
    rank,index,kind,microbatch,stage, one row per action. YAML: a mapping with name, pp,
    microbatches, virtual_stages, placement (each stage's rank, where not interleaved) and ranks,
    a list per rank of action strings ("F0@s0").
    """
    path = Path(path)
    kind = _file_kind(path)
    if kind == "csv":
        buffer = io.StringIO()
        buffer.write(
            f"# name={schedule.name},pp={schedule.pp},microbatches={schedule.microbatches},"
            f"virtual_stages={schedule.virtual_stages}"
        )
        if schedule.placement is not None:
            buffer.write(",placement=" + " ".join(map(str, schedule.placement)))
        buffer.write("\n")
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for rank, rank_actions in enumerate(schedule.actions):
            for index, action in enumerate(rank_actions):
                writer.writerow((rank, index, action.kind, action.microbatch, action.stage))
        text = buffer.getvalue()
    else:
        import yaml

        document = {
            "name": schedule.name,
            "pp": schedule.pp,
            "microbatches": schedule.microbatches,
            "virtual_stages": schedule.virtual_stages,
            **({"placement": list(schedule.placement)} if schedule.placement else {}),
            "ranks": [
                [str(action) for action in rank_actions] for rank_actions in schedule.actions
            ],
        }
        text = yaml.safe_dump(document, sort_keys=False, default_flow_style=None, width=100)
    try:
        path.write_text(text)
    except OSError as exc:
        raise ScheduleError(f"{path}: cannot write schedule: {exc.strerror or exc}") from exc


def _file_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".yaml", ".yml"):
        return "yaml"
    raise ScheduleError(f"{path}: schedule files must end in .csv, .yaml or .yml")


def load_schedule(path: str | Path, insert_comms: bool | None = None) -> Schedule:
    """Read a schedule written by `save_schedule` (or by hand) and check it.

    Metadata may be omitted: pp defaults to the number of ranks, microbatches to the largest
    microbatch + 1, virtual_stages to the number of stages / pp, name to the file's stem, and
    placement (each stage's rank) to where the file's compute actions of each stage run
    (interleaved when that is interleaved).
    `insert_comms`: None (default) adds SEND/RECV actions with `insert_communication` when the
    file has no communication action at all, so a compute-only file runs as written; True always
    adds them (the file must then be compute-only); False never does.
    """
    path = Path(path)
    kind = _file_kind(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ScheduleError(f"{path}: cannot read schedule: {exc.strerror or exc}") from exc
    if kind == "csv":
        meta, actions = _parse_csv(path, text)
    else:
        meta, actions = _parse_yaml(path, text)
    schedule = _assemble(path, meta, actions)
    has_comm = schedule.has_communication
    if insert_comms or (insert_comms is None and not has_comm):
        try:
            schedule.actions = insert_communication(
                schedule.actions, schedule.pp, schedule.virtual_stages, schedule.placement
            )
        except ScheduleError as exc:
            raise ScheduleError(f"{path}: {exc}") from None
    try:
        check_schedule(schedule)
    except ScheduleError as exc:
        raise ScheduleError(f"{path}: {exc}") from None
    return schedule


def _meta_int(path: Path, where: str, key: str, value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ScheduleError(f"{path} {where}: {key} must be a positive integer, got {value!r}")
    return value


def _placement(path: Path, where: str, value: Any) -> tuple[int, ...]:
    """A placement as written: each stage's rank, non-negative integers."""
    items = value if isinstance(value, list) else None
    ranks = []
    for item in items or []:
        if isinstance(item, str) and item.isdigit():
            item = int(item)
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            items = None
            break
        ranks.append(item)
    if not items:
        raise ScheduleError(
            f"{path} {where}: placement must list each stage's rank (non-negative integers), "
            f"got {value!r}"
        )
    return tuple(ranks)


def _parse_csv(path: Path, text: str) -> tuple[dict[str, Any], list[list[Action]]]:
    meta: dict[str, Any] = {}
    rows: dict[int, list[tuple[int, Action, int]]] = {}
    header_seen = False
    for line_no, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            for item in stripped.lstrip("#").split(","):
                if "=" in item:
                    key, _, value = item.partition("=")
                    key = key.strip()
                    value, where = value.strip(), f"line {line_no}"
                    if key == "placement":
                        meta[key] = _placement(path, where, value.split())
                    elif key in ("name", "pp", "microbatches", "virtual_stages"):
                        meta[key] = value if key == "name" else _meta_int(path, where, key, value)
            continue
        cells = [cell.strip() for cell in next(csv.reader([line]))]
        if not header_seen:
            if tuple(cell.lower() for cell in cells) != CSV_COLUMNS:
                raise ScheduleError(
                    f"{path} line {line_no}: expected the header {','.join(CSV_COLUMNS)}, "
                    f"got {line.strip()!r}"
                )
            header_seen = True
            continue
        if len(cells) != len(CSV_COLUMNS):
            raise ScheduleError(
                f"{path} line {line_no}: expected {len(CSV_COLUMNS)} columns "
                f"({','.join(CSV_COLUMNS)}), got {len(cells)}"
            )
        rank_text, index_text, kind, micro_text, stage_text = cells
        numbers = []
        for label, value in (
            ("rank", rank_text),
            ("index", index_text),
            ("microbatch", micro_text),
            ("stage", stage_text),
        ):
            if not value.isdigit():
                raise ScheduleError(
                    f"{path} line {line_no}: {label} must be a non-negative integer, got {value!r}"
                )
            numbers.append(int(value))
        rank, index, microbatch, stage = numbers
        try:
            action = Action(kind, microbatch, stage)
        except ScheduleError as exc:
            raise ScheduleError(f"{path} line {line_no}: {exc}") from None
        rows.setdefault(rank, []).append((index, action, line_no))
    if not header_seen:
        raise ScheduleError(f"{path}: no header row {','.join(CSV_COLUMNS)} found")
    num_ranks = max(rows, default=-1) + 1
    actions: list[list[Action]] = []
    for rank in range(num_ranks):
        entries = sorted(rows.get(rank, []), key=lambda entry: entry[0])
        for (index_a, _, _), (index_b, _, line_b) in itertools.pairwise(entries):
            if index_a == index_b:
                raise ScheduleError(
                    f"{path} line {line_b}: rank {rank} has two actions with index {index_b}"
                )
        actions.append([action for _, action, _ in entries])
    return meta, actions


def _parse_yaml(path: Path, text: str) -> tuple[dict[str, Any], list[list[Action]]]:
    import yaml

    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ScheduleError(f"{path}{where}: {problem}") from None
    if not isinstance(document, dict) or "ranks" not in document:
        raise ScheduleError(
            f"{path}: expected a mapping with 'ranks' (a list per rank of actions like F0@s0)"
        )
    keys = {"name", "pp", "microbatches", "virtual_stages", "placement", "ranks"}
    unknown = sorted(set(document) - keys)
    if unknown:
        raise ScheduleError(f"{path}: unknown key {unknown[0]!r}")
    ranks = document["ranks"]
    if not isinstance(ranks, list) or not all(isinstance(items, list) for items in ranks):
        raise ScheduleError(f"{path}: 'ranks' must be a list of lists of actions like F0@s0")
    meta: dict[str, Any] = {}
    for key in ("pp", "microbatches", "virtual_stages"):
        if key in document:
            meta[key] = _meta_int(path, f"key {key!r}", key, document[key])
    if "name" in document:
        meta["name"] = str(document["name"])
    if "placement" in document:
        meta["placement"] = _placement(path, "key 'placement'", document["placement"])
    actions: list[list[Action]] = []
    for rank, items in enumerate(ranks):
        rank_actions = []
        for index, item in enumerate(items):
            try:
                rank_actions.append(Action.parse(item))
            except ScheduleError as exc:
                raise ScheduleError(f"{path} rank {rank}, item {index}: {exc}") from None
        actions.append(rank_actions)
    return meta, actions


def _assemble(path: Path, meta: dict[str, Any], actions: list[list[Action]]) -> Schedule:
    all_actions = [action for rank_actions in actions for action in rank_actions]
    if not all_actions:
        raise ScheduleError(f"{path}: the schedule has no actions")
    pp = meta.get("pp", len(actions))
    if len(actions) > pp:
        raise ScheduleError(f"{path}: actions for rank {len(actions) - 1} but pp={pp}")
    actions = actions + [[] for _ in range(pp - len(actions))]
    microbatches = meta.get("microbatches", max(a.microbatch for a in all_actions) + 1)
    if "virtual_stages" in meta:
        virtual_stages = meta["virtual_stages"]
    else:
        # A forward message names its sending stage, so the receiving stage is one further.
        num_stages = 1 + max(a.stage + (a.kind in ("SEND_F", "RECV_F")) for a in all_actions)
        virtual_stages = -(-num_stages // pp)
    name = meta.get("name") or path.stem
    placement = meta.get("placement") or _placement_of(path, actions, pp * virtual_stages)
    if placement == tuple(s % pp for s in range(pp * virtual_stages)):
        placement = None  # interleaved: the default
    if placement is not None and len(placement) != pp * virtual_stages and "placement" in meta:
        raise ScheduleError(
            f"{path}: placement lists {len(placement)} stages, the schedule has "
            f"pp × virtual_stages = {pp * virtual_stages}"
        )
    try:
        return Schedule(name, pp, microbatches, virtual_stages, actions, placement)
    except ScheduleError as exc:
        raise ScheduleError(f"{path}: {exc}") from None


def _placement_of(
    path: Path, actions: list[list[Action]], num_stages: int
) -> tuple[int, ...] | None:
    """Each stage's rank, from where the file runs its compute actions (None: a stage has
    none, which the checker reports as missing work)."""
    where: dict[int, int] = {}
    for rank, rank_actions in enumerate(actions):
        for action in rank_actions:
            if not action.is_compute:
                continue
            seen = where.setdefault(action.stage, rank)
            if seen != rank:
                raise ScheduleError(
                    f"{path}: stage {action.stage} has compute actions on rank {seen} and on "
                    f"rank {rank}; a stage lives on one rank"
                )
    if set(where) != set(range(num_stages)):
        return None
    return tuple(where[s] for s in range(num_stages))


def schedule_lines(schedule: Schedule) -> Iterable[str]:
    """One line per rank: "rank 0: F0@s0 SEND_F0@s0 ...", for logs and error reports."""
    for rank, rank_actions in enumerate(schedule.actions):
        yield f"rank {rank}: " + " ".join(str(action) for action in rank_actions)
