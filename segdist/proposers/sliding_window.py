"""The sliding-window baseline: boxes on a fixed multi-scale grid, each with its box-shaped mask.

No network and no weights: the proposals of an image depend only on its size. Window families are
every (size, aspect ratio) pair: a window of size s and ratio r (width / height) has side
s * sqrt(H * W) scaled by sqrt(r) in width and 1 / sqrt(r) in height (clipped to the image,
rounded to whole pixels); its positions step by ``stride`` times its width and height, and the grid
is centred in the image. Ranking: within a family, windows nearer the image centre first (objects
are centred more often than not); families alternate (the first window of every family, then the
second, ...) in the order of ``sizes`` then ``aspect_ratios``; duplicates are dropped and the first
``proposals`` kept. Scores fall linearly with the rank, from 1.

Masks are the boxes themselves, encoded to COCO RLE straight from the box
(:func:`segdist.proposals.rle.encode_boxes`), so a box and its mask's tight box agree exactly.
A grid is computed once per image size (cached), so thousands of images per second are possible;
it serves as the floor a learned proposer must beat, and as a cheap model for scale tests of the job.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator

from segdist.config import ModelConfig
from segdist.proposals.types import ImageProposals
from segdist.proposers.interface import check_images


class SlidingWindowConfig(ModelConfig):
    """The sliding-window baseline: the shared fields plus the grid (see the module docstring).

    sizes: window sides as fractions of sqrt(H * W), in (0, 1]. aspect_ratios: width / height,
    > 0. stride: step between neighbouring windows as a fraction of the window's side, in (0, 1].
    """

    FAMILY: ClassVar[str] = "sliding-window"
    WEIGHT_KINDS: ClassVar[tuple[str, ...]] = ("random",)  # no weights at all

    name: Literal["sliding-window"] = "sliding-window"
    sizes: tuple[float, ...] = (0.08, 0.15, 0.25, 0.4, 0.6, 0.85)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    stride: float = Field(default=0.5, gt=0, le=1)

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not 0 < s <= 1 for s in v):
            raise ValueError(f"model.sizes must be fractions in (0, 1], at least one (got {list(v)})")
        return v

    @field_validator("aspect_ratios")
    @classmethod
    def _ratios(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(r <= 0 for r in v):
            raise ValueError(f"model.aspect_ratios must be > 0, at least one (got {list(v)})")
        return v


def build(config: SlidingWindowConfig) -> "SlidingWindowProposer":
    """The sliding-window proposer for ``config`` (nothing to load)."""
    return SlidingWindowProposer(config.name, sizes=config.sizes, aspect_ratios=config.aspect_ratios,
                                 stride=config.stride, proposals=config.proposals)


class SlidingWindowProposer:
    """Sliding-window proposals of any image (see the module docstring); runs on the CPU."""

    weights_sha256 = None
    device = "cpu"

    def __init__(self, name: str, *, sizes: Sequence[float], aspect_ratios: Sequence[float],
                 stride: float, proposals: int):
        self.name = name
        self._grid = (tuple(sizes), tuple(aspect_ratios), float(stride), int(proposals))

    def __call__(self, images: Sequence[np.ndarray], image_ids: Sequence[int]) -> list[ImageProposals]:
        """Proposals per image, in input order (see :class:`segdist.proposers.Proposer`)."""
        check_images(images, image_ids)
        out = []
        for im, iid in zip(images, image_ids):
            h, w = int(im.shape[0]), int(im.shape[1])
            boxes, scores, counts = grid(h, w, *self._grid)
            out.append(ImageProposals(int(iid), h, w, scores, boxes, list(counts), self.name))
        return out


@functools.lru_cache(maxsize=256)
def grid(height: int, width: int, sizes: tuple[float, ...], aspect_ratios: tuple[float, ...],
         stride: float, proposals: int) -> tuple[np.ndarray, np.ndarray, tuple[bytes, ...]]:
    """The ranked windows of an H x W image: (boxes float32 [N, 4] COCO xywh, scores float32 [N]
    descending in (0, 1], compressed RLE of each box's mask), N <= proposals. Read-only arrays."""
    from segdist.proposals.rle import encode_boxes

    families = []  # per family: int [n, 4] x0, y0, x1, y1 in ranking order
    base = math.sqrt(height * width)
    for s in sizes:
        for r in aspect_ratios:
            bw = min(width, max(1, round(s * base * math.sqrt(r))))
            bh = min(height, max(1, round(s * base / math.sqrt(r))))
            xs = _starts(width, bw, stride)
            ys = _starts(height, bh, stride)
            x0, y0 = np.meshgrid(xs, ys)                                    # ny x nx
            x0, y0 = x0.ravel(), y0.ravel()
            # centre first: squared distance of the window's centre to the image's, in pixels x 2
            d = (2 * x0 + bw - width) ** 2 + (2 * y0 + bh - height) ** 2
            order = np.lexsort((x0, y0, d))                                 # ties: raster order
            families.append(np.stack([x0, y0, x0 + bw, y0 + bh], 1)[order])
    rank = np.concatenate([np.arange(len(f)) for f in families])
    fam = np.concatenate([np.full(len(f), i) for i, f in enumerate(families)])
    boxes = np.concatenate(families)[np.lexsort((fam, rank))]
    _, first = np.unique(boxes, axis=0, return_index=True)
    boxes = boxes[np.sort(first)][:proposals]
    n = len(boxes)
    scores = ((n - np.arange(n)) / n).astype(np.float32)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).astype(np.float32)
    for a in (xywh, scores):
        a.setflags(write=False)  # shared by every image of this size
    return xywh, scores, tuple(encode_boxes(boxes, height, width))


def _starts(length: int, side: int, stride: float) -> np.ndarray:
    """Window starts along one axis: steps of stride * side (at least 1 px), centred."""
    step = max(1, round(stride * side))
    n = (length - side) // step + 1
    offset = (length - side - (n - 1) * step) // 2
    return offset + step * np.arange(n, dtype=np.int64)
