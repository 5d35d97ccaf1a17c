"""The reported numbers and curves, read off merged :class:`RecallCounts`.

Names follow the papers: ``AR@100`` is average recall (IoU .50:.05:.95) with 100 proposals per
image; ``AR_small@1000`` the same over small objects; ``R@0.5@100`` the recall at IoU 0.5.
Undefined values (no ground truth in an area range) are ``None`` here (COCOeval prints -1).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from segdist.evaluation.protocol import AREA_LABELS, MAX_DETS, iou_index
from segdist.evaluation.recall import RecallCounts

#: Recall reported at these IoU thresholds (rows of the standard set).
RECALL_IOUS = (0.5, 0.7)


def _defined(x: float) -> float | None:
    return None if x == -1.0 else float(x)


def max_dets_reported(counts: RecallCounts) -> list[int]:
    """The proposal counts the table reports: 10, 100, 1000 (those <= counts.max_dets)."""
    out = [m for m in MAX_DETS if m <= counts.max_dets]
    if counts.max_dets not in out:
        out.append(counts.max_dets)
    return out


def summarize(counts: RecallCounts) -> dict[str, Any]:
    """Metrics and curves of one IoU type.

    Returns:
        ``{"metrics": {"AR@10": .., "AR@100": .., "AR@1000": .., "AR_small@100": .., ...,
        "R@0.5@100": .., "R@0.7@1000": ..}, "curves": {"ar_vs_proposals": {"proposals":
        [1..max_dets], "all"|"small"|"medium"|"large": [AR per count]}, "recall_vs_iou":
        {"iou": [21 thresholds ascending], "@10"|"@100"|"@1000": [recall per threshold]}},
        "counts": {"n_gt": {area: int}, "images": .., "images_with_proposals": ..,
        "proposals": .., "max_proposals_per_image": ..}}``.
    """
    rec = counts.recall()
    dets = max_dets_reported(counts)
    metrics: dict[str, float | None] = {}
    for m in dets:
        metrics[f"AR@{m}"] = _defined(counts.average_recall(m, "all", rec))
    for m in dets[-2:]:
        for area in AREA_LABELS[1:]:
            metrics[f"AR_{area}@{m}"] = _defined(counts.average_recall(m, area, rec))
    for iou in RECALL_IOUS:
        t = iou_index(iou)
        for m in dets[-2:]:
            metrics[f"R@{iou}@{m}"] = _defined(float(rec[t, 0, m - 1]))

    proposals = list(range(1, counts.max_dets + 1))
    ar_curve = {area: [_defined(v) for v in counts.average_recall_curve(area, rec).tolist()]
                for area in AREA_LABELS}
    order = np.argsort(counts.thresholds, kind="stable")
    iou_curve: dict[str, Any] = {"iou": [float(v) for v in counts.thresholds[order]]}
    for m in dets:
        iou_curve[f"@{m}"] = [_defined(float(v)) for v in rec[order, 0, m - 1]]
    return {
        "metrics": metrics,
        "curves": {"ar_vs_proposals": {"proposals": proposals, **ar_curve},
                   "recall_vs_iou": iou_curve},
        "counts": {"n_gt": dict(zip(AREA_LABELS, counts.n_gt.tolist())),
                   "images": counts.n_images, "images_with_proposals": counts.n_with_proposals,
                   "proposals": counts.n_proposals,
                   "max_proposals_per_image": counts.max_per_image},
    }


def coco_stats(counts: RecallCounts) -> list[float]:
    """The six recall entries of ``COCOeval.stats`` (indices 6..11) with maxDets [10, 100, 1000]:
    AR@10, AR@100, AR@1000, AR small/medium/large @1000; -1 where undefined, as COCOeval."""
    rec = counts.recall()
    return ([counts.average_recall(m, "all", rec) for m in MAX_DETS]
            + [counts.average_recall(MAX_DETS[-1], a, rec) for a in AREA_LABELS[1:]])

