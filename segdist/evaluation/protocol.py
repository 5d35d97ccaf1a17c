"""The average-recall protocol's constants: IoU thresholds, area ranges, proposal counts.

The standard thresholds are taken from pycocotools' own ``Params`` so that the floats are the very
same (``np.linspace(.5, .95, 10)``; ``np.arange`` would give slightly different values and a
different recall at a threshold that an IoU hits exactly).
"""

from __future__ import annotations

import numpy as np
from pycocotools.cocoeval import Params

IOU_TYPES = ("segm", "bbox")

#: float64[10]: .50:.05:.95, bit-identical to ``COCOeval().params.iouThrs``. AR is their mean.
STANDARD_IOUS: np.ndarray = np.asarray(Params(iouType="segm").iouThrs, dtype=np.float64)

#: float64[11]: the points between them (and IoU 1.0) for the recall-vs-IoU curve only.
EXTRA_IOUS: np.ndarray = np.concatenate([np.round(STANDARD_IOUS + 0.025, 3), [1.0]])

#: float64[21]: every threshold the matcher runs; the first 10 are the standard ones.
ALL_IOUS: np.ndarray = np.concatenate([STANDARD_IOUS, EXTRA_IOUS])

#: COCO area ranges by ground-truth annotation area (pixels), as ``Params.areaRng``.
AREA_LABELS = ("all", "small", "medium", "large")
AREA_RANGES: tuple[tuple[float, float], ...] = tuple(
    (float(lo), float(hi)) for lo, hi in Params(iouType="segm").areaRng)

#: The proposal counts AR is reported at (``maxDets``); the last one cuts each image's list.
MAX_DETS = (10, 100, 1000)

#: pycocotools caps an IoU threshold of 1.0 at this, so a perfect match still counts.
_IOU_CAP = 1 - 1e-10


def effective_thresholds(thresholds: np.ndarray) -> np.ndarray:
    """``min(t, 1 - 1e-10)`` per threshold: the bound ``COCOeval.evaluateImg`` starts from."""
    return np.minimum(np.asarray(thresholds, dtype=np.float64), _IOU_CAP)


def iou_index(value: float) -> int:
    """Row of ``ALL_IOUS`` closest to ``value`` (e.g. 0.7 -> the standard 0.7000000000000001)."""
    return int(np.argmin(np.abs(ALL_IOUS - value)))
