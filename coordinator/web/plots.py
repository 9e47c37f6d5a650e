"""Line charts as inline SVG, drawn on the server: the coordinator UI needs no charting script.

``line_chart`` takes named series of (x, y) points and returns one ``<svg>``
element: axes with round-numbered ticks, one polyline per series with a circle
per point (``class="point"``, a ``<title>`` giving its values), and a legend.
Colours are presentation attributes, not inline styles, so the pages' strict
Content-Security-Policy holds. Every text is escaped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

#: Series colours, in order (distinguishable, and print in grey distinctly).
PALETTE = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#17becf",
    "#7f7f7f",
)
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 40, 34, 46
_LEGEND_ROW = 18
#: Roughly how wide a character of the legend is (12 px system sans-serif), to lay it out.
_CHAR_WIDTH = 7.0


@dataclass(frozen=True)
class Series:
    """One line: a name for the legend and its points, in x order."""

    name: str
    points: tuple[tuple[float, float], ...]


def number(value: float) -> str:
    """A tick or point value: integers plainly, the rest with up to 4 significant digits."""
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.4g}"


def nice_ticks(low: float, high: float, count: int = 5, integer: bool = False) -> list[float]:
    """About ``count`` round tick values (steps of 1, 2, 2.5 or 5 × 10^n) covering [low, high].

    With ``integer`` the step is a whole number (rounds, days).
    """
    if count < 2:
        raise ValueError('Argument "count" must be 2 or more.')
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError('Arguments "low" and "high" must be finite.')
    if high < low:
        low, high = high, low
    if high == low:
        pad = 1.0 if integer or low == 0 else abs(low) * 0.1
        low, high = low - pad, high + pad
    raw = (high - low) / (count - 1)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    if integer:
        step = max(1.0, float(round(step)))
    # The epsilon keeps a bound that is a tick (0.3 / 0.1) from adding a tick beyond it.
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    return [round(k * step, 10) for k in range(first, last + 1)]


def _domain(values: list[float], ticks: list[float]) -> tuple[float, float]:
    return min(ticks[0], min(values)), max(ticks[-1], max(values))


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str = "",
    y_label: str = "",
    x_format: Callable[[float], str] = number,
    y_format: Callable[[float], str] = number,
    x_integer: bool = False,
    y_from_zero: bool = False,
    width: int = 640,
    height: int = 300,
) -> str:
    """An ``<svg>`` line chart of ``series`` (an empty chart says there is no data)."""
    longest = max((len(line.name) for line in series), default=0)
    per_row = max(1, min(4, int((width - _LEFT) // (longest * _CHAR_WIDTH + 36))))
    legend_rows = math.ceil(len(series) / per_row)
    total_height = height + legend_rows * _LEGEND_ROW + 8
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" role="img" '
        f'viewBox="0 0 {width} {total_height}" width="{width}" height="{total_height}" '
        f'aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<text class="plot-title" x="{_LEFT}" y="20" font-size="14" font-weight="600" '
        f'fill="#1b1f23">{escape(title)}</text>',
    ]
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points]
    if not xs:
        parts.append(
            f'<text class="plot-empty" x="{width / 2:.1f}" y="{height / 2:.1f}" '
            f'text-anchor="middle" fill="#666">no data yet</text></svg>'
        )
        return "".join(parts)
    ys_domain = [*ys, 0.0] if y_from_zero else ys
    x_ticks = nice_ticks(min(xs), max(xs), 6, integer=x_integer)
    y_ticks = nice_ticks(min(ys_domain), max(ys_domain), 5)
    x0, x1 = _domain(xs, x_ticks)
    y0, y1 = _domain(ys_domain, y_ticks)
    plot_w = width - _LEFT - _RIGHT
    plot_h = height - _TOP - _BOTTOM

    def px(x: float) -> float:
        return _LEFT + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return _TOP + plot_h - (y - y0) / (y1 - y0) * plot_h

    axis = ['<g class="axes" font-size="11" fill="#444" stroke-width="1">']
    for y in y_ticks:
        axis.append(
            f'<line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{py(y):.1f}" y2="{py(y):.1f}" '
            f'stroke="#e3e5e8"/>'
            f'<text x="{_LEFT - 6}" y="{py(y) + 4:.1f}" text-anchor="end">'
            f"{escape(y_format(y))}</text>"
        )
    for x in x_ticks:
        axis.append(
            f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{_TOP + plot_h}" '
            f'y2="{_TOP + plot_h + 4}" stroke="#444"/>'
            f'<text x="{px(x):.1f}" y="{_TOP + plot_h + 17}" text-anchor="middle">'
            f"{escape(x_format(x))}</text>"
        )
    axis.append(
        f'<line x1="{_LEFT}" x2="{_LEFT}" y1="{_TOP}" y2="{_TOP + plot_h}" stroke="#444"/>'
        f'<line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{_TOP + plot_h}" y2="{_TOP + plot_h}" '
        f'stroke="#444"/>'
    )
    if x_label:
        axis.append(
            f'<text x="{_LEFT + plot_w / 2:.1f}" y="{height - 8}" text-anchor="middle">'
            f"{escape(x_label)}</text>"
        )
    if y_label:
        axis.append(
            f'<text x="14" y="{_TOP + plot_h / 2:.1f}" text-anchor="middle" '
            f'transform="rotate(-90 14 {_TOP + plot_h / 2:.1f})">{escape(y_label)}</text>'
        )
    axis.append("</g>")
    parts.extend(axis)
    for i, line in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in line.points)
        parts.append(f'<g class="series" data-series="{escape(line.name)}">')
        if len(line.points) > 1:
            parts.append(
                f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"/>'
            )
        for x, y in line.points:
            parts.append(
                f'<circle class="point" cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" '
                f'fill="{colour}"><title>{escape(line.name)}: {escape(x_format(x))}, '
                f"{escape(y_format(y))}</title></circle>"
            )
        parts.append("</g>")
    parts.append('<g class="legend" font-size="12" fill="#1b1f23">')
    column = (width - _LEFT) / per_row
    for i, line in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        lx = _LEFT + (i % per_row) * column
        ly = height + 10 + (i // per_row) * _LEGEND_ROW
        parts.append(
            f'<rect x="{lx:.1f}" y="{ly - 6}" width="14" height="4" fill="{colour}"/>'
            f'<text x="{lx + 20:.1f}" y="{ly}">{escape(line.name)}</text>'
        )
    parts.append("</g></svg>")
    return "".join(parts)
