"""The per-image inner loops, in C (``_kernels.c``): exact IoUs and COCOeval's greedy matching.

Why C: for 1000 proposals per image these loops are the whole cost of an evaluation (decoding the
RLE strings, intersecting runs, 21 thresholds x area ranges of matching); in Python they ran ~5x
slower than the fastest pip-installable COCO evaluators. The kernels are small, have no dependency
but the CPython API, and are built by ``pip install`` (``make install``/``make test``) from
``setup.py``.

Exactness: every value is pycocotools' own, bit for bit (tests/test_evaluation.py compares them
with ``pycocotools.mask.iou`` and ``COCOeval.evaluateImg``):

- **segment IoU**: ``i / u`` of the integer intersection and union (for a crowd GT: the proposal's
  area), 0 when ``i == 0``, as ``rleIou``. The integers are exact, so the one division gives the
  same double. Pairs whose boxes are disjoint are 0 without intersecting runs (they share no pixel).
- **box IoU**: ``bbIou``'s formula with the same double operations in the same order (built with
  ``-ffp-contract=off``, so no fused multiply-add changes a rounding).
- **matching**: ``evaluateImg``'s loop. For each threshold t and each detection in score order, walk
  the GTs (not-ignored first, then ignored, each part in COCOeval's order), skip GTs already matched
  unless they are crowd regions, stop at the first ignored GT once a not-ignored one is held, and
  keep the GT with IoU >= the best so far (starting from ``min(t, 1 - 1e-10)``; on equal IoU the
  later GT wins). A detection whose best IoU is below t is skipped without the walk: COCOeval keeps
  nothing for it either (the walk's stop needs a GT already held).
"""

from __future__ import annotations

import numpy as np

from segdist.errors import SegdistError
from segdist.evaluation.protocol import effective_thresholds

try:
    from segdist.evaluation import _kernels
except ImportError as exc:  # a source tree used without installing (PYTHONPATH=...)
    raise SegdistError(
        "segdist's compiled evaluation kernels are not built in this source tree: run "
        "`make install` (or `python setup.py build_ext --inplace` in the repository root)") from exc


def segm_ious(dt_counts: list[bytes], order: np.ndarray, gt_counts: list[bytes], height: int,
              width: int, crowd: np.ndarray) -> np.ndarray:
    """Mask IoUs of detections with ground truth, exactly as ``pycocotools.mask.iou``.

    Args:
        dt_counts: compressed COCO RLE strings (bytes) of one image's proposals, masks
            ``height x width``.
        order: int[D] indices into ``dt_counts``: the detections, in score order, cut to maxDets.
        gt_counts: compressed RLE strings of the image's GTs (COCOeval's order).
        crowd: bool[G] GT is a crowd region (IoU = intersection / proposal area).
    Returns:
        float64[D, G].
    Raises:
        ValueError: a string is not a valid RLE of ``height x width`` pixels.
    """
    order = np.ascontiguousarray(order, dtype=np.int64)
    out = np.empty((len(order), len(gt_counts)), dtype=np.float64)
    _kernels.segm_ious(dt_counts, order, gt_counts, int(height), int(width),
                       np.ascontiguousarray(crowd, dtype=np.uint8), out)
    return out


def box_ious(dt_boxes: np.ndarray, gt_boxes: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """Box IoUs, exactly as ``pycocotools.mask.iou`` on boxes.

    Args:
        dt_boxes: float[D, 4] COCO ``[x, y, w, h]`` of the detections (score order).
        gt_boxes: float[G, 4] COCO ``[x, y, w, h]`` of the GTs.
        crowd: bool[G].
    Returns:
        float64[D, G].
    """
    dt = np.ascontiguousarray(dt_boxes, dtype=np.float64).reshape(-1, 4)
    gt = np.ascontiguousarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    out = np.empty((len(dt), len(gt)), dtype=np.float64)
    _kernels.box_ious(dt, gt, np.ascontiguousarray(crowd, dtype=np.uint8), out)
    return out


def greedy_match(ious: np.ndarray, ignore: np.ndarray, crowd: np.ndarray,
                 thresholds: np.ndarray) -> np.ndarray:
    """Match detections to ground truth at every threshold, exactly as COCOeval does.

    Args:
        ious: float64[D, G] IoU of each detection (rows in score order, already cut to maxDets)
            with each GT (columns in COCOeval's GT order), as ``pycocotools.mask.iou`` returns it.
        ignore: bool[G] GT ignored in this area range (crowd, or area outside the range).
        crowd: bool[G] GT is a crowd region (may be matched by several detections).
        thresholds: float64[T] IoU thresholds.
    Returns:
        int64[T, D]: for each threshold and detection the index (into the G columns) of the GT it
        matched, or -1. COCOeval's ``dtMatches`` is the GT *id* at that index (0 when unmatched).
    """
    ious = np.ascontiguousarray(ious, dtype=np.float64)
    n_det = ious.shape[0] if ious.ndim == 2 else 0
    n_gt = ious.shape[1] if ious.ndim == 2 else 0
    eff = np.ascontiguousarray(effective_thresholds(thresholds))
    out = np.empty((len(eff), n_det), dtype=np.int64)
    _kernels.greedy_match(ious, n_gt, np.ascontiguousarray(ignore, dtype=np.uint8),
                          np.ascontiguousarray(crowd, dtype=np.uint8), eff, out)
    return out


def add_hits(hits: np.ndarray, area: int, match: np.ndarray, countable: np.ndarray) -> None:
    """``hits[:, area, :D] += countable[match]`` where ``match >= 0`` (in place).

    Args:
        hits: int64[T, A, M], C-contiguous (``RecallCounts.hits``).
        area: index into A.
        match: int64[T, D] (D <= M) from :func:`greedy_match`.
        countable: bool[G] a match to this GT is a true positive: not ignored in this area range
            and annotation id not 0 (COCOeval reads the matched id as a boolean).
    """
    if not hits.flags.c_contiguous or hits.dtype != np.int64 or hits.ndim != 3:
        raise ValueError("hits must be a C-contiguous int64[T, A, M] array")
    _kernels.add_hits(np.ascontiguousarray(match, dtype=np.int64),
                      np.ascontiguousarray(countable, dtype=np.uint8), hits, hits.shape[1],
                      hits.shape[2], int(area))
