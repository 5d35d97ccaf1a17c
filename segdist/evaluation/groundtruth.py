"""Ground truth per image, in the exact order and form ``COCOeval`` (useCats = 0) sees it.

With ``useCats = 0`` COCOeval gathers an image's ground truth as
``[g for cat in sorted(cat_ids) for g in gts[image, cat]]``: annotations grouped by category id
(ascending), each group in the dataset's annotation order, and annotations whose category is not
in ``categories`` left out. The order matters: the matcher breaks IoU ties by it. Segments are
converted with pycocotools' own ``COCO.annToRLE`` (polygons merged, uncompressed RLE compressed),
so the IoUs are those COCOeval computes.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from segdist.errors import SegdistError

#: Image-dict key a dataset sets to False when an image has no segment ground truth (PASCAL VOC
#: images without a SegmentationObject PNG, see segdist.data.voc): box AR only for those.
HAS_SEGMENTS_KEY = "has_segm"
#: Top-level key listing the images that have segment ground truth (VOC conversion writes it).
SEGM_IMAGE_IDS_KEY = "segm_image_ids"


@dataclass
class ImageGT:
    """The ground truth of one image.

    Attributes:
        image_id: the dataset's image id.
        height, width: image size (what segment masks are sized to).
        ids: int64[G] annotation ids (COCOeval quirk kept: a match to id 0 does not count).
        crowd: bool[G] ``iscrowd`` (crowd regions are ignored and may be matched many times).
        area: float64[G] the annotation ``area`` field; it alone decides small/medium/large.
        boxes: float64[G, 4] COCO ``[x, y, w, h]`` of each annotation (zeros when absent).
        rle_counts: G compressed COCO RLE strings (bytes) of ``height x width`` masks, or None
            when the segments were not prepared (box evaluation only).
    """

    image_id: int
    height: int
    width: int
    ids: np.ndarray
    crowd: np.ndarray
    area: np.ndarray
    boxes: np.ndarray
    rle_counts: list[bytes] | None

    def __len__(self) -> int:
        return len(self.ids)


def coco_index(coco_gt: Mapping[str, Any]):
    """A pycocotools ``COCO`` over an instances dict (its index only; the dict is not copied)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dict(coco_gt)
    coco.dataset.setdefault("annotations", [])
    coco.dataset.setdefault("categories", [])
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()
    return coco


def eval_image_ids(coco_gt: Mapping[str, Any], iou_type: str,
                   image_ids: Iterable[int] | None = None) -> list[int]:
    """Sorted ids of the images an ``iou_type`` evaluation runs over.

    All images of ``coco_gt`` (or of ``image_ids``, which must be in it), except that segment
    evaluation keeps only images with segment GT: those listed in ``coco_gt["segm_image_ids"]``
    when present, and never one whose image dict has ``"has_segm": false`` (VOC: boxes only).
    """
    images = {int(im["id"]): im for im in coco_gt.get("images", [])}
    if image_ids is None:
        ids = sorted(images)
    else:
        ids = sorted({int(i) for i in image_ids})
        unknown = [i for i in ids if i not in images]
        if unknown:
            raise SegdistError(f"{len(unknown)} image ids are not in the ground truth "
                               f"(e.g. {unknown[:5]}); check --dataset")
    if iou_type == "segm":
        if coco_gt.get(SEGM_IMAGE_IDS_KEY) is not None:
            listed = {int(i) for i in coco_gt[SEGM_IMAGE_IDS_KEY]}
            ids = [i for i in ids if i in listed]
        ids = [i for i in ids if images[i].get(HAS_SEGMENTS_KEY, True) is not False]
    return ids


def prepare_ground_truth(coco_gt: Mapping[str, Any], image_ids: Iterable[int], *,
                         segments: bool, boxes: bool = True, coco=None) -> dict[int, ImageGT]:
    """Per-image ground truth for ``image_ids`` in COCOeval's order.

    Args:
        coco_gt: COCO instances dict (``images``, ``annotations``, ``categories``).
        image_ids: the images to prepare (each must be in ``coco_gt``).
        segments: also convert segmentations to RLE (needed for segment AR).
        boxes: require every annotation to have a ``bbox`` (needed for box AR).
        coco: an existing :func:`coco_index` of ``coco_gt`` (built here when None).
    Returns:
        ``{image_id: ImageGT}``.
    Raises:
        SegdistError for an annotation without ``area`` (or without ``segmentation`` when segments
        are wanted, or ``bbox`` when boxes are): COCOeval cannot evaluate it either.
    """
    coco = coco if coco is not None else coco_index(coco_gt)
    cat_rank = {cid: r for r, cid in enumerate(sorted(coco.getCatIds()))}
    out: dict[int, ImageGT] = {}
    for image_id in image_ids:
        image_id = int(image_id)
        if image_id not in coco.imgs:
            raise SegdistError(f"image {image_id} is not in the ground truth; check --dataset")
        img = coco.imgs[image_id]
        anns = [a for a in coco.imgToAnns.get(image_id, []) if a["category_id"] in cat_rank]
        anns.sort(key=lambda a: cat_rank[a["category_id"]])  # stable: dataset order per category
        try:
            area = np.asarray([float(a["area"]) for a in anns], dtype=np.float64)
        except KeyError as exc:
            raise SegdistError(f"image {image_id}: an annotation has no 'area'; COCO ground "
                               "truth needs it (it decides small/medium/large)") from exc
        gt_boxes = np.zeros((len(anns), 4), dtype=np.float64)
        for k, a in enumerate(anns):
            if "bbox" in a:
                gt_boxes[k] = a["bbox"]
            elif boxes:
                raise SegdistError(f"image {image_id}: annotation {a.get('id')} has no 'bbox'; "
                                   "box AR needs one per annotation")
        rle_counts = None
        if segments:
            try:
                rles = [coco.annToRLE(a) for a in anns]
            except KeyError as exc:
                raise SegdistError(
                    f"image {image_id}: an annotation has no segmentation; mark the image "
                    f"'{HAS_SEGMENTS_KEY}': false to evaluate it for boxes only") from exc
            size = [int(img["height"]), int(img["width"])]
            for a, rle in zip(anns, rles):
                if [int(v) for v in rle["size"]] != size:
                    raise SegdistError(f"image {image_id}: annotation {a.get('id')} has a "
                                       f"{rle['size'][0]}x{rle['size'][1]} RLE but the image is "
                                       f"{size[0]}x{size[1]}; fix the ground truth")
            rle_counts = [c.encode("ascii") if isinstance(c, str) else bytes(c)
                          for c in (rle["counts"] for rle in rles)]
        out[image_id] = ImageGT(
            image_id=image_id,
            height=int(img["height"]),
            width=int(img["width"]),
            ids=np.asarray([int(a["id"]) for a in anns], dtype=np.int64),
            crowd=np.asarray([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool),
            area=area,
            boxes=gt_boxes,
            rle_counts=rle_counts,
        )
    return out
