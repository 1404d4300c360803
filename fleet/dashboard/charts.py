"""Charts as inline SVG, drawn on the server: time-series line charts and grouped bar charts,
with axes, ticks, grid, labels and a legend.

Pure: values in, SVG markup out (escaped; presentation attributes only, so a strict
Content-Security-Policy that forbids inline styles and scripts still shows them). No data
reading, no HTML page around it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563")
WIDTH, HEIGHT = 640, 260
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 56, 16, 30, 46


@dataclass(frozen=True)
class Series:
    """One line: ``points`` are (epoch seconds, value); ``None`` values leave a gap."""

    name: str
    points: tuple[tuple[float, float | None], ...]
    dashed: bool = False


@dataclass(frozen=True)
class BarGroup:
    label: str
    values: tuple[float, ...]  # one per bar series


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2, 5 times a power of ten apart)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, count)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    v = start
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 12))
        v += step
    if ticks[-1] < hi:
        ticks.append(round(v, 12))
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 10_000:
        return f"{v:.3g}"
    if abs(v) >= 1:
        return f"{v:g}"
    return f"{v:.3g}"


def time_ticks(lo: float, hi: float) -> list[float]:
    steps = (60, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800)
    span = max(hi - lo, 1.0)
    step = next((s for s in steps if span / s <= 7), steps[-1])
    first = math.ceil(lo / step) * step
    return [float(t) for t in range(int(first), int(hi) + 1, step)]


def _time_label(t: float, span: float) -> str:
    d = datetime.fromtimestamp(t, UTC)
    return d.strftime("%m-%d %H:%M") if span > 86400 else d.strftime("%H:%M")


def _frame(title: str, width: int, height: int, label: str) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'aria-label="{escape(label)}">',
        f"<title>{escape(label)}</title>",
        f'<text x="{MARGIN_LEFT}" y="18" font-size="13" font-weight="600" '
        f'fill="#111827">{escape(title)}</text>',
    ]


def _legend(names: Sequence[str], width: int, dashed: Sequence[bool] = ()) -> list[str]:
    out = []
    x = width - MARGIN_RIGHT
    for i in reversed(range(len(names))):
        name = names[i]
        w = 22 + 7 * len(name)
        x -= w
        color = PALETTE[i % len(PALETTE)]
        dash = ' stroke-dasharray="4 3"' if i < len(dashed) and dashed[i] else ""
        out.append(
            f'<line x1="{x}" y1="14" x2="{x + 14}" y2="14" stroke="{color}" '
            f'stroke-width="3"{dash}/>'
            f'<text x="{x + 18}" y="18" font-size="11" fill="#374151">{escape(name)}</text>'
        )
    return out


def line_chart(
    series: Sequence[Series],
    title: str,
    y_label: str = "",
    *,
    width: int = WIDTH,
    height: int = HEIGHT,
    y_min: float | None = 0.0,
    x_range: tuple[float, float] | None = None,
) -> str:
    """A time-series line chart (x: epoch seconds, shown as UTC times)."""
    xs = [x for s in series for x, y in s.points if y is not None]
    ys = [y for s in series for _, y in s.points if y is not None]
    label = f"{title}: " + ", ".join(s.name for s in series)
    out = _frame(title, width, height, label)
    plot_w = width - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = height - MARGIN_TOP - MARGIN_BOTTOM
    if not ys:
        out.append(
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" font-size="12" '
            f'fill="#6b7280">no data in this range</text></svg>'
        )
        return "".join(out)
    x_lo, x_hi = x_range or (min(xs), max(xs))
    if x_hi <= x_lo:
        x_lo, x_hi = x_lo - 60, x_hi + 60
    lo = min(ys) if y_min is None else min(y_min, min(ys))
    yt = nice_ticks(lo, max(ys))
    y_lo, y_hi = yt[0], yt[-1]

    def px(x: float) -> float:
        return MARGIN_LEFT + (x - x_lo) / (x_hi - x_lo) * plot_w

    def py(y: float) -> float:
        return MARGIN_TOP + plot_h - (y - y_lo) / (y_hi - y_lo) * plot_h

    bottom = MARGIN_TOP + plot_h
    out.append('<g class="grid" stroke="#e5e7eb" stroke-width="1">')
    for t in yt:
        out.append(
            f'<line x1="{MARGIN_LEFT}" y1="{py(t):.1f}" x2="{width - MARGIN_RIGHT}" '
            f'y2="{py(t):.1f}"/>'
        )
    out.append("</g>")
    out.append('<g class="axis y" font-size="10" fill="#4b5563" text-anchor="end">')
    for t in yt:
        out.append(f'<text x="{MARGIN_LEFT - 6}" y="{py(t) + 3:.1f}">{_fmt(t)}</text>')
    out.append("</g>")
    out.append('<g class="axis x" font-size="10" fill="#4b5563" text-anchor="middle">')
    for t in time_ticks(x_lo, x_hi):
        out.append(
            f'<line x1="{px(t):.1f}" y1="{bottom}" x2="{px(t):.1f}" y2="{bottom + 4}" '
            f'stroke="#6b7280"/><text x="{px(t):.1f}" y="{bottom + 16}">'
            f"{_time_label(t, x_hi - x_lo)}</text>"
        )
    out.append("</g>")
    out.append(
        f'<line x1="{MARGIN_LEFT}" y1="{bottom}" x2="{width - MARGIN_RIGHT}" y2="{bottom}" '
        f'stroke="#374151"/><line x1="{MARGIN_LEFT}" y1="{MARGIN_TOP}" x2="{MARGIN_LEFT}" '
        f'y2="{bottom}" stroke="#374151"/>'
    )
    out.append(
        f'<text x="{MARGIN_LEFT + plot_w / 2}" y="{height - 6}" text-anchor="middle" '
        f'font-size="10" fill="#6b7280">time (UTC)</text>'
    )
    if y_label:
        out.append(
            f'<text transform="translate(12 {MARGIN_TOP + plot_h / 2}) rotate(-90)" '
            f'text-anchor="middle" font-size="10" fill="#6b7280">{escape(y_label)}</text>'
        )
    for i, s in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        dash = ' stroke-dasharray="5 4"' if s.dashed else ""
        runs: list[list[str]] = [[]]
        dots = []
        for x, y in s.points:
            if y is None:
                runs.append([])
                continue
            runs[-1].append(f"{px(x):.1f},{py(y):.1f}")
            if not s.dashed:
                dots.append(
                    f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.2" fill="{color}">'
                    f"<title>{escape(s.name)} {_time_label(x, 0)}: {_fmt(y)}</title></circle>"
                )
        out.append(f'<g class="series" data-name="{escape(s.name)}">')
        for run in runs:
            if len(run) > 1:
                out.append(
                    f'<polyline fill="none" stroke="{color}" stroke-width="2"{dash} '
                    f'points="{" ".join(run)}"/>'
                )
        out.extend(dots)
        out.append("</g>")
    out.extend(_legend([s.name for s in series], width, [s.dashed for s in series]))
    out.append("</svg>")
    return "".join(out)


def bar_chart(
    groups: Sequence[BarGroup],
    names: Sequence[str],
    title: str,
    y_label: str = "",
    *,
    width: int = WIDTH,
    height: int = HEIGHT,
) -> str:
    """Grouped bars: one group per label (e.g. a histogram bin), one bar per name."""
    label = f"{title}: " + ", ".join(names)
    out = _frame(title, width, height, label)
    values = [v for g in groups for v in g.values]
    if not values:
        out.append("</svg>")
        return "".join(out)
    yt = nice_ticks(0.0, max(values))
    y_hi = yt[-1]
    plot_w = width - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = height - MARGIN_TOP - MARGIN_BOTTOM
    bottom = MARGIN_TOP + plot_h

    def py(y: float) -> float:
        return MARGIN_TOP + plot_h - y / y_hi * plot_h

    out.append('<g class="grid" stroke="#e5e7eb">')
    for t in yt:
        out.append(
            f'<line x1="{MARGIN_LEFT}" y1="{py(t):.1f}" x2="{width - MARGIN_RIGHT}" '
            f'y2="{py(t):.1f}"/>'
        )
    out.append('</g><g class="axis y" font-size="10" fill="#4b5563" text-anchor="end">')
    for t in yt:
        out.append(f'<text x="{MARGIN_LEFT - 6}" y="{py(t) + 3:.1f}">{_fmt(t)}</text>')
    out.append("</g>")
    slot = plot_w / len(groups)
    bar = slot * 0.8 / max(1, len(names))
    every = max(1, math.ceil(len(groups) / 12))
    for gi, g in enumerate(groups):
        x0 = MARGIN_LEFT + gi * slot + slot * 0.1
        for si, v in enumerate(g.values):
            color = PALETTE[si % len(PALETTE)]
            out.append(
                f'<rect x="{x0 + si * bar:.1f}" y="{py(v):.1f}" width="{max(bar - 1, 1):.1f}" '
                f'height="{bottom - py(v):.1f}" fill="{color}" fill-opacity="0.85">'
                f"<title>{escape(names[si])} {escape(g.label)}: {_fmt(v)}</title></rect>"
            )
        if gi % every == 0:
            out.append(
                f'<text x="{x0 + slot * 0.4:.1f}" y="{bottom + 14}" text-anchor="middle" '
                f'font-size="9" fill="#4b5563">{escape(g.label)}</text>'
            )
    out.append(
        f'<line x1="{MARGIN_LEFT}" y1="{bottom}" x2="{width - MARGIN_RIGHT}" y2="{bottom}" '
        f'stroke="#374151"/><line x1="{MARGIN_LEFT}" y1="{MARGIN_TOP}" x2="{MARGIN_LEFT}" '
        f'y2="{bottom}" stroke="#374151"/>'
    )
    if y_label:
        out.append(
            f'<text transform="translate(12 {MARGIN_TOP + plot_h / 2}) rotate(-90)" '
            f'text-anchor="middle" font-size="10" fill="#6b7280">{escape(y_label)}</text>'
        )
    out.extend(_legend(list(names), width))
    out.append("</svg>")
    return "".join(out)
