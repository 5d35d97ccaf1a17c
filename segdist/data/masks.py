"""COCO segmentations (polygons, uncompressed or compressed RLE) as compressed RLE: one helper for
the dataset loaders, the training sampler and the export loader."""

from __future__ import annotations

from typing import Any

import numpy as np


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """A COCO ``segmentation`` of an ``height`` x ``width`` image as a compressed RLE dict.

    Accepts polygons (a list of ``[x1, y1, x2, y2, ...]``, merged into one mask; an empty list is
    an empty mask), an uncompressed RLE (``counts`` a list of ints), a compressed RLE dict (returned
    as is) or compressed counts alone (``bytes``/``str``). Raises what pycocotools raises (TypeError,
    ValueError, ...) for malformed input; callers turn that into their own error.
    """
    from pycocotools import mask as mask_utils

    h, w = int(height), int(width)
    if isinstance(segmentation, (bytes, str)):
        return {"size": [h, w], "counts": segmentation}
    if isinstance(segmentation, list):
        if not segmentation:
            return mask_utils.encode(np.zeros((h, w, 1), np.uint8, order="F"))[0]
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
    if isinstance(segmentation.get("counts"), list):
        return mask_utils.frPyObjects(segmentation, h, w)
    return segmentation
