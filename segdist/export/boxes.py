"""Box and score conversions the consumers expect."""

from __future__ import annotations

import numpy as np


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """float32[N, 4] COCO ``[x, y, w, h]`` -> float32[N, 4] ``[x1, y1, x2, y2]`` absolute pixels
    (Detectron2's XYXY_ABS, MMDetection's and torchvision's box format: ``x2 = x + w``)."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    out = boxes.copy()
    out[:, 2:] += boxes[:, :2]
    return out


# Scores are float32 probabilities: clip 0 and 1 just inside (0, 1) so the logit stays finite,
# and far enough from the nearest float32 neighbours (2**-149 and 1 - 2**-24) to stay distinct.
_EPS_LOW = 2.0 ** -160
_EPS_HIGH = 2.0 ** -26


def logit(scores: np.ndarray) -> np.ndarray:
    """float32[N] ``log(s / (1 - s))`` of float32[N] probabilities, computed in float64.

    Strictly increasing in the score over the array: equal scores get equal logits, and where
    float32 rounding would give two different scores the same logit (neighbouring float32 scores
    below about 0.25), the larger score's logit is moved up by float32 steps until it is larger,
    so sorting by logit gives the order of the scores. 0 and 1 map to finite values (about -110.9
    and 18.0).
    """
    s = np.clip(np.asarray(scores, dtype=np.float64).reshape(-1), _EPS_LOW, 1.0 - _EPS_HIGH)
    z = (np.log(s) - np.log1p(-s)).astype(np.float32)
    if len(z) < 2:
        return z
    values, inverse = np.unique(s, return_inverse=True)  # ascending, distinct
    zu = (np.log(values) - np.log1p(-values)).astype(np.float32)
    while True:  # collisions are rare and isolated: a few passes at most
        bad = np.flatnonzero(zu[1:] <= zu[:-1]) + 1
        if not len(bad):
            break
        zu[bad] = np.nextafter(zu[bad - 1], np.float32(np.inf))
    return zu[inverse.reshape(-1)]
