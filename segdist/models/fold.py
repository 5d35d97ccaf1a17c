"""Inference-only: BatchNorm folded into the convolution before it.

In eval mode a BatchNorm (or the original's fixed affine, :class:`~segdist.models.layers.
FrozenAffine`, or torchvision's ``FrozenBatchNorm2d``) after a convolution is a per-channel affine
``y = a * x + b``; folding it into the convolution (``W' = a * W``, ``bias' = a * bias + b``) gives
the same function with one kernel instead of two (three to six for FrozenBatchNorm2d), within
float32 rounding. The model is changed in place; call it once, at load, on a model that will only
run inference.
"""

from __future__ import annotations

import torch
from torch import nn

from segdist.models.layers import FrozenAffine

# (convolution, norm) attribute pairs of the residual blocks and stems segdist and torchvision use
PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"), ("conv1", "aff1"),
         ("conv2", "aff2"), ("conv3", "aff3"), ("shortcut", "shortcut_aff"))


def _affine(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(a, b) float64 [C] with norm(x) = a * x + b per channel, or None when ``norm`` is not a
    foldable per-channel affine (a BatchNorm in training mode, say)."""
    if isinstance(norm, FrozenAffine):
        return norm.a.double(), norm.b.double()
    if isinstance(norm, nn.modules.batchnorm._BatchNorm) and not norm.training \
            and norm.track_running_stats and norm.running_var is not None:
        a = torch.rsqrt(norm.running_var.double() + norm.eps)
        if norm.affine:
            a = a * norm.weight.double()
        b = -norm.running_mean.double() * a
        return a, (b + norm.bias.double()) if norm.affine else b
    if type(norm).__name__ == "FrozenBatchNorm2d":  # torchvision.ops.misc (Mask R-CNN backbones)
        a = norm.weight.double() * torch.rsqrt(norm.running_var.double() + norm.eps)
        return a, norm.bias.double() - norm.running_mean.double() * a
    return None


def _fold_into(conv: nn.Conv2d, a: torch.Tensor, b: torch.Tensor) -> None:
    w = conv.weight
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(a)
    with torch.no_grad():
        conv.weight.copy_((w.double() * a.view(-1, 1, 1, 1)).to(w.dtype))
        new_bias = (bias * a + b).to(w.dtype)
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias, requires_grad=False)
        else:
            conv.bias.copy_(new_bias)


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every norm that directly follows a convolution (the :data:`PAIRS` of a block, a
    ``downsample`` Sequential(conv, norm)) into it; the norm becomes an ``nn.Identity``.

    Args:
        model: any module tree in eval mode (segdist's trunks, torchvision's ResNets).
    Returns:
        the number of norms folded.
    """
    folded = 0
    for module in list(model.modules()):
        pairs = [(c, n) for c, n in PAIRS if isinstance(getattr(module, c, None), nn.Conv2d)
                 and getattr(module, n, None) is not None]
        for conv_name, norm_name in pairs:
            ab = _affine(getattr(module, norm_name))
            if ab is not None and getattr(module, conv_name).groups == 1:
                _fold_into(getattr(module, conv_name), *ab)
                setattr(module, norm_name, nn.Identity())
                folded += 1
        if isinstance(module, nn.Sequential) and len(module) == 2 \
                and isinstance(module[0], nn.Conv2d):
            ab = _affine(module[1])
            if ab is not None:
                _fold_into(module[0], *ab)
                module[1] = nn.Identity()
                folded += 1
    return folded
