"""PNG plots of the recall curves (matplotlib, Agg backend: no display needed).

Two figures, each with one panel per IoU type (segments, boxes) and one line per run in a fixed
colour (``RUN_COLORS[i]`` for the i-th run, the same in both figures):

- ``ar_vs_proposals.png``: AR (IoU .50:.05:.95) against the number of proposals per image, log x;
- ``recall_vs_iou.png``: recall against the IoU threshold (0.5 .. 1.0) at the largest count
  (solid) and at 100 proposals (dashed).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

#: Line colour of the i-th run (tab10's first colours, then repeats).
RUN_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
              "#17becf", "#bcbd22", "#7f7f7f")
_TYPE_TITLE = {"segm": "segments", "bbox": "boxes"}


def _figure(n_panels: int):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n_panels, figsize=(5.2 * n_panels, 4.2), dpi=100, squeeze=False)
    return fig, axes[0]


def figure_png(fig) -> bytes:
    """PNG bytes of a figure (laid out tight, at its own dpi); the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _iou_types(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    return [t for t in ("segm", "bbox") if any(t in r for r in runs)]


def ar_vs_proposals_png(runs: Sequence[Mapping[str, Any]]) -> bytes:
    """PNG of AR against proposals per image (log x), one panel per IoU type, one line per run.

    Args:
        runs: run entries of eval.json (``{"name", "segm": {"curves": ...}, "bbox": ...}``).
    """
    return figure_png(ar_vs_proposals_figure(runs))


def recall_vs_iou_png(runs: Sequence[Mapping[str, Any]]) -> bytes:
    """PNG of recall against IoU threshold at the largest proposal count (solid) and 100 (dashed)."""
    return figure_png(recall_vs_iou_figure(runs))


def ar_vs_proposals_figure(runs: Sequence[Mapping[str, Any]]):
    """The matplotlib Figure behind :func:`ar_vs_proposals_png` (panels in segm, bbox order)."""
    types = _iou_types(runs)
    fig, axes = _figure(max(1, len(types)))
    for ax, t in zip(axes, types):
        for i, run in enumerate(runs):
            if t not in run:
                continue
            curve = run[t]["curves"]["ar_vs_proposals"]
            ys = [float("nan") if v is None else v for v in curve["all"]]
            ax.plot(curve["proposals"], ys, color=RUN_COLORS[i % len(RUN_COLORS)], lw=2,
                    label=run["name"])
        ax.set_xscale("log")
        ax.set_xlabel("number of proposals per image")
        ax.set_ylabel("average recall (IoU .50:.05:.95)")
        ax.set_title(f"AR vs proposals, {_TYPE_TITLE[t]}")
        ax.set_ylim(0, 1)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    return fig


def recall_vs_iou_figure(runs: Sequence[Mapping[str, Any]]):
    """The matplotlib Figure behind :func:`recall_vs_iou_png`."""
    types = _iou_types(runs)
    fig, axes = _figure(max(1, len(types)))
    for ax, t in zip(axes, types):
        for i, run in enumerate(runs):
            if t not in run:
                continue
            curve = run[t]["curves"]["recall_vs_iou"]
            keys = [k for k in curve if k.startswith("@")]
            color = RUN_COLORS[i % len(RUN_COLORS)]
            top = max(keys, key=lambda k: int(k[1:]))
            for key, style in ((top, "-"), ("@100", "--")):
                if key not in curve or (style == "--" and key == top):
                    continue
                ys = [float("nan") if v is None else v for v in curve[key]]
                ax.plot(curve["iou"], ys, style, color=color, lw=2,
                        label=f"{run['name']} {key}")
        ax.set_xlabel("IoU threshold")
        ax.set_ylabel("recall")
        ax.set_title(f"recall vs IoU, {_TYPE_TITLE[t]}")
        ax.set_xlim(0.5, 1.0)
        ax.set_ylim(0, 1)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    return fig
