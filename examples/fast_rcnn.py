"""Example: the consumption path end to end, a small Fast R-CNN box head trained on precomputed
proposals.

    segdist sample-data --out /tmp/sample --images 32
    segdist generate configs/<your run>.yaml          # proposals under OUT
    python examples/fast_rcnn.py --proposals OUT \
        --annotations /tmp/sample/annotations/instances_all.json --images /tmp/sample/images

Fast R-CNN is Faster R-CNN without the RPN: region proposals come from elsewhere. Here they come
from a segdist run through :class:`~segdist.export.loader.ProposalDataset`, and torchvision's
``RoIHeads`` (RoIAlign, a two-layer MLP head, class scores and box regression) trains on them. The
backbone is a tiny randomly initialised CNN so the example runs in seconds on a CPU; a real
detector would put a pretrained ResNet-FPN there, nothing else changes.

Prints the loss of every iteration and, at the end, the first and last five averaged. The
repository root is put on sys.path so that ``segdist`` imports without installation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead  # noqa: E402
from torchvision.models.detection.roi_heads import RoIHeads  # noqa: E402
from torchvision.ops import MultiScaleRoIAlign  # noqa: E402

from segdist.data.records import Dataset  # noqa: E402
from segdist.errors import SegdistError  # noqa: E402
from segdist.export.loader import ProposalDataset, collate  # noqa: E402

log = logging.getLogger(__name__)


class TinyFastRCNN(nn.Module):
    """A stride-4 CNN backbone plus torchvision ``RoIHeads`` fed with external proposals.

    Args:
        num_classes: object classes (background is added as class 0).
        channels: backbone width.
    """

    def __init__(self, num_classes: int, channels: int = 32):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, channels, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
        )
        resolution = 7
        self.roi_heads = RoIHeads(
            box_roi_pool=MultiScaleRoIAlign(["0"], output_size=resolution, sampling_ratio=2),
            box_head=TwoMLPHead(channels * resolution * resolution, 128),
            box_predictor=FastRCNNPredictor(128, num_classes + 1),
            fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=64, positive_fraction=0.25,
            bbox_reg_weights=None, score_thresh=0.05, nms_thresh=0.5, detections_per_img=100,
        )
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, images: Sequence[torch.Tensor], proposals: Sequence[torch.Tensor],
                targets: Sequence[dict[str, torch.Tensor]] | None = None):
        """Losses (training, with targets) or detections (eval).

        Args:
            images: uint8 Tensor[3, H_i, W_i] RGB each (sizes may differ; zero-padded to a batch).
            proposals: float32 Tensor[K_i, 4] xyxy pixels per image.
            targets: per image ``{"boxes": float32[M, 4] xyxy, "labels": int64[M] in 1..C}``.
        """
        sizes = [(int(im.shape[1]), int(im.shape[2])) for im in images]
        h = max(s[0] for s in sizes)
        w = max(s[1] for s in sizes)
        batch = images[0].new_zeros((len(images), 3, h, w), dtype=torch.float32)  # B x 3 x H x W
        for i, im in enumerate(images):
            batch[i, :, : im.shape[1], : im.shape[2]] = im.float() / 255
        batch = (batch - self.mean) / self.std
        features = {"0": self.backbone(batch)}  # B x C x H/4 x W/4
        detections, losses = self.roi_heads(features, list(proposals), sizes,
                                            None if targets is None else list(targets))
        return losses if self.training else detections


@dataclass
class TrainResult:
    losses: list[float]
    model: TinyFastRCNN
    category_ids: list[int]


def train_fast_rcnn(proposals_uri: str, dataset: Dataset, *, iterations: int = 30,
                    batch_size: int = 2, lr: float = 0.02, top_k: int = 300, seed: int = 0,
                    num_workers: int = 0, storage_options=None) -> TrainResult:
    """Train :class:`TinyFastRCNN` on ``dataset`` with the proposals at ``proposals_uri``.

    GT: non-crowd annotations, COCO category ids mapped to 1..C in sorted order. Images without
    non-crowd GT are skipped. Returns the loss (classifier + box regression) of every iteration.
    """
    torch.manual_seed(seed)
    data = ProposalDataset(proposals_uri, dataset, top_k=top_k, load_images=True,
                           storage_options=storage_options)
    category_ids = sorted(c["id"] for c in dataset.coco_gt.get("categories", []))
    if not category_ids:
        raise SegdistError(f"dataset {dataset.name!r} has no categories to train a detector on")
    contiguous = {c: k + 1 for k, c in enumerate(category_ids)}
    model = TinyFastRCNN(len(category_ids))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=True, collate_fn=collate, num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed), drop_last=False)
    losses: list[float] = []
    while len(losses) < iterations:
        for samples in loader:
            images, props, targets = [], [], []
            for s in samples:
                keep = ~s["gt"]["iscrowd"]
                if not keep.any():
                    continue
                images.append(s["image"])
                props.append(s["proposals"]["boxes"])
                labels = torch.as_tensor([contiguous[int(c)] for c in s["gt"]["labels"][keep]],
                                         dtype=torch.int64)
                targets.append({"boxes": s["gt"]["boxes"][keep], "labels": labels})
            if not images:
                continue
            loss_dict = model(images, props, targets)
            loss = sum(loss_dict.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            log.info("iteration %d: loss %.4f (%s)", len(losses), losses[-1],
                     ", ".join(f"{k} {v.item():.4f}" for k, v in loss_dict.items()))
            if len(losses) >= iterations:
                break
        else:
            if not losses:
                raise SegdistError("no image with non-crowd ground truth to train on")
    return TrainResult(losses, model, category_ids)


def main(argv=None) -> int:
    from segdist.data.coco import load_coco

    parser = argparse.ArgumentParser(description="train a small Fast R-CNN box head on proposals")
    parser.add_argument("--proposals", required=True, help="proposals URI (a segdist output)")
    parser.add_argument("--annotations", required=True, help="COCO instances JSON URI")
    parser.add_argument("--images", required=True, help="image folder URI")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=300)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dataset = load_coco(args.annotations, args.images)
    result = train_fast_rcnn(args.proposals, dataset, iterations=args.iterations,
                             batch_size=args.batch_size, top_k=args.top_k,
                             num_workers=args.workers)
    n = min(5, len(result.losses))
    print(json.dumps({"iterations": len(result.losses),
                      "first_loss": sum(result.losses[:n]) / n,
                      "last_loss": sum(result.losses[-n:]) / n}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
