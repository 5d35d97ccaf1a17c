"""Average recall as integer counts: evaluate any set of images, add the counts, read off AR.

COCOeval's recall for (IoU t, area range a, maxDets m) is ``tp / npig``: ``tp`` the number of
detections, among each image's first m (by score), matched to a not-ignored GT at t, summed over
images; ``npig`` the number of not-ignored GTs in a over all images (``-1`` when there are none).
Both are sums over images of per-image integers, and an image's matching depends on that image
alone, so a dataset split into shards gives the full run's numbers when the shards' integer counts
are added: AR is then ``mean_t tp / npig`` computed once, from the same integers and with the same
float operations as ``COCOeval.accumulate`` + ``summarize``. That is the whole sharding argument.

:class:`RecallCounts` holds, per threshold and area range, the number of true positives at each
rank 1..maxDets (so the AR-vs-number-of-proposals curve comes for free) and the GT count.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from segdist.errors import SegdistError
from segdist.evaluation.groundtruth import ImageGT
from segdist.evaluation.kernels import add_hits, box_ious, greedy_match, segm_ious
from segdist.evaluation.protocol import ALL_IOUS, AREA_LABELS, AREA_RANGES, STANDARD_IOUS
from segdist.proposals.types import ImageProposals


@dataclass
class RecallCounts:
    """Integer counts of a set of images; ``a + b`` is the counts of both sets.

    Attributes:
        iou_type: ``"segm"`` or ``"bbox"``.
        thresholds: float64[T] IoU thresholds (the first 10 are COCO's .50:.05:.95).
        max_dets: proposals per image kept (COCOeval's ``maxDets[-1]``).
        hits: int64[T, A, max_dets]: true positives at rank r (0-based), summed over images;
            its cumulative sum over the last axis is tp at maxDets = r + 1.
        n_gt: int64[A] not-ignored ground truths per area range (COCOeval's ``npig``).
        n_images: images evaluated; n_with_proposals: those that had at least one proposal;
        n_proposals: proposals evaluated (after the cut to max_dets).
        max_per_image: the most proposals any image had (after the cut): AR at any count from
            it up to max_dets is the same number (what the report's labels say).
    """

    iou_type: str
    thresholds: np.ndarray
    max_dets: int
    hits: np.ndarray
    n_gt: np.ndarray
    n_images: int = 0
    n_with_proposals: int = 0
    n_proposals: int = 0
    area_labels: tuple[str, ...] = field(default=AREA_LABELS)
    max_per_image: int = 0

    @classmethod
    def zeros(cls, iou_type: str, max_dets: int = 1000,
              thresholds: np.ndarray = ALL_IOUS) -> "RecallCounts":
        thresholds = np.asarray(thresholds, dtype=np.float64)
        return cls(iou_type, thresholds, int(max_dets),
                   np.zeros((len(thresholds), len(AREA_RANGES), int(max_dets)), dtype=np.int64),
                   np.zeros(len(AREA_RANGES), dtype=np.int64))

    def __add__(self, other: "RecallCounts") -> "RecallCounts":
        if (self.iou_type != other.iou_type or self.max_dets != other.max_dets
                or not np.array_equal(self.thresholds, other.thresholds)):
            raise ValueError("cannot add counts of different evaluations "
                             f"({self.iou_type}/{self.max_dets} vs {other.iou_type}/{other.max_dets})")
        return RecallCounts(self.iou_type, self.thresholds, self.max_dets,
                            self.hits + other.hits, self.n_gt + other.n_gt,
                            self.n_images + other.n_images,
                            self.n_with_proposals + other.n_with_proposals,
                            self.n_proposals + other.n_proposals, self.area_labels,
                            max(self.max_per_image, other.max_per_image))

    def tp(self) -> np.ndarray:
        """int64[T, A, max_dets]: ``tp[t, a, m - 1]`` = true positives among each image's first m."""
        return np.cumsum(self.hits, axis=2)

    def recall(self) -> np.ndarray:
        """float64[T, A, max_dets]: ``tp / n_gt`` as COCOeval.accumulate; -1 where n_gt is 0."""
        tp = self.tp()
        out = np.full(tp.shape, -1.0)
        for a, npig in enumerate(self.n_gt.tolist()):
            if npig > 0:
                out[:, a, :] = tp[:, a, :] / npig
        return out

    def average_recall(self, max_dets: int | None = None, area: str = "all",
                       recall: np.ndarray | None = None) -> float:
        """AR at ``max_dets`` proposals per image for an area range, as ``COCOeval.summarize``.

        The mean over the 10 standard thresholds of the recalls that are not -1 (so -1 when the
        area range has no GT), computed with the same NumPy operation on the same values.
        """
        m = self.max_dets if max_dets is None else int(max_dets)
        if not 1 <= m <= self.max_dets:
            raise ValueError(f"max_dets must be in 1..{self.max_dets}, got {m}")
        rec = self.recall() if recall is None else recall
        s = np.ascontiguousarray(rec[:len(STANDARD_IOUS), self.area_labels.index(area), m - 1])
        if len(s[s > -1]) == 0:
            return -1.0
        return float(np.mean(s[s > -1]))


    def average_recall_curve(self, area: str = "all",
                             recall: np.ndarray | None = None) -> np.ndarray:
        """float64[max_dets]: :meth:`average_recall` at every proposal count 1..max_dets at once.

        Bit-identical to calling it per count: a row of the contiguous [max_dets, 10] array is
        reduced with the same pairwise summation as COCOeval's 1-D ``np.mean`` (a test checks).
        """
        rec = self.recall() if recall is None else recall
        a = self.area_labels.index(area)
        if self.n_gt[a] == 0:  # recall is -1 throughout: COCOeval reports -1
            return np.full(self.max_dets, -1.0)
        return np.ascontiguousarray(rec[:len(STANDARD_IOUS), a, :].T).mean(axis=1)


def _image_ious(gt: ImageGT, props: ImageProposals, order: np.ndarray, iou_type: str) -> np.ndarray:
    """float64[D, G] IoU of the kept detections (in ``order``) with the GTs, as COCOeval.computeIoU."""
    if iou_type == "bbox":
        return box_ious(props.boxes[order], gt.boxes, gt.crowd)
    if props.counts is None:
        raise SegdistError(f"image {props.image_id}: box-only proposals have no segments; "
                           "evaluate them with --iou-types bbox")
    if gt.rle_counts is None:
        raise ValueError("ground truth prepared without segments")
    if (props.height, props.width) != (gt.height, gt.width):
        raise SegdistError(
            f"image {props.image_id}: proposal masks are {props.height}x{props.width} but the "
            f"image is {gt.height}x{gt.width} in the ground truth; the proposals were made "
            "for another dataset (or resized images)")
    try:
        return segm_ious(props.counts, order, gt.rle_counts, gt.height, gt.width, gt.crowd)
    except ValueError as exc:
        raise SegdistError(f"image {props.image_id}: {exc}") from None


def count_image(counts: RecallCounts, gt: ImageGT, props: ImageProposals | None) -> None:
    """Add one image to ``counts`` (in place). ``props`` None or empty: the image's GTs are misses.

    Detections are ordered by descending score with a stable sort (mergesort, as COCOeval) and cut
    to ``counts.max_dets``; each area range is matched separately (its out-of-range GTs ignored).
    """
    counts.n_images += 1
    n_gt = len(gt)
    ignores = []
    for lo, hi in AREA_RANGES:
        ign = gt.crowd | (gt.area < lo) | (gt.area > hi)
        ignores.append(ign)
        counts.n_gt[len(ignores) - 1] += int(n_gt - ign.sum())
    if props is None or len(props) == 0:
        return
    counts.n_with_proposals += 1
    order = np.argsort(-props.scores.astype(np.float64), kind="mergesort")[:counts.max_dets]
    counts.n_proposals += len(order)
    counts.max_per_image = max(counts.max_per_image, len(order))
    if n_gt == 0:
        return  # nothing to match; unmatched detections never change recall
    ious = _image_ious(gt, props, order, counts.iou_type)
    matches: dict[bytes, np.ndarray] = {}
    for a, ign in enumerate(ignores):
        key = ign.tobytes()
        if key not in matches:  # area ranges with the same ignore flags match identically
            matches[key] = greedy_match(ious, ign, gt.crowd, counts.thresholds)
        # COCOeval counts dtMatches (the GT id) as a boolean: a match to id 0 is no hit.
        add_hits(counts.hits, a, matches[key], ~ign & (gt.ids != 0))


def count_images(gt_by_image: Mapping[int, ImageGT], proposals: Mapping[int, ImageProposals],
                 image_ids: Iterable[int], iou_type: str, *, max_dets: int = 1000,
                 thresholds: np.ndarray = ALL_IOUS) -> RecallCounts:
    """Counts of ``image_ids`` (a shard): GT from ``gt_by_image``, proposals (may lack images).

    Args:
        gt_by_image: ``{image_id: ImageGT}`` covering ``image_ids``.
        proposals: ``{image_id: ImageProposals}``; an image missing here has no proposals.
        image_ids: the shard's images (each counted once).
        iou_type: ``"segm"`` (masks) or ``"bbox"`` (boxes).
    """
    if iou_type not in ("segm", "bbox"):
        raise ValueError(f"iou_type must be 'segm' or 'bbox', got {iou_type!r}")
    counts = RecallCounts.zeros(iou_type, max_dets, thresholds)
    for image_id in image_ids:
        count_image(counts, gt_by_image[image_id], proposals.get(image_id))
    return counts
