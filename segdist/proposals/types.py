"""The per-image proposal container that models produce and the formats write.

Conventions (also in docs/formats.md):
- ``boxes`` are COCO ``[x, y, w, h]`` in pixels of the original image (top-left corner of the
  top-left pixel is (0, 0); a box covering pixel columns 2..4 has x = 2, w = 3), float32.
  For masks the box is the tight box of the mask (pycocotools ``toBbox``); for box-only proposals
  (Mask R-CNN ``rpn`` mode) it is the model's box.
- ``counts`` are COCO compressed RLE strings (bytes, ASCII) of masks of size (height, width),
  exactly as ``pycocotools.mask.encode`` produces them; ``None`` for box-only proposals.
- Proposals are sorted by ``scores`` descending (stable), scores in [0, 1] (probabilities).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ImageProposals:
    """Up to N proposals of one image.

    Attributes:
        image_id: the dataset's image id.
        height, width: size of the image the masks and boxes refer to.
        scores: float32[N], descending.
        boxes: float32[N, 4], COCO xywh in image pixels.
        counts: list of N compressed-RLE ``bytes`` (mask size = (height, width)), or None.
        model: name of the model preset that made them (e.g. ``sharpmask-zoom``).
        labels: optional int32[N] predicted class (Mask R-CNN); None for class-agnostic models.
    """

    image_id: int
    height: int
    width: int
    scores: np.ndarray
    boxes: np.ndarray
    counts: list[bytes] | None
    model: str
    labels: np.ndarray | None = field(default=None)

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        n = len(self.scores)
        if len(self.boxes) != n:
            raise ValueError(f"image {self.image_id}: {n} scores but {len(self.boxes)} boxes")
        if self.counts is not None:
            self.counts = [c.encode("ascii") if isinstance(c, str) else bytes(c) for c in self.counts]
            if len(self.counts) != n:
                raise ValueError(f"image {self.image_id}: {n} scores but {len(self.counts)} masks")
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int32).reshape(-1)
            if len(self.labels) != n:
                raise ValueError(f"image {self.image_id}: {n} scores but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def has_masks(self) -> bool:
        return self.counts is not None

    def rles(self) -> list[dict]:
        """Masks as pycocotools RLE dicts ``{"size": [h, w], "counts": bytes}``."""
        if self.counts is None:
            return []
        return [{"size": [self.height, self.width], "counts": c} for c in self.counts]

    def top(self, k: int) -> "ImageProposals":
        """The first ``k`` proposals (they are already sorted by score)."""
        return ImageProposals(
            self.image_id, self.height, self.width, self.scores[:k], self.boxes[:k],
            None if self.counts is None else self.counts[:k], self.model,
            None if self.labels is None else self.labels[:k],
        )

    def equals(self, other: "ImageProposals") -> bool:
        """Exact equality of every field (used by round-trip checks)."""
        def same(a, b):
            if a is None or b is None:
                return a is None and b is None
            return np.array_equal(a, b)

        return (
            self.image_id == other.image_id and self.height == other.height
            and self.width == other.width and self.model == other.model
            and same(self.scores, other.scores) and same(self.boxes, other.boxes)
            and same(self.labels, other.labels)
            and (self.counts == other.counts)
        )
