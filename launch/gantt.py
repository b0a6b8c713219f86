"""`civetta schedule`: a pipeline schedule drawn as a terminal Gantt chart, one row per rank.

Time runs left to right in unit slots (F=1, B=2, I=W=1 unless durations are given); each compute
action is a coloured block labelled with its kind and microbatch ("F3", "B0"), idle time is dots.
A chart wider than the terminal is folded into bands of consecutive time windows. Below it, the
schedule's bubble fraction for unit action times beside the textbook (p-1)/(m+p-1).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.text import Text

from launch.schedule_files import load_schedule, save_schedule
from parallel.schedules import (
    Action,
    Durations,
    Schedule,
    bubble_fraction,
    check_schedule,
    make_schedule,
    peak_in_flight,
    simulate,
    textbook_bubble,
    unit_time_bubble,
)

# One background per kind; later chunks of an interleaved rank take the next shade.
KIND_STYLES: dict[str, tuple[str, ...]] = {
    "F": ("bold white on blue", "bold white on dodger_blue2", "bold white on navy_blue"),
    "B": ("bold white on green4", "bold black on green3", "bold white on dark_green"),
    "I": ("bold black on yellow3", "bold black on gold1", "bold black on dark_goldenrod"),
    "W": ("bold white on magenta", "bold white on medium_purple3", "bold white on purple4"),
}
IDLE = "·"


class GanttChart:
    """A rich renderable: per-rank rows of compute blocks, folded to the console's width."""

    def __init__(self, schedule: Schedule, durations: Durations | None = None) -> None:
        self.schedule = schedule
        self.timeline = simulate(schedule, durations)
        self.makespan = max((end for row in self.timeline for _, _, end in row), default=0.0)
        labels = [self.label(a) for row in self.timeline for a, _, _ in row]
        # A unit slot fits the longest label plus a space, so neighbouring blocks stay apart.
        self.slot = max((len(label) for label in labels), default=2) + 1
        self.row_label_width = len(f"rank {schedule.pp - 1} ")

    def chunk(self, action: Action) -> int:
        """Which of its rank's stages the action runs on (0 for the first in model order)."""
        stage = action.stage
        if action.kind in ("RECV_F", "RECV_B"):  # named by the sending stage
            stage += 1 if action.kind == "RECV_F" else -1
        return self.schedule.stages_of(self.schedule.stage_rank(stage)).index(stage)

    def label(self, action: Action) -> str:
        """ "F3" (microbatch 3); with several stages per rank "F3.1" (microbatch 3 on the rank's
        chunk 1)."""
        if self.schedule.virtual_stages == 1:
            return f"{action.kind}{action.microbatch}"
        return f"{action.kind}{action.microbatch}.{self.chunk(action)}"

    def _columns(self, t: float) -> int:
        return round(t * self.slot)

    def _row(self, rank: int) -> list[tuple[str, str]]:
        """The rank's row as (character, style) cells over the whole makespan."""
        total = self._columns(self.makespan)
        cells = [(IDLE, "dim")] * total
        for action, start, end in self.timeline[rank]:
            first, last = self._columns(start), self._columns(end)
            if last <= first:
                continue
            chunk = self.chunk(action)
            shades = KIND_STYLES[action.kind]
            style = shades[chunk % len(shades)]
            text = self.label(action).ljust(last - first)[: last - first]
            for offset, char in enumerate(text):
                cells[first + offset] = (char, style)
        return cells

    def _axis(self, start: int, stop: int) -> Text:
        """Time ticks (in unit slots) every few units, over columns [start, stop)."""
        every = 5 if self.slot >= 3 else 10
        axis = [" "] * (stop - start)
        unit = 0
        while self._columns(unit) < stop:
            column = self._columns(unit)
            if column >= start and unit % every == 0:
                label = f"|{unit}"
                for offset, char in enumerate(label):
                    if column - start + offset < len(axis):
                        axis[column - start + offset] = char
            unit += 1
        return Text(" " * self.row_label_width + "".join(axis).rstrip(), style="dim")

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        rows = [self._row(rank) for rank in range(self.schedule.pp)]
        total = self._columns(self.makespan)
        band = max(options.max_width - self.row_label_width, self.slot)
        band -= band % self.slot  # fold on unit boundaries
        for band_start in range(0, max(total, 1), band):
            band_stop = min(band_start + band, total)
            if band_start:
                yield Text("")
            yield self._axis(band_start, band_stop)
            for rank, cells in enumerate(rows):
                line = Text(f"rank {rank}".ljust(self.row_label_width), no_wrap=True)
                for char, style in cells[band_start:band_stop]:
                    line.append(char, style=style)
                yield line


def legend(schedule: Schedule) -> Text:
    kinds = {a.kind for row in schedule.actions for a in row if a.is_compute}
    names = {"F": "forward", "B": "backward", "I": "backward-input", "W": "backward-weight"}
    text = Text()
    for kind in ("F", "B", "I", "W"):
        if kind in kinds:
            sample = f" {kind}m " if schedule.virtual_stages == 1 else f" {kind}m.c "
            text.append(sample, style=KIND_STYLES[kind][0])
            text.append(f" {names[kind]}  ")
    text.append(f"{IDLE} idle", style="dim")
    if schedule.virtual_stages > 1 and schedule.placement is not None:
        text.append("   (m: microbatch; c: the rank's chunk, 0 on the V's way down, 1 up)")
    elif schedule.virtual_stages > 1:
        text.append(f"   (m: microbatch; c: chunk, stage c·{schedule.pp}+rank)")
    return text


def summary_lines(schedule: Schedule, durations: Durations | None = None) -> list[str]:
    """Bubble for unit action times beside the textbook value; peak in-flight per rank."""
    p, m, v = schedule.pp, schedule.microbatches, schedule.virtual_stages
    tv = v if schedule.name == "interleaved-1f1b" else 1  # whose textbook value is shown
    formula = "(p−1)/(m+p−1)" if tv == 1 else "(p−1)/(v·m+p−1)"
    textbook = "1F1B's " if schedule.name not in ("1f1b", "gpipe", "interleaved-1f1b") else ""
    parts = [
        f"bubble (unit times F=1, B=2, I=W=1): {unit_time_bubble(schedule):.1%}",
        f"{textbook}textbook {formula} = {textbook_bubble(p, m, tv):.1%}",
    ]
    if durations is not None:
        parts.insert(1, f"with the given durations: {bubble_fraction(schedule, durations):.1%}")
    peaks = " ".join(str(peak) for peak in peak_in_flight(schedule))
    unit = "microbatches" if v == 1 else "(microbatch, chunk) pairs"
    return [" · ".join(parts), f"peak in-flight {unit} per rank: {peaks}"]


def render_gantt(schedule: Schedule, durations: Durations | None = None) -> RenderableType:
    """Title, the Gantt chart, a legend and the bubble summary, as one rich renderable."""
    title = Text(
        f"{schedule.name}: pp={schedule.pp}, microbatches={schedule.microbatches}"
        + (f", virtual stages={schedule.virtual_stages}" if schedule.virtual_stages > 1 else ""),
        style="bold",
    )
    return Group(
        title,
        GanttChart(schedule, durations),
        legend(schedule),
        *(Text(line) for line in summary_lines(schedule, durations)),
    )


def schedule_command(
    pp: int,
    microbatches: int,
    schedule_name: str,
    virtual_stages: int,
    save: str | Path | None = None,
    load: str | Path | None = None,
    console: Console | None = None,
    save_trace: str | Path | None = None,
) -> int:
    """Build (or load) a schedule, check it, draw it, optionally save it and its unit-time
    replay as a Chrome trace (`launch.trace`); returns the exit code.

    With `load`, the file defines the schedule and pp, microbatches, schedule_name and
    virtual_stages are ignored. Problems raise ScheduleError (a ValueError) for the CLI to print.
    """
    console = console or Console()
    if load is not None:
        schedule = load_schedule(load)
    else:
        schedule = make_schedule(schedule_name, pp, microbatches, virtual_stages)
    check_schedule(schedule)
    console.print(render_gantt(schedule))
    if save is not None:
        save_schedule(schedule, save)
        console.print(f"saved {schedule.name} schedule to {save}")
    if save_trace is not None:
        from launch.trace import schedule_trace, write_trace

        write_trace(Path(save_trace), schedule_trace(schedule))
        console.print(f"saved the unit-time trace to {save_trace} (open it in ui.perfetto.dev)")
    return 0
