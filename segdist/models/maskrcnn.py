"""Mask R-CNN proposals from torchvision (maskrcnn_resnet50_fpn and _v2).

Two modes:
- ``masks``: the top detections across all classes (box score threshold 0, up to k per image),
  category-agnostic proposals whose predicted class is kept as ``labels``; the 28x28 mask
  probabilities are pasted at image resolution with torchvision's geometry (box expanded by one
  mask cell, rounded to pixels, bilinear resize) and binarised at 0.5, in batches sized by a
  memory budget (torchvision's own postprocess would hold all k full-resolution float masks).
- ``rpn``: the region proposal network's proposals (boxes + objectness probability, no masks).

Weights: None = random (seeded); "DEFAULT" or a member name of the torchvision weights enum (the
torch.hub cache is used; offline without a cached copy a clear error says how to pass a file);
or the URI of a state-dict file (torch.save loaded with weights_only=True, or safetensors).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from segdist.errors import ConfigError
from segdist.models.inference import paste_masks

VERSIONS = ("v1", "v2")


@dataclass(frozen=True)
class DetectorProposals:
    """Proposals of one image: scores float32[N] desc, boxes float32[N, 4] COCO xywh, counts
    (compressed RLE bytes, or None in rpn mode), labels int32[N] (None in rpn mode)."""

    height: int
    width: int
    scores: np.ndarray
    boxes: np.ndarray
    counts: list[bytes] | None
    labels: np.ndarray | None


def _builder_and_enum(version: str):
    from torchvision.models.detection import mask_rcnn

    if version == "v1":
        return mask_rcnn.maskrcnn_resnet50_fpn, mask_rcnn.MaskRCNN_ResNet50_FPN_Weights
    if version == "v2":
        return mask_rcnn.maskrcnn_resnet50_fpn_v2, mask_rcnn.MaskRCNN_ResNet50_FPN_V2_Weights
    raise ConfigError(f"Mask R-CNN version must be one of {VERSIONS} (got {version!r})")


def build_maskrcnn(version: str = "v1", weights: str | None = None, *, proposals: int = 1000,
                   storage_options: Mapping[str, Any] | None = None, seed: int = 0,
                   **kwargs: Any) -> tuple[nn.Module, str | None]:
    """A torchvision Mask R-CNN in eval mode set up for proposals; returns (model, weights sha256).

    Args:
        version: "v1" (maskrcnn_resnet50_fpn) or "v2" (maskrcnn_resnet50_fpn_v2).
        weights: None (random, seeded by ``seed``, sha256 None), "DEFAULT"/an enum member name, or
            a state-dict file URI.
        proposals: detections per image (and RPN proposals kept at test time, at least 1000).
        kwargs: passed to the torchvision builder (e.g. ``min_size``/``max_size``: the resolution
            the model runs at).
    """
    builder, enum_cls = _builder_and_enum(version)
    opts = dict(num_classes=91, box_score_thresh=0.0, box_detections_per_img=proposals,
                rpn_post_nms_top_n_test=max(1000, proposals))
    opts.update(kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builder(weights=None, weights_backbone=None, **opts)
    digest = None
    if weights is not None:
        from segdist.models.weights import enum_state_dict, read_state_dict

        if "/" not in weights and "." not in weights:
            try:
                member = enum_cls[weights]
            except KeyError:
                names = [m.name for m in enum_cls] + ["DEFAULT"]
                raise ConfigError(f"unknown {enum_cls.__name__} member {weights!r}; use one of "
                                  f"{names} or the URI of a weights file") from None
            state, digest = enum_state_dict(member)
        else:
            state, digest = read_state_dict(weights, storage_options)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ConfigError(f"weights {weights} do not fit maskrcnn_resnet50_fpn"
                              f"{'_v2' if version == 'v2' else ''} with 91 classes: "
                              f"{str(exc).splitlines()[0][:300]}") from None
    return model.eval(), digest


def _xyxy_to_xywh(b: torch.Tensor) -> torch.Tensor:
    return torch.cat([b[:, :2], b[:, 2:] - b[:, :2]], 1)


def _expanded_int_boxes(boxes: torch.Tensor, m: int) -> torch.Tensor:
    """torchvision's paste geometry: boxes grown by one mask cell per side, truncated to int."""
    scale = (m + 2) / m
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    return torch.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], 1).long()


def paste_detector_masks(probs: torch.Tensor, boxes: torch.Tensor, height: int, width: int,
                         threshold: float = 0.5) -> torch.Tensor:
    """Mask R-CNN mask probabilities [K, M, M] in boxes xyxy [K, 4] (image px) -> bool [K, H, W].

    Same geometry as torchvision's ``paste_masks_in_image`` (mask padded by one zero cell, box
    expanded to match, rounded to integer pixels, bilinear resize), all K masks at once.
    """
    m = probs.shape[-1]
    padded = torch.nn.functional.pad(probs.float(), (1, 1, 1, 1))   # K x (M+2) x (M+2)
    ib = _expanded_int_boxes(boxes, m)
    w = (ib[:, 2] - ib[:, 0] + 1).clamp(min=1).double()
    h = (ib[:, 3] - ib[:, 1] + 1).clamp(min=1).double()
    return paste_masks(padded, ib[:, 1].double(), ib[:, 0].double(), h, w, height, width, threshold)


class MaskRCNNProposer:
    """Runs a torchvision Mask R-CNN for proposals (see the module docstring for the modes)."""

    def __init__(self, model: nn.Module, mode: str = "masks", proposals: int = 1000,
                 memory_budget_mb: int = 1024, mask_threshold: float = 0.5):
        if mode not in ("masks", "rpn"):
            raise ConfigError(f"Mask R-CNN mode must be 'masks' or 'rpn' (got {mode!r})")
        self.model, self.mode, self.k = model, mode, proposals
        self.budget = memory_budget_mb * 2 ** 20
        self.mask_threshold = mask_threshold

    def __call__(self, images: Sequence[torch.Tensor]) -> list[DetectorProposals]:
        """images: uint8 [3, H, W] RGB tensors on the model's device -> proposals per image."""
        from torchvision.models.detection.transform import resize_boxes

        model = self.model
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        with torch.inference_mode():
            il, _ = model.transform([im.float() / 255.0 for im in images])
            feats = model.backbone(il.tensors)
            if self.mode == "rpn":
                boxes, scores = self._rpn(il, feats)
                out = []
                for b, s, (h, w), isz in zip(boxes, scores, sizes, il.image_sizes):
                    b = resize_boxes(b, isz, (h, w))
                    order = torch.sort(s, descending=True, stable=True).indices[: self.k]
                    out.append(DetectorProposals(
                        h, w, s[order].float().cpu().numpy(),
                        _xyxy_to_xywh(b[order]).float().cpu().numpy(), None, None))
                return out
            props, _ = model.rpn(il, feats)
            dets, _ = model.roi_heads(feats, props, il.image_sizes)
            return [self._masks(d, isz, hw) for d, isz, hw in zip(dets, il.image_sizes, sizes)]

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

    def _masks(self, det: dict, image_size, hw: tuple[int, int]) -> DetectorProposals:
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
            masks = paste_detector_masks(probs[s:s + chunk], boxes[s:s + chunk], h, w,
                                         self.mask_threshold)
            c, bx, _ = encode_masks(masks)
            del masks
            counts.extend(c)
            tight.append(bx)
        return DetectorProposals(
            h, w, scores.float().cpu().numpy(),
            np.concatenate(tight) if tight else np.zeros((0, 4), np.float32),
            counts, labels.to(torch.int32).cpu().numpy())
