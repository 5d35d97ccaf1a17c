"""The proposal picture: masks drawn where they are, nothing drawn far from them."""

from __future__ import annotations

import numpy as np
import pytest

from segdist.proposals.rle import encode_with_boxes
from segdist.proposals.types import ImageProposals
from segdist.visualize import draw_proposals

H, W = 120, 160


def proposals_of(masks: np.ndarray, scores: list[float]) -> ImageProposals:
    counts, boxes, _ = encode_with_boxes(masks)
    return ImageProposals(7, H, W, np.array(scores, np.float32), boxes, counts, "test")


def shapes() -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    disc = (yy - 40) ** 2 + (xx - 45) ** 2 < 20 ** 2
    rect = np.zeros((H, W), bool)
    rect[70:110, 100:150] = True
    third = np.zeros((H, W), bool)
    third[5:20, 120:155] = True
    return np.stack([disc, rect, third])


def changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a != b).any(axis=2)


def near(mask: np.ndarray, margin: int) -> np.ndarray:
    """Pixels within ``margin`` px (Chebyshev) of the mask's bounding box."""
    ys, xs = np.nonzero(mask)
    out = np.zeros_like(mask)
    out[max(ys.min() - margin, 0):ys.max() + margin + 1, max(xs.min() - margin, 0):xs.max() + margin + 1] = True
    return out


def test_masks_are_drawn_where_they_are_and_nowhere_else():
    image = np.full((H, W, 3), 128, np.uint8)
    masks = shapes()
    props = proposals_of(masks, [0.93, 0.61, 0.2])
    out = draw_proposals(image, props, top=2)
    assert out.shape == image.shape and out.dtype == np.uint8
    diff = changed(out, image)
    assert diff[masks[0]].all() and diff[masks[1]].all()  # every mask pixel is coloured
    # Changes stay at the masks (outline, score label at the box's top-left corner).
    allowed = near(masks[0], 2) | near(masks[1], 2)
    assert not diff[~allowed].any()
    assert not diff[masks[2]].any()  # the third proposal is beyond top=2
    # The two masks get different colours; inside a mask, away from outline and label, the colour
    # is a blend of the grey and the proposal colour (the image shows through).
    c0, c1 = out[40, 45].astype(int), out[100, 140].astype(int)
    assert (c0 != c1).any()
    assert ((c0 > 30) & (c0 < 245)).any()


def test_best_proposal_is_on_top_and_image_is_not_modified():
    image = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    keep = image.copy()
    masks = np.zeros((2, H, W), bool)
    masks[0, 30:90, 30:130] = True  # the best, covering the other's centre
    masks[1, 50:70, 60:100] = True
    only_best = draw_proposals(image, proposals_of(masks[:1], [0.9]), top=5)
    both = draw_proposals(image, proposals_of(masks, [0.9, 0.4]), top=5)
    np.testing.assert_array_equal(image, keep)
    # Where both masks overlap, the result differs from drawing the best alone (the lower one is
    # blended first, then the best over it), and equals the best's colour blended over that.
    assert changed(both, only_best)[55:65, 65:95].all()


def test_box_only_proposals_and_bad_input():
    image = np.zeros((H, W, 3), np.uint8)
    props = ImageProposals(1, H, W, np.array([0.5], np.float32), np.array([[20, 30, 40, 50]], np.float32),
                           None, "maskrcnn-rpn")
    out = draw_proposals(image, props)
    diff = changed(out, image)
    assert diff[30:80, 20].all() and diff[30:80, 59].all()  # left and right edges of the box
    assert not diff[45:70, 30:50].any()  # inside the box, away from label and outline
    with pytest.raises(ValueError, match="120x160 image"):
        draw_proposals(np.zeros((10, 10, 3), np.uint8), props)
    with pytest.raises(ValueError, match="uint8"):
        draw_proposals(np.zeros((H, W), np.uint8), props)
