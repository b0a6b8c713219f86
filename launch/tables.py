"""Terminal tables that fit the console: an 80-column terminal, a file or a pipe.

A table wider than the console is not squeezed (rich would cut its cells to "1…"): it is split
into parts at its column groups, each part led by the same leading columns (a row's name), and
each part is as wide as its content needs. A group too wide for one part is split between
columns. On a wide terminal the parts are fewer; output that is not a terminal is rendered at
80 columns, whatever the environment says.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

WIDTH = 80  # the width of what is not a terminal, and the width the tests hold every table to


def cli_console() -> Console:
    """The terminal as it is; anything else (a file, a pipe, a capture) at WIDTH columns."""
    console = Console()
    return console if console.is_terminal else Console(width=WIDTH)


@dataclass(frozen=True)
class Field:
    """One column of a terminal table."""

    header: str
    group: str = ""  # consecutive fields of one group stay in one part when they fit
    justify: Literal["left", "right"] = "right"


def _table(
    fields: Sequence[Field],
    rows: Sequence[Sequence[str]],
    keep: Sequence[int],
    styles: Sequence[str | None],
) -> Table:
    table = Table(header_style="bold")
    for i in keep:
        # "fold": a cell too long for the console (a very long name) wraps, it is never cut.
        table.add_column(fields[i].header, justify=fields[i].justify, overflow="fold")
    for row, style in zip(rows, styles, strict=True):
        table.add_row(*(row[i] for i in keep), style=style)
    return table


def _width(console: Console, table: Table) -> int:
    """The width `table` takes when nothing constrains it."""
    return Measurement.get(console, console.options.update_width(10**6), table).maximum


def parts(
    console: Console,
    fields: Sequence[Field],
    rows: Sequence[Sequence[str]],
    lead: int = 1,
    width: int | None = None,
) -> list[list[int]]:
    """The columns of each part, as indices into `fields`: the first `lead` fields in every
    part, then the groups in order, whole while they fit in `width` (the console's by default);
    a group too wide for any part is spread evenly over as few parts as it needs."""
    width = console.width if width is None else width
    styles = [None] * len(rows)
    head = list(range(lead))

    def fits(columns: list[int]) -> bool:
        return _width(console, _table(fields, rows, head + columns, styles)) <= width

    groups: list[list[int]] = []
    for i in range(lead, len(fields)):
        if groups and fields[groups[-1][-1]].group == fields[i].group:
            groups[-1].append(i)
        else:
            groups.append([i])
    done: list[list[int]] = []
    current: list[int] = []
    for group in groups:
        if fits(current + group):
            current += group
        elif fits(group):  # a group that fits a part of its own is not split
            done.append(current)
            current = group
        else:  # too wide for any part: it fills this part, then the next ones, evenly
            columns, greedy = current + group, [[]]
            for i in columns:
                if greedy[-1] and not fits([*greedy[-1], i]):
                    greedy.append([])
                greedy[-1].append(i)
            size = -(-len(columns) // len(greedy))
            even = [columns[k : k + size] for k in range(0, len(columns), size)]
            chunks = even if len(even) == len(greedy) and all(map(fits, even)) else greedy
            done += chunks[:-1]
            current = chunks[-1]  # the next group may still join the last one
    done.append(current)
    return [head + columns for columns in done if columns or len(done) == 1]


def print_table(
    console: Console,
    title: str,
    fields: Sequence[Field],
    rows: Sequence[Sequence[str]],
    *,
    lead: int = 1,
    styles: Sequence[str | None] | None = None,
    legend: Sequence[str] = (),
) -> None:
    """Print `rows` under `title` in as many parts as the console's width needs ("title (1/2)",
    "title (2/2)"), then the legend of abbreviated headers once, under the last part."""
    styles = [None] * len(rows) if styles is None else styles
    split = parts(console, fields, rows, lead)
    for k, keep in enumerate(split, start=1):
        name = title if len(split) == 1 else f"{title} ({k}/{len(split)})"
        # The title is a line of its own: a table's title would wrap at the table's width.
        console.print(Text(name, style="table.title"))
        console.print(_table(fields, rows, keep, styles))
    if legend:
        console.print(Text("; ".join(legend) + ".", style="dim"))
