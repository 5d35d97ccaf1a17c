"""The dense proposer's pyramid: levels of an image, their padded and normalised windows, and
the tiles a level is run in (InferDeepMask.lua's pyramid, with bounded memory).

Each level is the image resampled bilinearly to round(s*H) x round(s*W) (s: the pyramid scale
times the ``max_image_side`` factor), padded by i_sz/2 = 80 px of value 0.5 on every side and
normalised with the ImageNet mean/std. A level whose padded size exceeds the trunk's share of the
memory budget runs in tiles aligned to stride 16, each read with a halo of the network's receptive
radius, so that tiled results equal untiled ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
# Level images, resampled window by window


def _axis_interp(out_idx: torch.Tensor, in_size: int, out_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear source indices/weight along one axis, as F.interpolate(align_corners=False)."""
    src = ((out_idx.double() + 0.5) * (in_size / out_size) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    return i0, i1, (src - i0.double()).float()


def level_window(images: torch.Tensor, level: Level, pad: int,
                 y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    """Rows [y0, y1) x cols [x0, x1) of the padded, normalised level image.

    Args:
        images: uint8 [B, 3, H, W] RGB (original resolution), on the compute device.
        level: the pyramid level; the padded level image is (height + 2 pad) x (width + 2 pad).
        pad: padding in level pixels (i_sz / 2), filled with 0.5 before normalisation.
    Returns:
        float32 [B, 3, y1 - y0, x1 - x0], ImageNet-normalised. Equal to slicing the whole padded
        level image: only the source rows/columns the window needs are read.
    """
    b, _, h, w = images.shape
    dev = images.device
    mean = torch.tensor(MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=dev).view(1, 3, 1, 1)
    out = ((PAD_VALUE - mean) / std).expand(b, 3, y1 - y0, x1 - x0).clone()
    ly0, ly1 = max(y0 - pad, 0), min(y1 - pad, level.height)
    lx0, lx1 = max(x0 - pad, 0), min(x1 - pad, level.width)
    if ly0 >= ly1 or lx0 >= lx1:
        return out
    r0, r1, wr = _axis_interp(torch.arange(ly0, ly1, device=dev), h, level.height)
    c0, c1, wc = _axis_interp(torch.arange(lx0, lx1, device=dev), w, level.width)
    # read only the source columns this window needs, then interpolate rows, then columns
    clo, chi = int(c0.min()), int(c1.max()) + 1
    src = images[:, :, :, clo:chi]
    top, bot = src[:, :, r0].float(), src[:, :, r1].float()            # B x 3 x nr x nc_src
    rows = torch.lerp(top, bot, wr.view(1, 1, -1, 1))
    left, right = rows[..., c0 - clo], rows[..., c1 - clo]             # B x 3 x nr x nc
    vals = torch.lerp(left, right, wc.view(1, 1, 1, -1)) / 255.0
    out[:, :, ly0 + pad - y0:ly1 + pad - y0, lx0 + pad - x0:lx1 + pad - x0] = (vals - mean) / std
    return out


def level_image(images: torch.Tensor, level: Level, pad: int) -> torch.Tensor:
    """The whole padded, normalised level image: float32 [B, 3, height + 2 pad, width + 2 pad]
    (see :func:`level_window`)."""
    return level_window(images, level, pad, 0, level.height + 2 * pad, 0, level.width + 2 * pad)


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
