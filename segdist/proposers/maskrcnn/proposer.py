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

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from segdist.device import autocast
from segdist.errors import ConfigError
from segdist.proposals.types import ImageProposals
from segdist.proposers.interface import check_images
from segdist.proposers.maskrcnn.stages import Boxes, detections, mask_probabilities, rpn_proposals
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
        """Proposals per image, in input order (see :class:`segdist.proposers.Proposer`).

        Batches hold images of one size only: torchvision pads a batch to its largest image, and
        the padding reaches into every image's features, so an image's proposals would depend on
        its batch-mates. Of one size, each image's input is the same alone or batched."""
        check_images(images, image_ids)
        out: list[ImageProposals | None] = [None] * len(images)
        by_size = sorted(range(len(images)), key=lambda i: images[i].shape[:2])  # stable
        s = 0
        while s < len(by_size):
            shape = images[by_size[s]].shape[:2]
            same = [i for i in by_size[s:s + self.batch_size] if images[i].shape[:2] == shape]
            n = self._batch_len(len(same), *shape)
            idx = same[:n]
            batch = [torch.from_numpy(np.ascontiguousarray(images[i])).to(self._device)
                     .permute(2, 0, 1) for i in idx]                             # 3 x H x W each
            with autocast(self._device, self.precision):
                for i, p in zip(idx, self._batch(batch, [image_ids[i] for i in idx])):
                    out[i] = p
            s += n
        return out  # type: ignore[return-value]

    def _batch_len(self, n: int, h: int, w: int) -> int:
        """How many of ``n`` images of size ``h`` x ``w`` form the next batch: as many as the
        network's working set fits in half of the memory budget, at least one. The working set,
        ~1.5 KB per pixel of the resized batch tensor with 1000 detections per image, was
        measured on the CPU (a batch of 10 640x480 images resized to 800x1067 peaked at 19.5 GB
        of RSS)."""
        t = self.model.transform
        lo, hi = float(min(t.min_size)), float(t.max_size)
        scale = min(lo / min(h, w), hi / max(h, w))
        fits = int((self.budget // 2) // max(h * scale * w * scale * 1500, 1))
        return max(1, min(n, fits))

    def _batch(self, images: list[torch.Tensor], image_ids: Sequence[int]) -> list[ImageProposals]:
        """uint8 [3, H, W] RGB tensors on the model's device -> proposals per image. The network's
        modules are torchvision's; what runs between them per image in torchvision (proposal
        filtering, NMS, detection post-processing, pooling by level) runs for the batch at once
        (:mod:`.stages`: a fixed set of ops and one host read per NMS)."""
        model = self.model
        heads = model.roi_heads
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        nms_budget = self.budget // 4
        with torch.inference_mode():
            il, _ = model.transform([im.float() / 255.0 for im in images])
            # per image (see .stages), side by side again: N x C x H x W per level
            per_image = [model.backbone(il.tensors[i:i + 1]) for i in range(len(images))]
            feats = OrderedDict((k, torch.cat([f[k] for f in per_image])) for k in per_image[0])
            del per_image
            props = rpn_proposals(model.rpn, il, feats,
                                  None if self.mode == "rpn" else heads.box_roi_pool,
                                  budget_bytes=nms_budget)
            if self.mode == "rpn":
                return self._rpn(image_ids, props, il.image_sizes, sizes)
            dets = detections(heads, feats, props, il.image_sizes, budget_bytes=nms_budget)
            del props
            probs = mask_probabilities(heads, feats, dets)
            del feats
            return self._masks(image_ids, dets, probs, il.image_sizes, sizes)

    def _to_image_frame(self, found: Boxes, image_sizes, sizes) -> torch.Tensor:
        """``found``'s boxes [K, 4] (x1, y1, x2, y2) of the resized images back in each original
        image's pixels (torchvision's ``resize_boxes`` arithmetic: float32 original / resized
        size per axis)."""
        boxes, dev = found.boxes, found.boxes.device
        both = torch.tensor([[*hw, *rhw] for hw, rhw in zip(sizes, image_sizes)],
                            dtype=torch.float32, device=dev)           # B x (h, w, rh, rw)
        ratios = (both[:, :2] / both[:, 2:])[found.image_index()]  # K x (ry, rx)
        return torch.stack([boxes[:, 0] * ratios[:, 1], boxes[:, 1] * ratios[:, 0],
                            boxes[:, 2] * ratios[:, 1], boxes[:, 3] * ratios[:, 0]], 1)

    def _rpn(self, image_ids: Sequence[int], props: Boxes, image_sizes, sizes
             ) -> list[ImageProposals]:
        """RPN mode: each image's first k proposals (already by objectness, descending), boxes in
        the image's pixels; one device-to-host copy for the batch."""
        boxes = _xyxy_to_xywh(self._to_image_frame(props, image_sizes, sizes))
        host = torch.cat([props.scores.float()[:, None], boxes.float()], 1).cpu().numpy()
        out, start = [], 0
        for iid, (h, w), n in zip(image_ids, sizes, props.counts):
            k = min(n, self.k)
            out.append(ImageProposals(int(iid), h, w, host[start:start + k, 0].copy(),
                                      host[start:start + k, 1:].copy(), None, self.name))
            start += n
        return out

    def _masks(self, image_ids: Sequence[int], dets: Boxes, probs: torch.Tensor, image_sizes,
               sizes) -> list[ImageProposals]:
        """Masks of all images of a batch at once: boxes back to each image's frame, then
        paste-back and RLE of all masks together in slabs sized by the memory budget (a fixed
        number of ops and one sync per slab, none per image or mask; one device-to-host copy per
        batch). ``dets`` holds each image's top k by score, descending; ``probs`` [K, 28, 28]."""
        from segdist.proposals.rle import SlabEncoder

        dev = self._device
        keep_n = dets.counts
        boxes = self._to_image_frame(dets, image_sizes, sizes)
        hw = np.repeat(np.asarray(sizes, np.int64).reshape(-1, 2), keep_n, axis=0)
        heights = torch.from_numpy(hw[:, 0]).to(dev)
        widths = torch.from_numpy(hw[:, 1]).to(dev)
        encoder = SlabEncoder(dev)
        if len(boxes):
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
        extra = torch.cat([dets.scores.float(), dets.labels.float()]).contiguous().view(torch.uint8)
        counts, boxes_h, _, host = encoder.finish(extra)
        host = host.view(np.float32)
        n = len(boxes)
        sc, lb = host[:n], host[n:].astype(np.int32)
        out, start = [], 0
        for iid, (h, w), k in zip(image_ids, sizes, keep_n):
            out.append(ImageProposals(int(iid), h, w, sc[start:start + k], boxes_h[start:start + k],
                                      counts[start:start + k], self.name, lb[start:start + k]))
            start += k
        return out
