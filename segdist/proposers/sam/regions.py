"""SAM's ``min_mask_region_area`` post-processing: holes and islands smaller than the area removed
from every mask, then an NMS that prefers unchanged masks (``SamAutomaticMaskGenerator.
postprocess_small_regions``). The per-mask connected components are the official helper's
(``segment_anything.utils.amg.remove_small_regions``, opencv), run on the host as there; it runs
only when the option is set (default 0). SAM 2 does its version on the low-resolution logits
instead (:class:`segdist.proposers.sam.runners.Sam2Runner`).
"""

from __future__ import annotations

import numpy as np
import torch

from segdist.errors import ConfigError


def require_opencv(name: str) -> None:
    """ConfigError naming the package unless opencv (cv2) imports."""
    try:
        import cv2  # noqa: F401
    except ImportError:
        raise ConfigError(f"model.min_mask_region_area > 0 with {name} needs opencv, which is not "
                          "installed; install it with: pip install 'segdist[sam]' (or pip install "
                          "opencv-python-headless), or set model.min_mask_region_area=0") from None


def remove_small_regions(counts: list[bytes], height: int, width: int, min_area: int,
                         nms_thresh: float) -> tuple[list[int], list[bytes], np.ndarray]:
    """Clean N masks (compressed RLE of height x width) of holes and islands under ``min_area``
    pixels, then box-NMS at ``nms_thresh`` with score 1 for unchanged masks, 0 for changed ones.

    Returns ``(keep, counts, boxes)``: the indices kept (in the NMS's order) into the input, and
    the kept masks' RLE and tight COCO boxes float32 [len(keep), 4].
    """
    from segment_anything.utils.amg import remove_small_regions as clean
    from torchvision.ops import batched_nms

    from segdist.proposals.rle import decode, encode_masks
    from segdist.proposers.sam.generator import inclusive_boxes

    masks = decode(counts, height, width).astype(bool)                   # N x H x W
    scores = np.ones(len(masks), np.float32)
    for i, mask in enumerate(masks):
        mask, holes = clean(mask, min_area, mode="holes")
        mask, islands = clean(mask, min_area, mode="islands")
        masks[i] = mask
        scores[i] = float(not (holes or islands))
    new_counts, tight, _ = encode_masks(torch.from_numpy(masks))
    boxes = inclusive_boxes(torch.from_numpy(tight))
    keep = batched_nms(boxes.float(), torch.from_numpy(scores), torch.zeros(len(boxes)), nms_thresh)
    k = keep.tolist()
    return k, [new_counts[i] for i in k], tight[k]
