"""One shard's work: its proposals against the ground truth, as integer counts (a typed result).

A shard is any set of whole images (a chunk file of the store, or a piece of one results file).
:func:`evaluate_shard` is a plain function: the driver calls it in-process for small runs and from
Ray tasks for large ones (``segdist.evaluation.sharded``); either way the counts add up to one
COCOeval run (see ``recall``'s module docstring).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from segdist.evaluation.groundtruth import ImageGT, coco_index, prepare_ground_truth
from segdist.evaluation.recall import RecallCounts, count_images
from segdist.proposals.types import ImageProposals


@dataclass(frozen=True)
class GroundTruth:
    """The ground truth every shard needs, prepared once by the driver.

    Attributes:
        all_ids: every image id of the dataset (proposals of other ids are an error).
        images: per IoU type, ``{image_id: ImageGT}`` of the evaluated images (COCOeval's order).
    """

    all_ids: frozenset[int]
    images: dict[str, dict[int, ImageGT]]

    @classmethod
    def prepare(cls, coco_gt: Mapping[str, Any],
                ids: Mapping[str, Iterable[int]]) -> "GroundTruth":
        """From a COCO instances dict and the evaluated image ids per IoU type."""
        coco = coco_index(coco_gt)
        images = {t: prepare_ground_truth(coco_gt, image_ids, segments=(t == "segm"),
                                          boxes=(t == "bbox"), coco=coco)
                  for t, image_ids in ids.items()}
        return cls(frozenset(coco.imgs), images)


@dataclass
class ShardResult:
    """What one shard produced.

    Attributes:
        name: the shard's name (its chunk file, or ``piece-N`` of a single file).
        image_ids: the images the shard held (ascending).
        has_masks: every image with proposals carried masks.
        unknown: image ids that are not in the ground truth (then ``counts`` is empty).
        model: the model name stored with the proposals (None for an empty shard).
        counts: per IoU type, the counts of the shard's evaluated images; None for ``segm`` of
            box-only proposals.
        seconds: wall time of the parts: ``read``, ``gt`` (fetching the shared ground truth; 0
            when the worker had it already) and one entry per IoU type.
        worker: process id that ran it; gt_fetched: whether this shard fetched the ground truth
            (once per worker process on Ray, never in-process).
    """

    name: str
    image_ids: list[int]
    has_masks: bool
    unknown: list[int]
    model: str | None
    counts: dict[str, RecallCounts | None] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    worker: int = 0
    gt_fetched: bool = False


def evaluate_shard(proposals: Sequence[ImageProposals], gt: GroundTruth, iou_types: Sequence[str],
                   max_dets: int, name: str = "") -> ShardResult:
    """Counts of one shard of proposals.

    Args:
        proposals: the shard's images (each image once).
        gt: the prepared ground truth (:meth:`GroundTruth.prepare`).
        iou_types: subset of ``("segm", "bbox")``.
        max_dets: proposals kept per image (COCOeval's ``maxDets[-1]``).
        name: the shard's name, for the result.
    Returns:
        :class:`ShardResult`; images outside the evaluated selection are held but not counted.
    """
    by_id = {p.image_id: p for p in proposals}
    ids = sorted(by_id)
    out = ShardResult(name=name, image_ids=ids,
                      has_masks=all(p.counts is not None for p in proposals if len(p)),
                      unknown=[i for i in ids if i not in gt.all_ids],
                      model=proposals[0].model if proposals else None, worker=os.getpid())
    if out.unknown:
        return out
    for iou_type in iou_types:
        if iou_type == "segm" and not out.has_masks:
            out.counts[iou_type] = None
            continue
        t0 = time.perf_counter()
        gt_t = gt.images[iou_type]
        out.counts[iou_type] = count_images(gt_t, by_id, [i for i in ids if i in gt_t], iou_type,
                                            max_dets=max_dets)
        out.seconds[iou_type] = time.perf_counter() - t0
    return out
