"""Mask R-CNN as a proposer: decoded images in, :class:`ImageProposals` out.

Two modes:
- ``masks``: the top detections across all classes (box score threshold 0, up to k per image),
  category-agnostic proposals whose predicted class is kept as ``labels``; the 28x28 mask
  probabilities are pasted at image resolution with torchvision's geometry
  (:func:`segdist.proposers.paste.paste_geometry`, ``paste_batch``) and binarised at 0.5, all
  masks of a batch together in slabs sized by a
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
from segdist.proposers.paste import paste_batch, paste_geometry, slab_end


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
        s = 0
        while s < len(images):
            n = self._batch_len(images[s:s + self.batch_size])
            batch = [torch.from_numpy(np.ascontiguousarray(im)).to(self._device).permute(2, 0, 1)
                     for im in images[s:s + n]]                                # 3 x H x W each
            with autocast(self._device, self.precision):
                out.extend(self._batch(batch, image_ids[s:s + n]))
            s += n
        return out

    def _batch_len(self, images: Sequence[np.ndarray]) -> int:
        """How many of ``images`` (at most ``batch_size``) form the next batch: as many as the
        network's working set fits in half of the memory budget, at least one. The working set,
        ~1.5 KB per pixel of the padded, resized batch tensor with 1000 detections per image, was
        measured on the CPU (a batch of 10 640x480 images resized to 800x1067 peaked at 19.5 GB
        of RSS)."""
        t = self.model.transform
        lo, hi = float(min(t.min_size)), float(t.max_size)
        hmax = wmax = 0
        for n, im in enumerate(images):
            h, w = im.shape[:2]
            scale = min(lo / min(h, w), hi / max(h, w))
            hmax, wmax = max(hmax, h * scale), max(wmax, w * scale)
            if n and (n + 1) * hmax * wmax * 1500 > self.budget // 2:
                return n
        return max(1, len(images))

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
            del feats, props
            return self._masks(image_ids, dets, il.image_sizes, sizes)

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

    def _masks(self, image_ids: Sequence[int], dets: list[dict], image_sizes, sizes
               ) -> list[ImageProposals]:
        """Masks of all images of a batch at once: boxes back to each image's frame, each image's
        top k by score, then paste-back and RLE of all masks together in slabs sized by the
        memory budget (a fixed number of ops and one sync per slab, none per image or mask; one
        device-to-host copy per batch)."""
        from segdist.proposals.rle import SlabEncoder

        dev = self._device
        n_det = [len(d["scores"]) for d in dets]                       # host-known shapes
        b = len(dets)
        img = torch.repeat_interleave(torch.arange(b, device=dev),
                                      torch.tensor(n_det, device=dev), output_size=sum(n_det))
        # torchvision's resize_boxes arithmetic (float32 original / resized size per axis), for
        # all images at once
        both = torch.tensor([[*hw, *rhw] for hw, rhw in zip(sizes, image_sizes)],
                            dtype=torch.float32, device=dev)           # B x (h, w, rh, rw)
        ratios = (both[:, :2] / both[:, 2:])[img]                      # K x (ry, rx)
        boxes = torch.cat([d["boxes"] for d in dets])
        boxes = torch.stack([boxes[:, 0] * ratios[:, 1], boxes[:, 1] * ratios[:, 0],
                             boxes[:, 2] * ratios[:, 1], boxes[:, 3] * ratios[:, 0]], 1)
        scores = torch.cat([d["scores"] for d in dets])
        # each image's detections by score, descending (stable), then images in order
        order = torch.sort(scores, descending=True, stable=True).indices
        order = order[torch.sort(img[order], stable=True).indices]
        keep_n = [min(self.k, n) for n in n_det]
        if any(k < n for k, n in zip(keep_n, n_det)):
            starts = torch.tensor(np.cumsum([0] + n_det[:-1]), device=dev)
            rank = torch.arange(len(order), device=dev) - starts[img]
            order = order[rank < self.k]
        boxes, scores = boxes[order], scores[order]
        labels = torch.cat([d["labels"] for d in dets])[order]
        probs = torch.cat([d["masks"] for d in dets])[order][:, 0]     # K x 28 x 28
        hw = np.repeat(np.asarray(sizes, np.int64).reshape(-1, 2), keep_n, axis=0)
        heights = torch.from_numpy(hw[:, 0]).to(dev)
        widths = torch.from_numpy(hw[:, 1]).to(dev)
        encoder = SlabEncoder(dev)
        if len(order):
            padded, tops, lefts, wh, ww = paste_geometry(probs, boxes)
            s = 0
            while s < len(hw):
                e, hmax, wmax, mixed = slab_end(hw[:, 0], hw[:, 1], s, self.budget)
                masks = paste_batch(padded[s:e], tops[s:e], lefts[s:e], wh[s:e], ww[s:e],
                                    heights[s:e], widths[s:e], hmax, wmax, self.mask_threshold)
                encoder.add(masks, heights[s:e] if mixed else None, widths[s:e] if mixed else None)
                del masks
                s = e
        # scores and labels travel to the host in the RLE's one copy
        extra = torch.cat([scores.float(), labels.float()]).contiguous().view(torch.uint8)
        counts, boxes_h, _, host = encoder.finish(extra)
        host = host.view(np.float32)
        sc, lb = host[:len(order)], host[len(order):].astype(np.int32)
        out, start = [], 0
        for iid, (h, w), n in zip(image_ids, sizes, keep_n):
            out.append(ImageProposals(int(iid), h, w, sc[start:start + n], boxes_h[start:start + n],
                                      counts[start:start + n], self.name, lb[start:start + n]))
            start += n
        return out
