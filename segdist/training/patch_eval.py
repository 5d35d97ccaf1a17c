"""Per-patch evaluation (the original's evalPerPatch.lua) for model selection during training.

A fixed set of held-out jittered mask samples (the training sampler's rules, generated from a fixed
seed, so every evaluation sees the same patches); the model's mask logits are resized to g_sz
(:func:`resize_logits`, the original model's own upsampling layer), binarised at probability 0.5
(logit > 0) and compared with the +-1 labels. Reported: mean and median IoU, and the share of
patches with IoU >= 0.5 and >= 0.7. As an extra (the original's
in-training test had it too), the accuracy of the score head on as many held-out score samples.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from segdist.training.sampler import PatchSampler, loader_worker_init


@dataclass(frozen=True)
class PatchMetrics:
    """Per-patch results; shares and IoUs in [0, 1]."""

    patches: int
    mean_iou: float
    median_iou: float
    iou50: float  # share of patches with IoU >= 0.5
    iou70: float  # share of patches with IoU >= 0.7 (the original's model-selection criterion)
    score_accuracy: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def resize_logits(logits: torch.Tensor, size: int) -> torch.Tensor:
    """Mask logits Tensor[B, h, w] -> Tensor[B, size, size], as the original DeepMask's mask branch.

    DeepMask.lua ends its mask branch with nnx's ``SpatialReSamplingEx{owidth=gSz, oheight=gSz,
    mode='bilinear'}`` (56 -> 112): bilinear with aligned corners, output pixel (y, x) sampling the
    input at (y * (h-1)/(size-1), x * (w-1)/(size-1)), so the corner logits land exactly on the
    corner label pixels. The loss and the per-patch IoU compare these with the labels, so the
    convention is part of what a model learns. Same dtype and device; a no-op when the size
    already matches (SharpMask's 160x160 output at g_sz 160); ``size`` >= 2 otherwise.
    """
    if logits.shape[-1] == size and logits.shape[-2] == size:
        return logits
    return F.interpolate(logits[:, None], size=(size, size), mode="bilinear",
                         align_corners=True)[:, 0]


def patch_ious(mask_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """IoU per patch of the binarised prediction and the label.

    Args:
        mask_logits: float Tensor[B, h, w] (any h, w; resized to the label size bilinearly).
        labels: float Tensor[B, g, g] of +1 (object) / -1.
    Returns:
        float32 Tensor[B]; 1.0 where prediction and label are both empty.
    """
    pred = resize_logits(mask_logits.float(), labels.shape[-1]) > 0
    gt = labels > 0
    inter = (pred & gt).flatten(1).sum(1).float()
    union = (pred | gt).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


class _FixedPatches(torch.utils.data.Dataset):
    """Batch j of the fixed evaluation set: (inputs, labels, kind)."""

    def __init__(self, sampler: PatchSampler, n_mask: int, n_score: int, batch_size: int, seed: int):
        self.sampler, self.n_mask, self.n_score = sampler, n_mask, n_score
        self.bs, self.seed = batch_size, seed
        self.mask_batches = -(-n_mask // batch_size)
        self.score_batches = -(-n_score // batch_size)

    def __len__(self) -> int:
        return self.mask_batches + self.score_batches

    def __getitem__(self, j: int):
        if j < self.mask_batches:
            idx = range(j * self.bs, min(self.n_mask, (j + 1) * self.bs))
            pairs = [self.sampler.mask_sample(np.random.default_rng([self.seed, i])) for i in idx]
            return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]), "mask"
        j -= self.mask_batches
        idx = range(j * self.bs, min(self.n_score, (j + 1) * self.bs))
        inputs = torch.stack([self.sampler.score_sample(np.random.default_rng([self.seed, i, 2]),
                                                        i % 2 == 0) for i in idx])
        labels = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in idx])
        return inputs, labels, "score"


@torch.inference_mode()
def evaluate_patches(model: torch.nn.Module, sampler: PatchSampler, *, patches: int = 6400,
                     score_patches: int = 0, batch_size: int = 32, seed: int = 1,
                     device: torch.device | str = "cpu", loader_workers: int = 0) -> PatchMetrics:
    """evalPerPatch over ``patches`` fixed held-out mask samples (and ``score_patches`` score ones).

    ``model(x)`` takes float32[B, 3, w_sz, w_sz] and returns (mask_logits[B, h, w],
    score_logits[B]). The model is left in eval mode: the caller restores its training mode
    (SharpMask training keeps its DeepMask in eval mode, which a plain ``model.train()`` would undo).
    """
    model.eval()
    ious, correct = [], []
    data = _FixedPatches(sampler, patches, score_patches, batch_size, seed)
    loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False,
                                         num_workers=loader_workers,
                                         worker_init_fn=loader_worker_init)
    for inputs, labels, kind in loader:
        mask_logits, score_logits = model(inputs.to(device))
        if kind == "mask":
            ious.append(patch_ious(mask_logits.cpu(), labels))
        else:
            correct.append(((score_logits.float().cpu() > 0) == (labels > 0)).float())
    iou = torch.cat(ious) if ious else torch.zeros(0)
    return PatchMetrics(
        patches=int(iou.numel()),
        mean_iou=float(iou.mean()) if iou.numel() else 0.0,
        median_iou=float(np.median(iou.numpy())) if iou.numel() else 0.0,
        iou50=float((iou >= 0.5).float().mean()) if iou.numel() else 0.0,
        iou70=float((iou >= 0.7).float().mean()) if iou.numel() else 0.0,
        score_accuracy=float(torch.cat(correct).mean()) if correct else None,
    )
