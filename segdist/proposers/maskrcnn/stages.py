"""Mask R-CNN inference after the backbone for a batch of images: the network per image, the
post-processing between its modules for the whole batch.

torchvision's ``RegionProposalNetwork.filter_proposals`` and ``RoIHeads.postprocess_detections``
run per image, and their class- and level-wise NMS loops over the groups (a host sync per group on
a GPU); its ``MultiScaleRoIAlign`` finds each level's boxes with a ``where`` (a sync per level).
These stages compute the same numbers for all images of a batch at once:

- :func:`rpn_proposals`: the RPN's head, anchors and box decoding are torchvision's; the per-level
  top n, clipping, small-box and score filters and the level-wise NMS are batched
  (:func:`segdist.proposers.nms.grouped_nms`, exactly torchvision's CPU ``nms`` per level).
- :func:`detections`: the box head (torchvision's modules) on the pooled proposals, then the
  decoding, softmax, clipping, filters and class-wise NMS of ``postprocess_detections``, batched.
- :func:`mask_probabilities`: the mask head on the detections, each one's class channel.
- :func:`pool`: ``MultiScaleRoIAlign`` with the boxes sorted by level and split by counts the host
  already read with the NMS's answer, so pooling adds no sync.

An image's proposals do not depend on its batch-mates: the network's modules (backbone, RPN
head, box and mask heads) and every op that is not exact arithmetic (the box decoding's ``exp``,
the sigmoids, the pooler's ``log2`` for a box's level) run per image, because on the CPU a
convolution or matrix product picks its algorithm by batch size and a vectorised elementwise op
rounds the tail of its tensor (and of each thread's share) on another path; the rest of the
post-processing (filters, NMS, pooling) is exact arithmetic and runs for the batch. Images of a
batch have one size (torchvision pads a batch to its largest image).

Coordinates: boxes are (x1, y1, x2, y2) in the frame of the resized image the network saw
(``image_sizes``: (h, w) per image), as torchvision's inner stages use them. Boxes of a batch
travel as :class:`Boxes`: one tensor for all images, image-major, with per-image counts on the
host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from segdist.proposers.nms import grouped_nms


@dataclass
class Boxes:
    """Boxes of a batch: ``boxes`` [K, 4] image-major, ``counts`` per image (host), ``levels`` [K]
    (the pooler's level of each box), ``level_counts`` per level (host), optional ``scores`` [K]
    and ``labels`` [K]."""

    boxes: torch.Tensor
    counts: list[int]
    levels: torch.Tensor
    level_counts: list[int]
    scores: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def per_image(self) -> list[torch.Tensor]:
        return list(self.boxes.split(self.counts))

    def image_index(self) -> torch.Tensor:
        """[K]: the image of each box (from the host's counts: no sync)."""
        dev = self.boxes.device
        return torch.repeat_interleave(torch.arange(len(self.counts), device=dev),
                                       torch.tensor(self.counts, device=dev),
                                       output_size=len(self.boxes))


def _clip(boxes: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """torchvision's ``clip_boxes_to_image`` with a size per row: ``boxes`` [..., 4], ``sizes``
    [..., 2] (h, w), broadcast over the boxes' leading dimensions."""
    x = boxes[..., 0::2].clamp(min=0)
    y = boxes[..., 1::2].clamp(min=0)
    x = torch.minimum(x, sizes[..., 1:2].to(boxes.dtype))
    y = torch.minimum(y, sizes[..., 0:1].to(boxes.dtype))
    return torch.stack((x, y), dim=-1).reshape(boxes.shape)


def _not_small(boxes: torch.Tensor, min_size: float) -> torch.Tensor:
    """torchvision's ``remove_small_boxes`` as a mask."""
    return (((boxes[..., 2] - boxes[..., 0]) >= min_size)
            & ((boxes[..., 3] - boxes[..., 1]) >= min_size))


def _pooler_setup(pooler, feats: dict, image_sizes: Sequence[tuple[int, int]]) -> None:
    """Set up the pooler's scales and level mapper as torchvision does on its first call (with a
    host read, once; it keeps them)."""
    from torchvision.ops.poolers import _filter_input, _setup_scales

    if pooler.scales is None or pooler.map_levels is None:
        maps = _filter_input(feats, pooler.featmap_names)
        pooler.scales, pooler.map_levels = _setup_scales(
            maps, list(image_sizes), pooler.canonical_scale, pooler.canonical_level)


def _level_summary(pooler, boxes: torch.Tensor, slot: dict):
    """A ``grouped_nms`` summary: the pooler's level of every kept box (kept in ``slot``) and the
    number of kept boxes per level, read with the NMS's answer."""
    n_levels = len(pooler.scales)

    def summary(index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        picked = boxes.gather(1, index[..., None].expand(-1, -1, 4))
        # per image, as every non-exact op (the level takes a log2)
        levels = torch.stack([pooler.map_levels([p]) for p in picked])       # B x K
        slot["levels"] = levels
        binned = torch.where(mask, levels, n_levels).view(-1)
        return torch.zeros(n_levels + 1, dtype=torch.int64, device=boxes.device).scatter_add_(
            0, binned, torch.ones_like(binned))[:n_levels]
    return summary


def _slots(counts: list[int], width: int, device) -> torch.Tensor:
    """Flat positions ``b * width + j`` for ``j < counts[b]``, image-major: where each image's
    entries sit in a ``[B, width]`` layout (built on the host from the counts: no sync)."""
    flat = np.concatenate([b * width + np.arange(c) for b, c in enumerate(counts)] or
                          [np.zeros(0, np.int64)])
    return torch.from_numpy(flat).to(device)


def _kept_rows(index: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, column) of each image's first ``counts[b]`` entries of ``index`` [B, K]."""
    k = max(index.shape[1], 1)
    flat = _slots(counts, k, index.device)
    return flat // k, flat % k


def rpn_proposals(rpn: nn.Module, il, feats: dict, pooler=None, *, budget_bytes: int = 2 ** 30
                  ) -> Boxes:
    """torchvision's RPN at inference for a batch: its top proposals per image (by objectness
    probability, descending), their probabilities as ``scores``. With ``pooler``, ``levels`` are
    the pooler's levels of the proposals (else zeros)."""
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    fl = list(feats.values())
    anchors = rpn.anchor_generator(il, fl)
    b = len(anchors)
    objectness, proposals = [], []
    for i in range(b):  # the head and the box decoding per image (see the module docstring)
        obj, deltas = rpn.head([f[i:i + 1] for f in fl])
        per_level = [o[0].numel() for o in obj]
        obj, deltas = concat_box_prediction_layers(obj, deltas)
        objectness.append(obj.reshape(-1))
        proposals.append(rpn.box_coder.decode(deltas, [anchors[i]]).view(-1, 4))
    objectness, proposals = torch.stack(objectness), torch.stack(proposals)   # B x A (x 4)
    dev = objectness.device
    level_of = torch.cat([torch.full((n,), i, dtype=torch.int64, device=dev)
                          for i, n in enumerate(per_level)])
    top = rpn._get_top_n_idx(objectness, per_level)                           # B x P
    boxes = proposals.gather(1, top[..., None].expand(-1, -1, 4))
    prob = torch.stack([torch.sigmoid(o) for o in objectness.gather(1, top)])
    sizes = torch.tensor(il.image_sizes, device=dev)                          # B x (h, w)
    boxes = _clip(boxes, sizes[:, None])
    valid = _not_small(boxes, rpn.min_size) & (prob >= rpn.score_thresh)
    slot: dict = {}
    if pooler is not None:
        _pooler_setup(pooler, feats, il.image_sizes)
    kept = grouped_nms(boxes, prob, level_of[top], valid, rpn.nms_thresh, rpn.post_nms_top_n(),
                       group_size=rpn.pre_nms_top_n(), budget_bytes=budget_bytes,
                       summary=_level_summary(pooler, boxes, slot) if pooler else None)
    img, col = _kept_rows(kept.index, kept.counts)
    rows = kept.index[img, col]
    levels = slot["levels"][img, col] if pooler is not None else torch.zeros_like(rows)
    return Boxes(boxes[img, rows], kept.counts, levels, kept.summary.tolist(), prob[img, rows])


def pool(pooler, feats: dict, rois: Boxes) -> torch.Tensor:
    """torchvision's ``MultiScaleRoIAlign`` of ``rois`` (``[K, C, *output_size]``, image-major),
    each level's boxes found by a stable sort on the level and the host's level counts."""
    from torchvision.ops import roi_align

    from torchvision.ops.poolers import _filter_input

    maps = _filter_input(feats, pooler.featmap_names)
    dev = rois.boxes.device
    roi5 = torch.cat([rois.image_index()[:, None].to(rois.boxes.dtype), rois.boxes], 1)
    order = torch.sort(rois.levels, stable=True).indices
    parts = []
    for level, part in enumerate(order.split(rois.level_counts)):
        if len(part):
            parts.append(roi_align(maps[level], roi5[part], output_size=pooler.output_size,
                                   spatial_scale=pooler.scales[level],
                                   sampling_ratio=pooler.sampling_ratio))
    out = torch.zeros((len(rois.boxes), maps[0].shape[1], *pooler.output_size),
                      dtype=maps[0].dtype, device=dev)
    if parts:
        out[order] = torch.cat([p.to(out.dtype) for p in parts])
    return out


def detections(roi_heads: nn.Module, feats: dict, proposals: Boxes,
               image_sizes: Sequence[tuple[int, int]], *, budget_bytes: int = 2 ** 30) -> Boxes:
    """The box head and ``postprocess_detections`` for a batch: per image the top
    ``detections_per_img`` class boxes after the score and size filters and class-wise NMS, by
    score, descending (ties by proposal, then class); ``labels`` the classes (1..C-1), ``levels``
    the mask pooler's levels of the boxes."""
    head = roi_heads
    dev = proposals.boxes.device
    # the box head and the decoding per image (see the module docstring)
    outs = [head.box_predictor(head.box_head(x))
            for x in pool(head.box_roi_pool, feats, proposals).split(proposals.counts)]
    class_logits = torch.cat([c for c, _ in outs])                             # K x C
    pred_boxes = torch.cat([head.box_coder.decode(r, [p]) for (_, r), p in
                            zip(outs, proposals.per_image())])                 # K x C x 4
    pred_scores = torch.softmax(class_logits, -1)                              # K x C
    counts, b = proposals.counts, len(proposals.counts)
    sizes = torch.tensor(list(image_sizes), device=dev)
    pred_boxes = _clip(pred_boxes, sizes[proposals.image_index()][:, None])[:, 1:]  # no background
    pred_scores = pred_scores[:, 1:]
    c = pred_scores.shape[1]
    # the images' proposals side by side: B x R x (C-1), rows past an image's count are padding
    r = max(counts) if counts else 0
    slot_rows = _slots(counts, r, dev)
    boxes = pred_boxes.new_zeros((b * r, c, 4)).index_copy_(0, slot_rows, pred_boxes)
    scores = pred_scores.new_zeros((b * r, c)).index_copy_(0, slot_rows, pred_scores)
    present = torch.zeros(b * r, dtype=torch.bool, device=dev).index_fill_(0, slot_rows, True)
    boxes, scores = boxes.view(b, r * c, 4), scores.view(b, r * c)            # (proposal, class)
    valid = (present.view(b, r, 1).expand(b, r, c).reshape(b, r * c)
             & (scores > head.score_thresh) & _not_small(boxes, 1e-2))
    labels = torch.arange(1, c + 1, device=dev).repeat(r)[None].expand(b, -1)
    mask_pooler = head.mask_roi_pool if head.has_mask() else None
    slot: dict = {}
    if mask_pooler is not None:
        _pooler_setup(mask_pooler, feats, image_sizes)
    kept = grouped_nms(boxes, scores, labels, valid, head.nms_thresh, head.detections_per_img,
                       group_size=max(r, 1), prefix=4 * head.detections_per_img,
                       budget_bytes=budget_bytes,
                       summary=_level_summary(mask_pooler, boxes, slot) if mask_pooler else None)
    img, col = _kept_rows(kept.index, kept.counts)
    rows = kept.index[img, col]
    levels = slot["levels"][img, col] if mask_pooler is not None else torch.zeros_like(rows)
    return Boxes(boxes[img, rows], kept.counts, levels, kept.summary.tolist(), scores[img, rows],
                 labels[img, rows])


def mask_probabilities(roi_heads: nn.Module, feats: dict, dets: Boxes) -> torch.Tensor:
    """``[K, 28, 28]``: each detection's mask probabilities for its own class (torchvision's
    ``maskrcnn_inference``): the head and the sigmoid per image, over every class's logits
    before the class is picked, as torchvision does for a single image."""
    pooled = pool(roi_heads.mask_roi_pool, feats, dets).split(dets.counts)  # per image
    probs = torch.cat([roi_heads.mask_predictor(roi_heads.mask_head(x)).sigmoid()
                       for x in pooled])                                       # K x C x 28 x 28
    return probs[torch.arange(len(probs), device=probs.device), dets.labels]
