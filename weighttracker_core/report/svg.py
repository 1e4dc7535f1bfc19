"""Inline SVG charts for the HTML reports: line charts and grouped bar charts.

Plain string building, no plotting library: a report is one self-contained HTML file.
Values that are ``None`` (a metric that was unavailable at some step) are left out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 16, 32, 44


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering ``[low, high]``.

    >>> nice_ticks(0, 1)
    [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    """
    if not math.isfinite(low) or not math.isfinite(high):
        return [0.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = float(round(math.floor(low / step) * step, 12))
    ticks: list[float] = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(value)
        value = round(first + len(ticks) * step, 12)
    if ticks[-1] < high:
        ticks.append(value)
    return ticks


def fmt(value: float) -> str:
    """Short label: ``1234567 -> '1.23M'``, ``0.25 -> '0.25'``."""
    magnitude = abs(value)
    for limit, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}"


def _frame(width: int, height: int, title: str, x_label: str, y_label: str) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<title>{escape(title)}</title>',
        f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13" font-weight="bold">'
        f"{escape(title)}</text>",
        f'<text x="{width / 2}" y="{height - 4}" text-anchor="middle">{escape(x_label)}</text>',
        f'<text x="12" y="{height / 2}" text-anchor="middle" '
        f'transform="rotate(-90 12 {height / 2})">{escape(y_label)}</text>',
    ]


def _y_axis(parts: list[str], ticks: Sequence[float], y_of, width: int) -> None:
    for tick in ticks:
        y = y_of(tick)
        parts.append(f'<line x1="{_LEFT}" x2="{width - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}" '
                     'stroke="#ddd"/>')
        parts.append(f'<text x="{_LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">{fmt(tick)}</text>')


def _legend(parts: list[str], names: Sequence[str], width: int) -> None:
    x = width - _RIGHT - 8
    for i, name in enumerate(reversed(list(names))):
        color = COLORS[(len(names) - 1 - i) % len(COLORS)]
        label = escape(name)
        x -= 14 + 7 * len(name)
        parts.append(f'<rect x="{x}" y="22" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{x + 13}" y="31">{label}</text>')


def line_chart(
    xs: Sequence[float],
    series: Mapping[str, Sequence[float | None]],
    *,
    title: str,
    x_label: str = "",
    y_label: str = "",
    width: int = 560,
    height: int = 300,
) -> str:
    """An SVG line chart of one or more series sharing the x values ``xs``."""
    points = {
        name: [(x, float(y)) for x, y in zip(xs, ys) if y is not None and math.isfinite(float(y))]
        for name, ys in series.items()
    }
    values = [y for pts in points.values() for _, y in pts]
    parts = _frame(width, height, title, x_label, y_label)
    if not values or not xs:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no data</text>')
        return "\n".join(parts + ["</svg>"])
    y_ticks = nice_ticks(min(values), max(values))
    x_ticks = nice_ticks(min(xs), max(xs))
    x_low, x_high = x_ticks[0], x_ticks[-1]
    y_low, y_high = y_ticks[0], y_ticks[-1]
    plot_w, plot_h = width - _LEFT - _RIGHT, height - _TOP - _BOTTOM

    def x_of(x: float) -> float:
        return _LEFT + (x - x_low) / ((x_high - x_low) or 1) * plot_w

    def y_of(y: float) -> float:
        return _TOP + plot_h - (y - y_low) / ((y_high - y_low) or 1) * plot_h

    _y_axis(parts, y_ticks, y_of, width)
    for tick in x_ticks:
        parts.append(f'<text x="{x_of(tick):.1f}" y="{height - _BOTTOM + 14}" '
                     f'text-anchor="middle">{fmt(tick)}</text>')
    for i, (name, pts) in enumerate(points.items()):
        color = COLORS[i % len(COLORS)]
        if len(pts) == 1:
            x, y = pts[0]
            parts.append(f'<circle cx="{x_of(x):.1f}" cy="{y_of(y):.1f}" r="3" fill="{color}"/>')
            continue
        path = " ".join(f"{x_of(x):.1f},{y_of(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{path}"/>')
    if len(points) > 1:
        _legend(parts, list(points), width)
    return "\n".join(parts + ["</svg>"])


def bar_chart(
    categories: Sequence[str],
    series: Mapping[str, Sequence[float]],
    *,
    title: str,
    y_label: str = "",
    width: int | None = None,
    height: int = 320,
) -> str:
    """An SVG grouped bar chart: one group of bars per category, one bar per series."""
    names = list(series)
    width = width or max(360, _LEFT + _RIGHT + len(categories) * (12 * len(names) + 16))
    bottom = _BOTTOM + 6 * max((len(c) for c in categories), default=0) // 2
    parts = _frame(width, height + bottom - _BOTTOM, title, "", y_label)
    values = [float(v) for vs in series.values() for v in vs]
    if not values:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no data</text>')
        return "\n".join(parts + ["</svg>"])
    y_ticks = nice_ticks(0.0, max(values))
    plot_w, plot_h = width - _LEFT - _RIGHT, height - _TOP - _BOTTOM

    def y_of(y: float) -> float:
        return _TOP + plot_h - y / (y_ticks[-1] or 1) * plot_h

    _y_axis(parts, y_ticks, y_of, width)
    slot = plot_w / max(len(categories), 1)
    bar = min(18.0, (slot - 6) / max(len(names), 1))
    for c, category in enumerate(categories):
        left = _LEFT + c * slot + (slot - bar * len(names)) / 2
        for s, name in enumerate(names):
            value = float(series[name][c])
            top = y_of(value)
            parts.append(
                f'<rect x="{left + s * bar:.1f}" y="{top:.1f}" width="{bar - 1:.1f}" '
                f'height="{_TOP + plot_h - top:.1f}" fill="{COLORS[s % len(COLORS)]}">'
                f"<title>{escape(category)} {escape(name)}: {fmt(value)}</title></rect>"
            )
        x = _LEFT + (c + 0.5) * slot
        y = _TOP + plot_h + 10
        parts.append(f'<text x="{x:.1f}" y="{y}" text-anchor="end" '
                     f'transform="rotate(-40 {x:.1f} {y})">{escape(category)}</text>')
    if len(names) > 1:
        _legend(parts, names, width)
    return "\n".join(parts + ["</svg>"])
