"""SVG plots of the recall curves, written directly (no plotting library).

Two figures, each with one panel per IoU type (segments, boxes) and one line per run in a fixed
colour (``RUN_COLORS[i]`` for the i-th run, the same in both figures):

- ``ar_vs_proposals.svg``: AR (IoU .50:.05:.95) against the number of proposals per image, log x;
- ``recall_vs_iou.svg``: recall against the IoU threshold (0.5 .. 1.0) at the largest count
  (solid) and at 100 proposals (dashed).

Why not matplotlib: importing and laying out two matplotlib figures takes ~0.6 s, as long as the
whole evaluation of 100 images x 1000 proposals; these plots are lines, axes and text, which SVG
states directly (any browser, GitHub and docs render it, and it stays sharp when zoomed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any

#: Line colour of the i-th run (tab10's first colours, then repeats).
RUN_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
              "#17becf", "#bcbd22", "#7f7f7f")
_TYPE_TITLE = {"segm": "segments", "bbox": "boxes"}

#: Panel size and the plot area inside it (pixels): the axes' box is PLOT = (x0, y0, x1, y1).
PANEL_W, PANEL_H = 520, 420
PLOT = (62, 34, 505, 370)


@dataclass
class Series:
    """One line: points ``(xs[k], ys[k])``; a None y breaks the line."""

    label: str
    color: str
    xs: Sequence[float]
    ys: Sequence[float | None]
    dashed: bool = False


@dataclass
class Panel:
    """One set of axes: y in [0, 1]; x in ``xlim``, on a log scale when ``log_x``."""

    title: str
    xlabel: str
    ylabel: str
    xlim: tuple[float, float]
    log_x: bool = False
    legend: str = "left"  # legend box in the upper left or upper right corner
    series: list[Series] = field(default_factory=list)


def _x_ticks(panel: Panel) -> list[float]:
    lo, hi = panel.xlim
    if panel.log_x:
        return [10.0 ** k for k in range(int(math.floor(math.log10(lo))),
                                         int(math.ceil(math.log10(hi))) + 1)
                if lo <= 10.0 ** k <= hi]
    step = 0.1
    return [round(lo + k * step, 10) for k in range(int(round((hi - lo) / step)) + 1)]


def _panel_svg(panel: Panel, dx: float) -> list[str]:
    x0, y0, x1, y1 = PLOT
    lo, hi = panel.xlim
    f = math.log10 if panel.log_x else float

    def px(x: float) -> float:
        return dx + x0 + (f(x) - f(lo)) / (f(hi) - f(lo)) * (x1 - x0)

    def py(y: float) -> float:
        return y1 - y * (y1 - y0)

    out = [f'<rect x="{dx + x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" fill="white" '
           'stroke="black"/>']
    for k in range(6):  # y grid and ticks: 0, .2, ..., 1
        y = k / 5
        out.append(f'<line x1="{dx + x0}" y1="{py(y):.1f}" x2="{dx + x1}" y2="{py(y):.1f}" '
                   'stroke="#ccc" stroke-width="0.6"/>')
        out.append(f'<text x="{dx + x0 - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.1f}</text>')
    for x in _x_ticks(panel):
        label = f"{x:g}"
        out.append(f'<line x1="{px(x):.1f}" y1="{y0}" x2="{px(x):.1f}" y2="{y1}" stroke="#ccc" '
                   'stroke-width="0.6"/>')
        out.append(f'<text x="{px(x):.1f}" y="{y1 + 16}" text-anchor="middle">{label}</text>')
    out.append(f'<text x="{dx + (x0 + x1) / 2}" y="{y0 - 12}" text-anchor="middle" '
               f'font-size="14">{escape(panel.title)}</text>')
    out.append(f'<text x="{dx + (x0 + x1) / 2}" y="{y1 + 36}" '
               f'text-anchor="middle">{escape(panel.xlabel)}</text>')
    out.append(f'<text transform="translate({dx + 18},{(y0 + y1) / 2}) rotate(-90)" '
               f'text-anchor="middle">{escape(panel.ylabel)}</text>')
    for s in panel.series:
        dash = ' stroke-dasharray="6,4"' if s.dashed else ""
        part: list[str] = []
        for x, y in [*zip(s.xs, s.ys), (None, None)]:  # a final None flushes the last part
            if y is None or x is None:
                if part:
                    out.append(f'<polyline points="{" ".join(part)}" fill="none" '
                               f'stroke="{s.color}" stroke-width="2"{dash}/>')
                part = []
                continue
            part.append(f"{px(x):.2f},{py(min(max(y, 0.0), 1.0)):.2f}")
    lx = dx + (x0 + 10 if panel.legend == "left" else x1 - 170)
    for k, s in enumerate(panel.series):
        ly = y0 + 16 + 16 * k
        dash = ' stroke-dasharray="6,4"' if s.dashed else ""
        out.append(f'<line x1="{lx}" y1="{ly - 4}" x2="{lx + 22}" y2="{ly - 4}" '
                   f'stroke="{s.color}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{lx + 28}" y="{ly}">{escape(s.label)}</text>')
    return out


def figure_svg(panels: Sequence[Panel]) -> bytes:
    """An SVG document with the panels side by side."""
    width = PANEL_W * max(1, len(panels))
    body = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{PANEL_H}" '
            f'viewBox="0 0 {width} {PANEL_H}" font-family="sans-serif" font-size="11">',
            f'<rect width="{width}" height="{PANEL_H}" fill="white"/>']
    for k, panel in enumerate(panels):
        body += _panel_svg(panel, k * PANEL_W)
    body.append("</svg>")
    return ("\n".join(body) + "\n").encode("utf-8")


def _iou_types(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    return [t for t in ("segm", "bbox") if any(t in r for r in runs)]


def ar_vs_proposals_panels(runs: Sequence[Mapping[str, Any]]) -> list[Panel]:
    """Panels (segm, bbox order) of AR against proposals per image, one line per run.

    Args:
        runs: run entries of eval.json (``{"name", "segm": {"curves": ...}, "bbox": ...}``).
    """
    panels = []
    for t in _iou_types(runs):
        top = max(len(r[t]["curves"]["ar_vs_proposals"]["proposals"]) for r in runs if t in r)
        panel = Panel(f"AR vs proposals, {_TYPE_TITLE[t]}", "number of proposals per image",
                      "average recall (IoU .50:.05:.95)", (1, max(top, 10)), log_x=True)
        for i, run in enumerate(runs):
            if t in run:
                curve = run[t]["curves"]["ar_vs_proposals"]
                panel.series.append(Series(run["name"], RUN_COLORS[i % len(RUN_COLORS)],
                                           curve["proposals"], curve["all"]))
        panels.append(panel)
    return panels


def recall_vs_iou_panels(runs: Sequence[Mapping[str, Any]]) -> list[Panel]:
    """Panels of recall against IoU threshold at the largest count (solid) and 100 (dashed)."""
    panels = []
    for t in _iou_types(runs):
        panel = Panel(f"recall vs IoU, {_TYPE_TITLE[t]}", "IoU threshold", "recall", (0.5, 1.0),
                      legend="right")
        for i, run in enumerate(runs):
            if t not in run:
                continue
            curve = run[t]["curves"]["recall_vs_iou"]
            keys = [k for k in curve if k.startswith("@")]
            top = max(keys, key=lambda k: int(k[1:]))
            for key, dashed in ((top, False), ("@100", True)):
                if key in curve and not (dashed and key == top):
                    panel.series.append(Series(f"{run['name']} {key}",
                                               RUN_COLORS[i % len(RUN_COLORS)], curve["iou"],
                                               curve[key], dashed))
        panels.append(panel)
    return panels


def ar_vs_proposals_svg(runs: Sequence[Mapping[str, Any]]) -> bytes:
    """SVG of :func:`ar_vs_proposals_panels`."""
    return figure_svg(ar_vs_proposals_panels(runs))


def recall_vs_iou_svg(runs: Sequence[Mapping[str, Any]]) -> bytes:
    """SVG of :func:`recall_vs_iou_panels`."""
    return figure_svg(recall_vs_iou_panels(runs))
