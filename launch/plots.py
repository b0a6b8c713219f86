"""Plots for the comparison report as inline SVG text: line charts, stacked bars, a Gantt chart.

Written by hand so `report.html` needs nothing beyond the standard library and opens anywhere
without a network; each function returns one `<svg>` element as a string.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape

# A qualitative palette (distinct hues that stay apart in greyscale order too).
PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#59a14f",
    "#e15759",
    "#76b7b2",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
)
# Pipeline action kinds: forward, backward, backward-input and backward-weight (zero bubble).
KIND_COLORS = {"F": "#4e79a7", "B": "#59a14f", "I": "#edc948", "W": "#b07aa1"}

WIDTH = 760
FONT = 'font-family="system-ui, sans-serif" font-size="11"'


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (steps of 1, 2 or 5 times a power of ten)."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    ticks = []
    value = first
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < hi:
        ticks.append(round(value, 12))
    return ticks


def tick_text(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e5 or abs(value) < 1e-3:
        return f"{value:.0e}"
    return f"{value:g}"


def _svg(height: int, body: list[str], title: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" role="img" {FONT}>'
        f"<title>{escape(title)}</title>"
        f'<text x="{WIDTH / 2}" y="16" text-anchor="middle" font-size="13" '
        f'font-weight="bold">{escape(title)}</text>' + "".join(body) + "</svg>"
    )


def _legend(names: Sequence[tuple[str, str]], x: float, y: float) -> list[str]:
    """A vertical legend of (name, colour) at (x, y)."""
    items = []
    for i, (name, fill) in enumerate(names):
        top = y + 16 * i
        items.append(f'<rect x="{x}" y="{top}" width="10" height="10" fill="{fill}"/>')
        items.append(f'<text x="{x + 14}" y="{top + 9}">{escape(name)}</text>')
    return items


def line_chart(
    series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    title: str,
    x_label: str,
    y_label: str,
    log_y: bool = False,
    floor: float = 1e-18,
) -> str:
    """One polyline per (name, xs, ys); with `log_y`, values below `floor` sit on the floor."""
    left, right, top, bottom, height = 60, 170, 28, 40, 300
    plot_w, plot_h = WIDTH - left - right, height - top - bottom
    points = [(x, y) for _, xs, ys in series for x, y in zip(xs, ys, strict=False)]
    if not points:
        return _svg(60, ['<text x="20" y="40">no data</text>'], title)

    def transform(y: float) -> float:
        return math.log10(max(y, floor)) if log_y else y

    x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
    ys = [transform(p[1]) for p in points]
    if log_y:
        y_lo, y_hi = math.floor(min(ys)), math.ceil(max(ys))
        if y_hi == y_lo:
            y_hi += 1
        y_ticks = [float(v) for v in range(int(y_lo), int(y_hi) + 1)]
        if len(y_ticks) > 8:  # every other power of ten on a tall range
            y_ticks = y_ticks[:: math.ceil(len(y_ticks) / 8)]
    else:
        y_ticks = nice_ticks(min(ys), max(ys))
        y_lo, y_hi = y_ticks[0], y_ticks[-1]
    x_ticks = nice_ticks(x_lo, x_hi)
    if all(isinstance(x, int) for x, _ in points):  # steps: no tick between two steps
        x_ticks = [t for t in x_ticks if t == int(t)] if x_hi - x_lo >= 2 else [x_lo, x_hi]
    x_lo, x_hi = x_ticks[0], x_ticks[-1]

    def px(x: float) -> float:
        return left + (x - x_lo) / ((x_hi - x_lo) or 1) * plot_w

    def py(y: float) -> float:
        return top + plot_h - (y - y_lo) / ((y_hi - y_lo) or 1) * plot_h

    body = [
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>'
    ]
    for t in y_ticks:
        y = py(t)
        label = f"1e{int(t)}" if log_y else tick_text(t)
        body.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" '
                    'stroke="#eee"/>')  # fmt: skip
        body.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    for t in x_ticks:
        x = px(t)
        body.append(
            f'<text x="{x:.1f}" y="{top + plot_h + 14}" text-anchor="middle">{tick_text(t)}</text>'
        )
    body.append(
        f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">'
        f"{escape(x_label)}</text>"
    )
    body.append(
        f'<text x="14" y="{top + plot_h / 2}" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2})">{escape(y_label)}</text>'
    )
    legend = []
    for i, (name, xs, ys_raw) in enumerate(series):
        path = " ".join(
            f"{px(x):.1f},{py(transform(y)):.1f}" for x, y in zip(xs, ys_raw, strict=False)
        )
        # Later series are drawn thinner, so exactly overlapping curves stay visible.
        width = max(3.0 - 0.3 * i, 1.0)
        body.append(
            f'<polyline points="{path}" fill="none" stroke="{color(i)}" '
            f'stroke-width="{width:.1f}"><title>{escape(name)}</title></polyline>'
        )
        legend.append((name, color(i)))
    body += _legend(legend, left + plot_w + 12, top)
    return _svg(max(height, top + 16 * len(legend) + 10), body, title)


def stacked_bars(
    groups: Sequence[tuple[str, Sequence[tuple[str, Mapping[str, float]]]]],
    categories: Sequence[str],
    title: str,
    unit: str,
    scale: float = 1.0,
) -> str:
    """Groups of bars (e.g. one group per layout, one bar per rank), each bar stacked by
    category; values are divided by `scale` for the axis (bytes / 1e6 → MB)."""
    left, right, top, bottom, height = 60, 130, 28, 90, 340
    plot_w, plot_h = WIDTH - left - right, height - top - bottom
    bars = [(g, b, v) for g, members in groups for b, v in members]
    if not bars:
        return _svg(60, ['<text x="20" y="40">no data</text>'], title)
    totals = [sum(v.get(c, 0.0) for c in categories) / scale for _, _, v in bars]
    ticks = nice_ticks(0.0, max(totals) or 1.0)
    y_hi = ticks[-1]
    gap = 1.0  # a bar's width of space between groups
    slots = len(bars) + gap * (len(groups) - 1)
    bar_w = min(plot_w / max(slots, 1), 48.0)  # a few bars stay bars, not slabs
    body = []
    for t in ticks:
        y = top + plot_h - t / y_hi * plot_h
        body.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" '
                    'stroke="#eee"/>')  # fmt: skip
        body.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{tick_text(t)}</text>')
    body.append(
        f'<text x="14" y="{top + plot_h / 2}" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2})">{escape(unit)}</text>'
    )
    x = float(left)
    for group, members in groups:
        start = x
        for bar, values in members:
            y = top + plot_h
            for k, category in enumerate(categories):
                h = values.get(category, 0.0) / scale / y_hi * plot_h
                if h > 0:
                    y -= h
                    body.append(
                        f'<rect x="{x + 0.1 * bar_w:.1f}" y="{y:.1f}" width="{0.8 * bar_w:.1f}" '
                        f'height="{h:.1f}" fill="{color(k)}"><title>{escape(group)} {escape(bar)}'
                        f" {escape(category)}: {values.get(category, 0.0) / scale:.3g} "
                        f"{escape(unit)}</title></rect>"
                    )
            if len(members) > 1 and bar_w >= 14:
                body.append(
                    f'<text x="{x + bar_w / 2:.1f}" y="{top + plot_h + 11}" text-anchor="middle" '
                    f'font-size="9">{escape(bar)}</text>'
                )
            x += bar_w
        middle = (start + x) / 2
        body.append(
            f'<text x="{middle:.1f}" y="{top + plot_h + 24}" text-anchor="end" '
            f'transform="rotate(-30 {middle:.1f} {top + plot_h + 24})">{escape(group)}</text>'
        )
        x += gap * bar_w
    body.append(
        f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" '
        'stroke="#999"/>'
    )
    body += _legend([(c, color(k)) for k, c in enumerate(categories)], left + plot_w + 12, top)
    return _svg(height, body, title)


def gantt(
    rows: Sequence[tuple[str, Sequence[tuple[str, float, float]]]],
    title: str,
    window: float | None = None,
) -> str:
    """One row per rank of (action, start, end) blocks in seconds, coloured by the action's kind
    (its first letter); each block is labelled with its kind and microbatch when it fits."""
    left, right, top, row_h = 60, 20, 28, 22
    plot_w = WIDTH - left - right
    end = max((e for _, actions in rows for _, _, e in actions), default=0.0)
    span = max(window or 0.0, end) or 1.0
    height = top + row_h * len(rows) + 40
    body = []
    for r, (name, actions) in enumerate(rows):
        y = top + r * row_h
        body.append(f'<text x="{left - 6}" y="{y + row_h / 2 + 4}" text-anchor="end">'
                    f"{escape(name)}</text>")  # fmt: skip
        body.append(f'<rect x="{left}" y="{y + 2}" width="{plot_w}" height="{row_h - 4}" '
                    'fill="#f4f4f4"/>')  # fmt: skip
        for action, start, stop in actions:
            x0 = left + start / span * plot_w
            w = max((stop - start) / span * plot_w, 0.5)
            fill = KIND_COLORS.get(action[:1], "#999")
            body.append(
                f'<rect x="{x0:.2f}" y="{y + 2}" width="{w:.2f}" height="{row_h - 4}" '
                f'fill="{fill}" stroke="#fff" stroke-width="0.5"><title>{escape(action)} '
                f"{(stop - start) * 1e3:.2f} ms</title></rect>"
            )
            short = action.split("@")[0]
            if w >= 7 * len(short):
                body.append(
                    f'<text x="{x0 + w / 2:.2f}" y="{y + row_h / 2 + 4}" text-anchor="middle" '
                    f'fill="#fff" font-size="10">{escape(short)}</text>'
                )
    axis_y = top + row_h * len(rows) + 14
    for t in nice_ticks(0.0, span * 1e3):
        if t > span * 1e3 * 1.0001:
            break
        x = left + t / (span * 1e3) * plot_w
        body.append(f'<text x="{x:.1f}" y="{axis_y}" text-anchor="middle">{tick_text(t)}</text>')
    body.append(
        f'<text x="{left + plot_w / 2}" y="{axis_y + 16}" text-anchor="middle">'
        "ms into the step's pipeline phase (F forward, B backward, I/W backward input/weight)"
        "</text>"
    )
    return _svg(height, body, title)


def projected_vs_measured(points: Sequence[tuple[str, float, float]], title: str) -> str:
    """A log-log scatter of (name, measured, projected) values, one dot per name, over the y=x
    line: a dot above the line was projected slower than it ran. Both axes share one range, so
    the line is the diagonal; values that are not positive are left out."""
    left, right, top, bottom, height = 60, 170, 28, 40, 340
    plot_w, plot_h = WIDTH - left - right, height - top - bottom
    shown = [(n, x, y) for n, x, y in points if x > 0 and y > 0]
    if not shown:
        return _svg(60, ['<text x="20" y="40">no data</text>'], title)
    logs = [math.log10(v) for _, x, y in shown for v in (x, y)]
    lo, hi = math.floor(min(logs)), math.ceil(max(logs))
    if hi == lo:
        hi += 1
    decades = list(range(lo, hi + 1))
    ticks = [float(d) for d in decades]
    if hi - lo <= 2:  # a narrow range: 2 and 5 times each power of ten too
        ticks += [d + math.log10(m) for d in decades[:-1] for m in (2, 5)]
    elif hi - lo > 8:
        ticks = ticks[:: math.ceil(len(ticks) / 8)]

    def px(v: float) -> float:
        return left + (v - lo) / (hi - lo) * plot_w

    def py(v: float) -> float:
        return top + plot_h - (v - lo) / (hi - lo) * plot_h

    body = [
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>'
    ]
    for t in sorted(ticks):
        label = tick_text(float(f"{10**t:.3g}"))
        body.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(t):.1f}" y2="{py(t):.1f}" '
                    'stroke="#eee"/>')  # fmt: skip
        body.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{top}" y2="{top + plot_h}" '
                    'stroke="#eee"/>')  # fmt: skip
        body.append(f'<text x="{left - 4}" y="{py(t) + 4:.1f}" text-anchor="end">{label}</text>')
        body.append(
            f'<text x="{px(t):.1f}" y="{top + plot_h + 14}" text-anchor="middle">{label}</text>'
        )
    body.append(
        f'<line x1="{px(lo):.1f}" y1="{py(lo):.1f}" x2="{px(hi):.1f}" y2="{py(hi):.1f}" '
        'stroke="#666" stroke-dasharray="4 3"><title>projected = measured</title></line>'
    )
    body.append(
        f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">'
        "measured step time (s, median)</text>"
    )
    body.append(
        f'<text x="14" y="{top + plot_h / 2}" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2})">projected step time (s)</text>'
    )
    legend = []
    for i, (name, measured, projected) in enumerate(shown):
        x, y = px(math.log10(measured)), py(math.log10(projected))
        body.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{color(i)}" stroke="#fff">'
            f"<title>{escape(name)}: measured {measured:.4g} s, projected {projected:.4g} s "
            f"({projected / measured:.3g}×)</title></circle>"
        )
        legend.append((name, color(i)))
    body += _legend(legend, left + plot_w + 12, top)
    return _svg(max(height, top + 16 * len(legend) + 10), body, title)
