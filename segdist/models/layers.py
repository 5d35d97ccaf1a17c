"""Small layers of the original DeepMask/SharpMask: symmetric padding and the folded BatchNorm.

The original wraps every 3x3 and 7x7 convolution as ``Sequential{SpatialSymmetricPadding, conv}``
with the convolution's own zero padding removed (``updatePadding`` in modelUtils.lua), and replaces
every BatchNorm by a fixed per-channel affine ``y = a*x + b`` (``SpatialConstDiagonal``).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@functools.lru_cache(maxsize=256)
def _symmetric_index(n: int, before: int, after: int, device: torch.device) -> torch.Tensor:
    """Source indices for numpy's 'symmetric' padding of a length-``n`` axis (edge included).

    numpy repeats the mirror with period 2n, so pads wider than the axis are defined too:
    for ``n = 3`` and pad 4 on the left the indices are ``[0, 2, 1, 0 | 0, 1, 2]``. Computed on
    the host and cached per (size, pads, device): a pyramid pads the same few sizes over and over,
    and on a GPU each fresh index would cost kernels and a copy.
    """
    i = np.remainder(np.arange(-before, n + after), 2 * n)
    with torch.inference_mode(False):  # a cached inference tensor could not serve training
        return torch.from_numpy(np.where(i >= n, 2 * n - 1 - i, i)).to(device)


def symmetric_pad(x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    """Pad the last two dims of ``x`` [..., H, W] like ``np.pad(mode='symmetric')``.

    Args:
        x: tensor whose last two dims are (H, W); any dtype and device.
        pad: (left, right, top, bottom), as ``F.pad`` orders them.
    Returns:
        tensor [..., top+H+bottom, left+W+right]; ``cba|abcd|dcb`` (the edge pixel is repeated,
        unlike PyTorch's 'reflect', which gives ``dcb|abcd|cba``).
    """
    left, right, top, bottom = pad
    h, w = x.shape[-2], x.shape[-1]
    if left == right == top == bottom == 1:
        # For a 1-pixel pad the mirror including the edge is the edge itself: replicate is the
        # same thing and is one fused kernel instead of two gathers.
        return F.pad(x, pad, mode="replicate")
    if left or right:
        x = x.index_select(-1, _symmetric_index(w, left, right, x.device))
    if top or bottom:
        x = x.index_select(-2, _symmetric_index(h, top, bottom, x.device))
    return x


class SymmetricPad2d(nn.Module):
    """``nn.SpatialSymmetricPadding`` of the original: mirror padding that includes the edge pixel.

    Input [B, C, H, W] -> output [B, C, H+top+bottom, W+left+right], same dtype/device.
    """

    def __init__(self, pad: int | tuple[int, int, int, int]):
        super().__init__()
        self.pad = (pad,) * 4 if isinstance(pad, int) else tuple(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return symmetric_pad(x, self.pad)

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class SymPadConv2d(nn.Conv2d):
    """A convolution with zero built-in padding preceded by symmetric padding of ``sym_pad`` px.

    A subclass of ``nn.Conv2d`` (not a Sequential) so that parameter names stay ``<name>.weight``
    and torchvision ResNet state_dicts load unchanged. ``padding`` is always 0; the spatial output
    size equals a zero-padded conv with ``padding=sym_pad``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 sym_pad: int = 0, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, bias=bias)
        self.sym_pad = sym_pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sym_pad:
            x = symmetric_pad(x, (self.sym_pad,) * 4)
        return super().forward(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", sym_pad={self.sym_pad}"


class FrozenAffine(nn.Module):
    """Per-channel ``y = a * x + b`` with fixed ``a``, ``b`` (a BatchNorm folded at export time).

    ``a`` and ``b`` are buffers of shape [C] (not parameters: the original's SpatialConstDiagonal
    is not trained and has no ``weight``/``bias``). Input/output [B, C, H, W].
    """

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("a", torch.ones(channels))
        self.register_buffer("b", torch.zeros(channels))

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> "FrozenAffine":
        """The affine that equals ``bn`` in eval mode: a = w / sqrt(var + eps), b = bias - mean * a."""
        out = cls(bn.num_features)
        with torch.no_grad():
            a = torch.rsqrt(bn.running_var + bn.eps)
            if bn.affine:
                a = a * bn.weight
            b = -bn.running_mean * a
            if bn.affine:
                b = b + bn.bias
            out.a.copy_(a)
            out.b.copy_(b)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(self.b.view(shape).to(x.dtype), x, self.a.view(shape).to(x.dtype))

    def extra_repr(self) -> str:
        return f"channels={self.a.numel()}"
