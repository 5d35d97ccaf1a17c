"""The dense proposer's pyramid: levels of an image, their padded and normalised windows, and
the tiles a level is run in (InferDeepMask.lua's pyramid, with bounded memory).

Each level is the image resampled to round(s*H) x round(s*W) (s: the pyramid scale times the
``max_image_side`` factor) as the original's pyramid does it (nnx's SpatialReSamplingEx, bilinear
with aligned corners, for shrinking and enlarging alike), padded by i_sz/2 = 80 px of value 0.5 on every side and
normalised with the ImageNet mean/std. A level whose padded size exceeds the trunk's share of the
memory budget runs in tiles aligned to stride 16, each read with a halo of the network's receptive
radius, so that tiled results equal untiled ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from segdist.proposers.dense.settings import InferenceSettings

STRIDE = 16
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PAD_VALUE = 0.5


@dataclass(frozen=True)
class Level:
    """One pyramid level of an image.

    index: position in the settings' scale list. scale: nominal factor (pyramid scale times the
    max_image_side factor). height/width: the resampled image's size. ry/rx: original pixels per
    level pixel (H / height, W / width).
    """

    index: int
    scale: float
    height: int
    width: int
    ry: float
    rx: float


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def pyramid_levels(height: int, width: int, settings: InferenceSettings) -> list[Level]:
    """The levels of an H x W image (levels that would be empty are skipped)."""
    f = 1.0
    if settings.max_image_side and max(height, width) > settings.max_image_side:
        f = settings.max_image_side / max(height, width)
    hb, wb = max(1, _round_half_up(height * f)), max(1, _round_half_up(width * f))
    levels = []
    for i, s in enumerate(settings.scales):
        hs, ws = _round_half_up(s * hb), _round_half_up(s * wb)
        if hs >= 1 and ws >= 1:
            levels.append(Level(i, s * f, hs, ws, height / hs, width / ws))
    return levels


# -------------------------------------------------------------------------------------------------
# Level images, resampled window by window as nnx's SpatialReSamplingEx (mode='bilinear') does


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1] as Torch7's image.load makes them (times float32(1/255))."""
    return images.float() * (1 / 255)


def _axis_table(n_in: int, n_out: int, start: int, stop: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Neighbours and weights along one axis for output pixels [start, stop) of n_in -> n_out.

    SpatialReSamplingEx's bilinear rule, in its float32 arithmetic: aligned corners, position
    p = ratio * i with ratio = float(n_in - 1) / (n_out - 1); neighbours floor(p) and floor(p) + 1
    (clamped to the last pixel); weights (floor(p) + 1 - p) and (p - floor(p)). For n_out = 1 the
    C code divides by zero (ratio inf, position NaN); we take ratio 0: the one output pixel is
    the first input pixel.
    Returns (i0, i1) int64 and (w0, w1) float32, each [stop - start].
    """
    ratio = np.float32(0) if n_out == 1 else np.float32(n_in - 1) / np.float32(n_out - 1)
    pos = ratio * np.arange(start, stop, dtype=np.float32)            # float32 products
    i0 = np.floor(pos).astype(np.int64)
    w1 = pos - i0.astype(np.float32)
    w0 = (i0 + 1).astype(np.float32) - pos
    return i0, np.minimum(i0 + 1, n_in - 1), w0, w1


def normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) float32 [1, 3, 1, 1] on ``device`` (make once, pass to every level)."""
    ms = torch.tensor([MEAN, STD]).to(device)
    return ms[0].view(1, 3, 1, 1), ms[1].view(1, 3, 1, 1)


def level_window(images: torch.Tensor, level: Level, pad: int,
                 y0: int, y1: int, x0: int, x1: int,
                 norm: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Rows [y0, y1) x cols [x0, x1) of the padded, normalised level image.

    The level image is the original's: the image in [0, 1] (uint8 times float32(1/255), as
    Torch7's image.load) resampled by SpatialReSamplingEx bilinear (see :func:`_axis_table`; the
    four neighbours weighted by products of the axis weights and summed in the C code's order,
    float32), padded by ``pad`` px of 0.5 and normalised per channel, (v - mean) / std.

    Args:
        images: uint8 [B, 3, H, W] RGB (original resolution), on the compute device, or the
            same already in [0, 1] (:func:`to_unit`, to convert once for all levels).
        level: the pyramid level; the padded level image is (height + 2 pad) x (width + 2 pad).
        pad: padding in level pixels (i_sz / 2), filled with 0.5 before normalisation.
        norm: :func:`normalisation` of the device (made here when None).
    Returns:
        float32 [B, 3, y1 - y0, x1 - x0], ImageNet-normalised. Equal to slicing the whole padded
        level image: only the source pixels the window needs are read.
    """
    b, _, h, w = images.shape
    dev = images.device
    mean, std = norm if norm is not None else normalisation(dev)
    out = ((PAD_VALUE - mean) / std).expand(b, 3, y1 - y0, x1 - x0).clone()
    ly0, ly1 = max(y0 - pad, 0), min(y1 - pad, level.height)
    lx0, lx1 = max(x0 - pad, 0), min(x1 - pad, level.width)
    if ly0 >= ly1 or lx0 >= lx1:
        return out
    ry0, ry1, wy0, wy1 = _axis_table(h, level.height, ly0, ly1)
    cx0, cx1, wx0, wx1 = _axis_table(w, level.width, lx0, lx1)
    # Two host-to-device copies: the window's neighbour indices and its weights.
    ny, nx = ly1 - ly0, lx1 - lx0
    index = torch.from_numpy(np.concatenate([ry0, ry1, cx0, cx1])).to(dev)
    weight = torch.from_numpy(np.concatenate([wy0, wy1, wx0, wx1])).to(dev)
    ry0_t, ry1_t = index[:2 * ny].view(2, ny, 1).unbind(0)
    cx0_t, cx1_t = index[2 * ny:].view(2, 1, nx).unbind(0)
    wy0_t, wy1_t = weight[:2 * ny].view(2, ny, 1).unbind(0)
    wx0_t, wx1_t = weight[2 * ny:].view(2, 1, nx).unbind(0)
    src = images if images.is_floating_point() else to_unit(images)    # B x 3 x H x W, [0, 1]
    nw, ne = src[:, :, ry0_t, cx0_t] * (wx0_t * wy0_t), src[:, :, ry0_t, cx1_t] * (wx1_t * wy0_t)
    sw, se = src[:, :, ry1_t, cx0_t] * (wx0_t * wy1_t), src[:, :, ry1_t, cx1_t] * (wx1_t * wy1_t)
    vals = nw + ne + sw + se                                           # the C code's order
    out[:, :, ly0 + pad - y0:ly1 + pad - y0, lx0 + pad - x0:lx1 + pad - x0] = (vals - mean) / std
    return out


def level_image(images: torch.Tensor, level: Level, pad: int,
                norm: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The whole padded, normalised level image: float32 [B, 3, height + 2 pad, width + 2 pad]
    (see :func:`level_window`; ``images`` uint8, or float32 in [0, 1])."""
    return level_window(images, level, pad, 0, level.height + 2 * pad, 0, level.width + 2 * pad,
                        norm)


# -------------------------------------------------------------------------------------------------
# Tiles


@dataclass(frozen=True)
class Tile:
    """Embedding rows [a, b) x cols [c, d) of a level, read from padded pixels [y0, y1) x [x0, x1)."""

    a: int
    b: int
    c: int
    d: int
    y0: int
    y1: int
    x0: int
    x1: int


def _bytes_per_px(model) -> int:
    return int(getattr(model, "activation_bytes_per_px", 512))


def plan_tiles(level: Level, model, settings: InferenceSettings, batch: int = 1) -> list[Tile]:
    """Tiles covering a level's embedding grid; one tile when the padded level fits the budget.

    Tile starts are multiples of 16 px so every stride of the trunk stays aligned with the untiled
    run; each tile is read with ``halo`` extra pixels (a multiple of 16 at least the model's
    receptive radius) on each side that has image there, so its outputs equal the untiled ones.
    """
    pad = model.cfg.i_sz // 2
    f = model.cfg.f_sz
    hp, wp = level.height + 2 * pad, level.width + 2 * pad
    eh, ew = math.ceil(hp / STRIDE) - f + 1, math.ceil(wp / STRIDE) - f + 1
    halo = STRIDE * math.ceil(model.halo_px / STRIDE)
    tile = settings.tile_cells
    if tile is None:
        budget = settings.memory_budget_mb * 2 ** 20 // 2  # half for the trunk, half for the rest
        per_px = _bytes_per_px(model) * batch
        if hp * wp * per_px <= budget:
            tile = max(eh, ew)
        else:
            side = math.sqrt(budget / per_px)
            tile = max(1, int((side - 2 * halo) // STRIDE) - f + 1)
    tiles = []
    for a in range(0, eh, tile):
        b = min(eh, a + tile)
        for c in range(0, ew, tile):
            d = min(ew, c + tile)
            if tile >= eh and tile >= ew:
                tiles.append(Tile(a, b, c, d, 0, hp, 0, wp))
                continue
            tiles.append(Tile(a, b, c, d,
                              max(0, STRIDE * a - halo), min(hp, STRIDE * (b + f - 1) + halo),
                              max(0, STRIDE * c - halo), min(wp, STRIDE * (d + f - 1) + halo)))
    return tiles
