"""Square crops of an image (or mask) at any scale, resampled to a fixed size, padded outside.

This is the one geometric operation of the training sampler: "take the square window
[x0, x0 + side) x [y0, y0 + side) of the image, fill what lies outside the image with a constant,
resize it to out x out". Coordinates are pixel-edge coordinates: pixel (row i, column j) covers
[j, j + 1) x [i, i + 1), so the image spans [0, W) x [0, H).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def crop_resize(
    img: torch.Tensor, x0: float, y0: float, side: float, out: int, *, fill: float = 0.0,
    scale: float = 1.0,
) -> torch.Tensor:
    """Bilinear resample of a square window of ``img`` to ``out x out``.

    Args:
        img: Tensor[C, H, W] of any dtype (uint8 images, uint8 0/1 masks, floats). Only the part
            the window touches is converted to float32 (windows are often small parts of big images).
        x0, y0: top-left corner of the window in pixel-edge coordinates (may lie outside the image).
        side: window side in image pixels (> 0).
        out: output side in pixels.
        fill: value of the output where the window lies outside the image (after ``scale``).
        scale: factor applied to the converted pixels (1/255 turns uint8 images into [0, 1]).

    Returns:
        float32 Tensor[C, out, out]; output pixel (u, v) samples the image at
        (x0 + (v + 0.5) * side / out, y0 + (u + 0.5) * side / out). When the window is more than
        twice the output, the touched region is first average-pooled by the integer factor
        floor(side / out) so that the bilinear sampling does not alias.
    """
    c, h, w = img.shape
    k = side / out  # image pixels per output pixel
    f = int(k) if k >= 2 else 1
    # Touched region plus one pooled pixel of margin, so that no bilinear tap inside the window
    # falls outside the region (except at the true image border, where it blends with the fill).
    xa, xb = max(0, math.floor(x0) - f), min(w, math.ceil(x0 + side) + f)
    ya, yb = max(0, math.floor(y0) - f), min(h, math.ceil(y0 + side) + f)
    if xa >= xb or ya >= yb:
        return torch.full((c, out, out), float(fill), dtype=torch.float32)
    # Shift by the fill so that grid_sample's zero padding means "fill".
    region = img[:, ya:yb, xa:xb].to(torch.float32) * scale - fill  # C x h' x w'
    if f > 1:
        # ceil_mode keeps the partial last cell; it is averaged over its real pixels only.
        region = F.avg_pool2d(region[None], f, f, ceil_mode=True)[0]
    rh, rw = region.shape[1:]
    centres = (torch.arange(out, dtype=torch.float64) + 0.5) * k  # window coords of output centres
    gx = ((x0 + centres - xa) / f) * (2.0 / rw) - 1.0  # align_corners=False normalisation
    gy = ((y0 + centres - ya) / f) * (2.0 / rh) - 1.0
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1).to(torch.float32)
    res = F.grid_sample(region[None], grid[None], mode="bilinear", padding_mode="zeros",
                        align_corners=False)[0]
    return res + fill
