"""Automatic mask generation with SAM / SAM 2 as a proposer: images in, ranked mask proposals out.

The semantics are the official generators' (``SamAutomaticMaskGenerator``,
``SAM2AutomaticMaskGenerator``), step for step, and the outputs are the same (tests/test_sam.py
runs both): for each crop of each image (``grid.crop_boxes``: the image, then the crop layers)
prompt the network with a grid of single points, each giving 3 masks (or 1) with a predicted IoU;
keep masks with predicted IoU > ``pred_iou_thresh`` and stability score >= ``stability_score_thresh``
(stability: IoU of the mask binarised at ``mask_threshold`` +- ``stability_score_offset``, on the
full-resolution logits); drop masks whose box touches a crop edge that is not an image edge (20 px);
box NMS within each crop (``box_nms_thresh``, by predicted IoU), then across crops
(``crop_nms_thresh``, smaller crops first); SAM: remove holes and islands under
``min_mask_region_area`` px and NMS again. Masks are binarised at ``mask_threshold``.

What segdist adds: proposals ranked by predicted IoU (descending, stable over the official
generator's order), at most ``proposals`` per image, scores = predicted IoU, boxes = the masks'
tight COCO boxes. Where it is faster (docs/benchmarks.md):
- a prompt's masks are upscaled and upsampled only when one of them passes the IoU filter (the
  official generator upsamples all of them to full resolution first);
- masks stay on the device through stability, binarisation and NMS, and are encoded to COCO RLE
  with their boxes in one pass per memory-budget chunk (``segdist.proposals.rle.encode_masks``:
  one device-to-host copy per chunk, not per mask); full-resolution masks never outlive their chunk.
Boxes in the NMS are the official ones: inclusive pixel bounds (x0, y0, x1, y1) of the mask, i.e.
the tight COCO box [x, y, w, h] as (x, y, x + w - 1, y + h - 1); the official generator's "bbox"
output is [x, y, w - 1, h - 1] in COCO terms, segdist's the tight [x, y, w, h].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from segdist.proposals.rle import encode_masks
from segdist.proposals.types import ImageProposals
from segdist.proposers.interface import check_images
from segdist.proposers.sam.grid import crop_boxes, layer_grids
from segdist.proposers.sam.runners import Decoded, Encoded, Sam2Runner, SamRunner

_EDGE_TOLERANCE = 20.0  # px: the official "near a crop edge" distance


@dataclass(frozen=True)
class GeneratorSettings:
    """The generator's parameters (see :class:`segdist.proposers.sam.SamConfig`); ``proposals``
    caps the output per image, ``memory_budget_mb`` sizes the full-resolution mask chunks."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    mask_threshold: float = 0.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0
    use_m2m: bool = False
    multimask_output: bool = True
    proposals: int = 1000
    memory_budget_mb: int = 1024

    @classmethod
    def from_config(cls, config: Any) -> "GeneratorSettings":
        """The settings of a validated SamConfig / Sam2Config."""
        return cls(**{f: getattr(config, f) for f in cls.__dataclass_fields__ if hasattr(config, f)})


@dataclass
class _Crop:
    """One crop of an image and its candidate masks, column-wise (tensors on the device), in the
    official order (prompt, then mask)."""

    box: tuple[int, int, int, int]              # x0, y0, x1, y1 (exclusive) in image px
    full: bool                                  # the crop is the whole image
    iou: list[torch.Tensor] = field(default_factory=list)      # float32 [k]
    boxes: list[torch.Tensor] = field(default_factory=list)    # int64 [k, 4] inclusive, image px
    tight: list[np.ndarray] = field(default_factory=list)      # float32 [k, 4] COCO xywh
    counts: list[bytes] = field(default_factory=list)


class SamProposer:
    """Automatic mask generation with an official SAM / SAM 2 network (see the module docstring).

    ``runner``: a :class:`~segdist.proposers.sam.runners.SamRunner` or ``Sam2Runner`` around the
    network; ``batch_size``: images per call the job sends (each image is generated alone).
    """

    def __init__(self, name: str, runner: SamRunner | Sam2Runner, settings: GeneratorSettings, *,
                 batch_size: int = 4, weights_sha256: str | None = None):
        self.name = name
        self.runner = runner
        self.settings = settings
        self.batch_size = batch_size
        self.weights_sha256 = weights_sha256
        self.device = str(runner.device)
        self._dev = runner.device
        s = settings
        self._grids = layer_grids(s.points_per_side, s.crop_n_layers, s.crop_n_points_downscale_factor)
        if s.min_mask_region_area > 0 and runner.generation == "sam":
            from segdist.proposers.sam.regions import require_opencv

            require_opencv(name)

    def __call__(self, images: Sequence[np.ndarray], image_ids: Sequence[int]) -> list[ImageProposals]:
        """Proposals per image, in input order (see :class:`segdist.proposers.Proposer`). Each
        image's proposals depend on that image alone (see ``runners``: batches never mix images)."""
        check_images(images, image_ids)
        return [self._image(im, iid) for im, iid in zip(images, image_ids)]

    def _image(self, image: np.ndarray, image_id: int) -> ImageProposals:
        """The proposals of one image: each crop encoded, its prompts decoded in batches of
        points_per_batch (as the official generators cut them), its masks filtered and encoded,
        NMS within the crop, then the merge of the crops."""
        st = self.settings
        h, w = image.shape[:2]
        crops = []
        for box, layer in crop_boxes(h, w, st.crop_n_layers, st.crop_overlap_ratio):
            x0, y0, x1, y1 = box
            points = self._grids[layer] * np.array([[x1 - x0, y1 - y0]])  # float64, crop px
            crop = _Crop(box, box == (0, 0, w, h))
            enc = self.runner.encode(np.ascontiguousarray(image[y0:y1, x0:x1]))
            coords = self.runner.prompts(enc, points)
            for s in range(0, len(points), st.points_per_batch):
                dec = self._decode(enc, coords[s:s + st.points_per_batch])
                self._add_masks(crop, enc, dec, image)
            del enc, coords
            self._finish_crop(crop)
            crops.append(crop)
        return self._finish_image(crops, image, image_id)

    # -- decoding -----------------------------------------------------------------------------------

    def _decode(self, enc: Encoded, coords: torch.Tensor) -> Decoded:
        """One batch of prompts: their masks above the IoU threshold (both passes with use_m2m)."""
        st, run = self.settings, self.runner
        if not st.use_m2m:
            return run.decode(enc, coords, iou_thresh=st.pred_iou_thresh,
                              multimask=st.multimask_output)
        # SAM 2's use_m2m: every mask of the first pass (no IoU filter) is decoded again with its
        # own clamped low-resolution logits as mask prompt, single-mask output, in batches of
        # points_per_batch; the IoU filter applies to the refined masks.
        # The result has one row per (point, mask) of the first pass, each with its single mask.
        first = run.decode(enc, coords, iou_thresh=None, multimask=st.multimask_output)
        m = first.iou.shape[1]
        low = first.low_res.clamp(-32.0, 32.0).flatten(0, 1)[:, None]     # B*M x 1 x 256 x 256
        again = coords.repeat_interleave(m, dim=0)
        n = st.points_per_batch
        parts = [run.decode(enc, again[s:s + n], iou_thresh=st.pred_iou_thresh, multimask=False,
                            mask_input=low[s:s + n]) for s in range(0, len(again), n)]
        return Decoded(torch.cat([p.iou for p in parts]), torch.cat([p.keep for p in parts]),
                       torch.cat([p.low_res for p in parts]))

    # -- masks of one crop -------------------------------------------------------------------------

    def _add_masks(self, crop: _Crop, enc: Encoded, dec: Decoded, image: np.ndarray) -> None:
        """Upsample the kept masks of a decoded batch, filter them by stability, binarise, encode
        and append them to ``crop``, in chunks of prompts sized by the memory budget."""
        st = self.settings
        h, w = image.shape[:2]
        x0, y0, x1, y1 = crop.box
        ch, cw = enc.hw
        low, kept = dec.low_res, dec.kept                                  # R x M x 256 x 256, R x M
        iou = dec.iou[dec.keep.any(1)]
        # per prompt, for each of its M masks: logits at crop size and at the model's 1024 x 1024
        # input (SAM's first interpolation), the binary mask in the image, the RLE working set
        per_prompt = low.shape[1] * (4 * ch * cw + 4 * 1024 * 1024 + 4 * h * w)
        chunk = max(1, int(st.memory_budget_mb * 2 ** 20 // per_prompt))
        for s in range(0, len(low), chunk):
            k = kept[s:s + chunk]
            logits = self.runner.upsample(low[s:s + chunk], enc)[k]       # K x ch x cw
            score = iou[s:s + chunk][k]
            if st.stability_score_thresh > 0:
                ok = stability_score(logits, st.mask_threshold,
                                     st.stability_score_offset) >= st.stability_score_thresh
                logits, score = logits[ok], score[ok]
            masks = logits > st.mask_threshold                               # k x ch x cw, bool
            del logits
            if not crop.full:                                               # into the image frame
                masks = F.pad(masks, (x0, w - x1, y0, h - y1), value=False)
            counts, tight, _ = encode_masks(masks)
            del masks
            boxes = inclusive_boxes(torch.as_tensor(tight, device=self._dev))  # image px
            if not crop.full:
                near = near_crop_edge(boxes, crop.box, (0, 0, w, h))
                if bool(near.any()):
                    far = (~near).cpu().numpy()
                    boxes, score, tight = boxes[~near], score[~near], tight[far]
                    counts = [c for c, f in zip(counts, far) if f]
            crop.iou.append(score)
            crop.boxes.append(boxes)
            crop.tight.append(tight)
            crop.counts.extend(counts)

    def _finish_crop(self, crop: _Crop) -> None:
        """Box NMS within the crop (by predicted IoU, official boxes in the crop's frame)."""
        from torchvision.ops import batched_nms

        if not crop.iou:
            return
        iou, boxes = torch.cat(crop.iou), torch.cat(crop.boxes)
        x0, y0 = crop.box[:2]
        in_crop = boxes - torch.tensor([[x0, y0, x0, y0]], device=boxes.device)
        keep = batched_nms(in_crop.float(), iou, torch.zeros_like(iou), self.settings.box_nms_thresh)
        k = keep.cpu().numpy()
        crop.iou, crop.boxes = [iou[keep]], [boxes[keep]]
        crop.tight = [np.concatenate(crop.tight)[k]]
        crop.counts = [crop.counts[i] for i in k]

    # -- one image ---------------------------------------------------------------------------------

    def _finish_image(self, crops: list[_Crop], image: np.ndarray, image_id: int) -> ImageProposals:
        """Merge an image's crops (NMS preferring smaller crops), remove small regions (SAM), rank
        by predicted IoU and keep the top ``proposals``."""
        from torchvision.ops import batched_nms
        from torchvision.ops.boxes import box_area

        st = self.settings
        h, w = image.shape[:2]
        with_masks = [c for c in crops if c.iou]
        if with_masks:
            iou = torch.cat([t for c in with_masks for t in c.iou])
            boxes = torch.cat([t for c in with_masks for t in c.boxes])
            tight = np.concatenate([t for c in with_masks for t in c.tight])
            counts = [x for c in with_masks for x in c.counts]
        else:
            iou = torch.zeros(0, device=self._dev)
            boxes = torch.zeros((0, 4), dtype=torch.long, device=self._dev)
            tight, counts = np.zeros((0, 4), np.float32), []
        crop_of = _crop_box_rows(with_masks, self._dev)
        for c in crops:
            c.iou, c.boxes, c.tight, c.counts = [], [], [], []
        if len(crops) > 1 and len(iou):
            keep = batched_nms(boxes.float(), 1 / box_area(crop_of), torch.zeros_like(iou),
                               st.crop_nms_thresh)
            iou, boxes = iou[keep], boxes[keep]
            k = keep.cpu().numpy()
            tight, counts = tight[k], [counts[i] for i in k]
        if st.min_mask_region_area > 0 and self.runner.generation == "sam" and len(iou):
            from segdist.proposers.sam.regions import remove_small_regions

            keep, counts, tight = remove_small_regions(
                counts, h, w, st.min_mask_region_area, max(st.box_nms_thresh, st.crop_nms_thresh))
            iou = iou[torch.as_tensor(keep, device=iou.device)]
        scores = iou.float().cpu().numpy()
        order = np.argsort(-scores, kind="stable")[:st.proposals]
        return ImageProposals(int(image_id), h, w, scores[order], tight[order],
                              [counts[i] for i in order], self.name)


def _crop_box_rows(crops: list[_Crop], device) -> torch.Tensor:
    """int64 [N, 4]: each candidate's crop box (x0, y0, x1, y1), in candidate order."""
    rows = [torch.tensor([list(c.box)], dtype=torch.long).expand(sum(len(t) for t in c.iou), 4)
            for c in crops]
    return torch.cat(rows).to(device) if rows else torch.zeros((0, 4), dtype=torch.long,
                                                               device=device)


def stability_score(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """float32 [K]: IoU of the masks ``logits > threshold + offset`` and ``> threshold - offset``
    (the first is inside the second), from float logits [K, H, W]; counted as the official
    generators do (int16 row sums, int32 totals), NaN for an empty union."""
    inter = (logits > threshold + offset).sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)
    union = (logits > threshold - offset).sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)
    return inter / union


def inclusive_boxes(tight: torch.Tensor) -> torch.Tensor:
    """COCO tight boxes [N, 4] (x, y, w, h) -> int64 inclusive pixel bounds (x0, y0, x1, y1), the
    official generators' boxes; [0, 0, 0, 0] for an empty mask (w = h = 0)."""
    t = tight.long()
    box = torch.stack([t[:, 0], t[:, 1], t[:, 0] + t[:, 2] - 1, t[:, 1] + t[:, 3] - 1], dim=1)
    return torch.where((t[:, 2:3] > 0), box, torch.zeros_like(box))


def near_crop_edge(boxes: torch.Tensor, crop: tuple[int, int, int, int],
                   image: tuple[int, int, int, int]) -> torch.Tensor:
    """bool [N]: a box (inclusive bounds, image px) lies within 20 px of an edge of the crop that
    is not within 20 px of the image's edge (the official is_box_near_crop_edge)."""
    b = boxes.float()
    c = torch.as_tensor(crop, dtype=torch.float, device=b.device)[None]
    o = torch.as_tensor(image, dtype=torch.float, device=b.device)[None]
    near_crop = torch.isclose(b, c, atol=_EDGE_TOLERANCE, rtol=0)
    near_image = torch.isclose(b, o, atol=_EDGE_TOLERANCE, rtol=0)
    return (near_crop & ~near_image).any(dim=1)
