"""Mask R-CNN as a proposer: decoded images in, :class:`ImageProposals` out.

Two modes:
- ``masks``: the top detections across all classes (box score threshold 0, up to k per image),
  category-agnostic proposals whose predicted class is kept as ``labels``; the 28x28 mask
  probabilities are pasted at image resolution with torchvision's geometry
  (:func:`segdist.proposers.paste.paste_in_boxes`) and binarised at 0.5, in batches sized by a
  memory budget (torchvision's own postprocess would hold all k full-resolution float masks).
- ``rpn``: the region proposal network's proposals (boxes + objectness probability, no masks).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from segdist.device import autocast
from segdist.errors import ConfigError
from segdist.proposals.types import ImageProposals
from segdist.proposers.interface import check_images
from segdist.proposers.paste import paste_in_boxes


def _xyxy_to_xywh(b: torch.Tensor) -> torch.Tensor:
    return torch.cat([b[:, :2], b[:, 2:] - b[:, :2]], 1)


class MaskRCNNProposer:
    """Runs a torchvision Mask R-CNN (eval mode, on its device) for proposals (see the module
    docstring for the modes). ``model`` is the network (for inspection)."""

    def __init__(self, name: str, model: nn.Module, mode: str = "masks", *, proposals: int = 1000,
                 memory_budget_mb: int = 1024, batch_size: int = 1, precision: str = "fp32",
                 weights_sha256: str | None = None, mask_threshold: float = 0.5):
        if mode not in ("masks", "rpn"):
            raise ConfigError(f"Mask R-CNN mode must be 'masks' or 'rpn' (got {mode!r})")
        self.name, self.model, self.mode, self.k = name, model, mode, proposals
        self.budget = memory_budget_mb * 2 ** 20
        self.batch_size, self.precision = batch_size, precision
        self.weights_sha256 = weights_sha256
        self.mask_threshold = mask_threshold
        self._device = next(model.parameters()).device
        self.device = str(self._device)

    def __call__(self, images: Sequence[np.ndarray], image_ids: Sequence[int]) -> list[ImageProposals]:
        """Proposals per image, in input order (see :class:`segdist.proposers.Proposer`)."""
        check_images(images, image_ids)
        out: list[ImageProposals] = []
        for s in range(0, len(images), self.batch_size):
            batch = [torch.from_numpy(np.ascontiguousarray(im)).to(self._device).permute(2, 0, 1)
                     for im in images[s:s + self.batch_size]]                 # 3 x H x W each
            with autocast(self._device, self.precision):
                out.extend(self._batch(batch, image_ids[s:s + self.batch_size]))
        return out

    def _batch(self, images: list[torch.Tensor], image_ids: Sequence[int]) -> list[ImageProposals]:
        """uint8 [3, H, W] RGB tensors on the model's device -> proposals per image."""
        from torchvision.models.detection.transform import resize_boxes

        model = self.model
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        with torch.inference_mode():
            il, _ = model.transform([im.float() / 255.0 for im in images])
            feats = model.backbone(il.tensors)
            if self.mode == "rpn":
                boxes, scores = self._rpn(il, feats)
                out = []
                for iid, b, s, (h, w), isz in zip(image_ids, boxes, scores, sizes, il.image_sizes):
                    b = resize_boxes(b, isz, (h, w))
                    order = torch.sort(s, descending=True, stable=True).indices[: self.k]
                    out.append(ImageProposals(
                        int(iid), h, w, s[order].float().cpu().numpy(),
                        _xyxy_to_xywh(b[order]).float().cpu().numpy(), None, self.name))
                return out
            props, _ = model.rpn(il, feats)
            dets, _ = model.roi_heads(feats, props, il.image_sizes)
            return [self._masks(iid, d, isz, hw)
                    for iid, d, isz, hw in zip(image_ids, dets, il.image_sizes, sizes)]

    def _rpn(self, il, feats) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """RPN boxes and objectness probabilities (RegionProposalNetwork.forward drops scores)."""
        from torchvision.models.detection.rpn import concat_box_prediction_layers

        rpn = self.model.rpn
        fl = list(feats.values())
        objectness, deltas = rpn.head(fl)
        anchors = rpn.anchor_generator(il, fl)
        per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        return rpn.filter_proposals(proposals, objectness, il.image_sizes, per_level)

    def _masks(self, image_id: int, det: dict, image_size, hw: tuple[int, int]) -> ImageProposals:
        from segdist.proposals.rle import encode_masks
        from torchvision.models.detection.transform import resize_boxes

        h, w = hw
        boxes = resize_boxes(det["boxes"], image_size, hw)
        order = torch.sort(det["scores"], descending=True, stable=True).indices[: self.k]
        boxes, scores = boxes[order], det["scores"][order]
        labels, probs = det["labels"][order], det["masks"][order][:, 0]   # K x 28 x 28
        # canvas + RLE working set + the float window product, per mask
        chunk = max(1, int(self.budget // (21 * h * w))) if len(order) else 1
        counts: list[bytes] = []
        tight = []
        for s in range(0, len(order), chunk):
            masks = paste_in_boxes(probs[s:s + chunk], boxes[s:s + chunk], h, w, self.mask_threshold)
            c, bx, _ = encode_masks(masks)
            del masks
            counts.extend(c)
            tight.append(bx)
        return ImageProposals(
            int(image_id), h, w, scores.float().cpu().numpy(),
            np.concatenate(tight) if tight else np.zeros((0, 4), np.float32),
            counts, self.name, labels.to(torch.int32).cpu().numpy())
