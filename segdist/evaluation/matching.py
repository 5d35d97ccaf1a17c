"""Greedy detection-to-ground-truth matching, decision for decision as ``COCOeval.evaluateImg``.

pycocotools' loop, for each IoU threshold t and each detection in score order: walk the ground
truth (not-ignored first, then ignored, each part in COCOeval's order), skip GTs already matched
unless they are crowd regions, stop at the first ignored GT once a not-ignored one is held, and
keep the GT with IoU >= the best so far (starting from ``min(t, 1 - 1e-10)``; on equal IoU the
later GT wins). This module makes the same decisions, but only visits pairs that can match: a pair
whose IoU is below the lowest threshold never changes the outcome (it is skipped by the
``iou < best`` test before it could be kept, and it cannot trigger the stop, which needs a GT
already held). A detection that overlaps nothing enough costs nothing, which is most of 1000
proposals. IoUs themselves come from ``pycocotools.mask.iou``, as in COCOeval.
"""

from __future__ import annotations

import numpy as np

from segdist.evaluation.protocol import effective_thresholds


def greedy_match(ious: np.ndarray, ignore: np.ndarray, crowd: np.ndarray,
                 thresholds: np.ndarray) -> np.ndarray:
    """Match detections to ground truth at every threshold, exactly as COCOeval does.

    Args:
        ious: float64[D, G] IoU of each detection (rows in score order, already cut to maxDets)
            with each GT (columns in COCOeval's GT order), as ``pycocotools.mask.iou`` returns it
            (crowd GTs: intersection over the detection's area).
        ignore: bool[G] GT ignored in this area range (crowd, or area outside the range).
        crowd: bool[G] GT is a crowd region (may be matched by several detections).
        thresholds: float64[T] IoU thresholds.
    Returns:
        int64[T, D]: for each threshold and detection the index (into the G columns) of the GT it
        matched, or -1. COCOeval's ``dtMatches`` is the GT *id* at that index (0 when unmatched).
    """
    ious = np.asarray(ious, dtype=np.float64)
    eff = effective_thresholds(thresholds)
    n_det = ious.shape[0] if ious.ndim == 2 else 0
    out = np.full((len(eff), n_det), -1, dtype=np.int64)
    if n_det == 0 or ious.shape[1] == 0 or len(eff) == 0:
        return out
    ignore = np.asarray(ignore, dtype=bool)
    # COCOeval's walk order: not-ignored GTs first, stable (argsort of the ignore flags, mergesort).
    order = np.argsort(ignore, kind="mergesort")
    ious_o = ious[:, order]  # D x G, columns in walk order
    floor = float(eff.min())
    best = ious_o.max(axis=1)
    dets = np.flatnonzero(best >= floor)
    # Per candidate detection: (walk position, iou) of the GTs it could ever match, in walk order
    # (one nonzero over the whole block; its row-major order groups the pairs by detection).
    sub = ious_o[dets]
    rows, cols = np.nonzero(sub >= floor)
    bounds = np.searchsorted(rows, np.arange(len(dets) + 1)).tolist()
    cols_l, vals_l = cols.tolist(), sub[rows, cols].tolist()
    pairs = [list(zip(cols_l[a:b], vals_l[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]
    ign = ignore[order].tolist()
    cro = np.asarray(crowd, dtype=bool)[order].tolist()
    order_l = order.tolist()
    dets_l = dets.tolist()
    best_l = best[dets].tolist()
    n_gt = len(ign)
    for ti, t in enumerate(eff.tolist()):
        taken = [False] * n_gt
        row_out = out[ti]
        for d, d_best, cand in zip(dets_l, best_l, pairs):
            if d_best < t:  # no GT reaches t: COCOeval finds no match either
                continue
            bound = t
            m = -1
            for g, v in cand:
                if taken[g] and not cro[g]:
                    continue
                if m > -1 and not ign[m] and ign[g]:
                    break
                if v < bound:
                    continue
                bound = v
                m = g
            if m == -1:
                continue
            taken[m] = True
            row_out[d] = order_l[m]
    return out
