"""The dense proposer's pyramid: levels of an image, their padded and normalised images (all levels
of a batch made together), and the tiles a level is run in (InferDeepMask.lua's pyramid, with
bounded memory).

Each level is the image resampled to round(s*H) x round(s*W) (s: the pyramid scale times the
``max_image_side`` factor) as the original's pyramid does it (nnx's SpatialReSamplingEx, bilinear
with aligned corners, for shrinking and enlarging alike), padded by i_sz/2 = 80 px of value 0.5 on
every side and normalised with the ImageNet mean/std. A level whose padded size exceeds the trunk's share of the
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
    """(mean, std) float32 [1, 3, 1, 1] on ``device`` (one upload)."""
    ms = torch.tensor([MEAN, STD]).to(device)
    return ms[0].view(1, 3, 1, 1), ms[1].view(1, 3, 1, 1)


def pyramid_images(images: torch.Tensor, levels: list[Level], pad: int) -> list[torch.Tensor]:
    """The padded, normalised images of all ``levels`` of a batch, made together.

    Each level image is the original's: the image in [0, 1] (uint8 times float32(1/255), as
    Torch7's image.load) resampled by SpatialReSamplingEx bilinear (see :func:`_axis_table`; the
    four neighbours weighted by products of the axis weights and summed in the C code's order,
    float32), padded by ``pad`` px of 0.5 and normalised per channel, (v - mean) / std.

    All levels go through one set of ops (a fixed number per batch, plus one copy per level into
    its own contiguous tensor): the rows of every level are gathered at once, then each row's
    columns with its level's column table; the results are scattered into one channel-major
    buffer pre-filled with the normalised padding. Working memory ~50 bytes per level pixel and
    image (a fraction of the trunk's).

    Args:
        images: uint8 [B, 3, H, W] RGB (original resolution), on the compute device, or the same
            already in [0, 1] (:func:`to_unit`).
        levels: the levels to make (any sizes).
        pad: padding in level pixels (i_sz / 2), filled with 0.5 before normalisation.
    Returns:
        per level, float32 [B, 3, height + 2 pad, width + 2 pad], ImageNet-normalised.
    """
    if not levels:
        return []
    b, _, h, w = images.shape
    dev = images.device
    mean, std = normalisation(dev)
    src = images if images.is_floating_point() else to_unit(images)    # B x 3 x H x W, [0, 1]
    # Host tables (numpy, float32 arithmetic as the C code): rows of all levels one after the
    # other; per level its column table, padded to the widest level.
    n_lv, wmax = len(levels), max(lv.width for lv in levels)
    rows = [_axis_table(h, lv.height, 0, lv.height) for lv in levels]
    cols = [_axis_table(w, lv.width, 0, lv.width) for lv in levels]
    ctab_i = np.zeros((2, n_lv, wmax), np.int64)
    ctab_w = np.zeros((2, n_lv, wmax), np.float32)
    for li, (c0, c1, w0, w1) in enumerate(cols):
        ctab_i[:, li, :len(c0)] = c0, c1
        ctab_w[:, li, :len(c0)] = w0, w1
    sizes = [(lv.height + 2 * pad) * (lv.width + 2 * pad) for lv in levels]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]) * b           # level blocks [B, hp, wp]
    total = int(sum(sizes)) * b
    level_of_row = np.repeat(np.arange(n_lv), [lv.height for lv in levels])
    y = np.concatenate([np.arange(lv.height) for lv in levels])
    wp = np.asarray([lv.width + 2 * pad for lv in levels])[level_of_row]
    row_base = offsets[level_of_row] + (pad + y) * wp + pad              # pixel (b=0, y, x=0)
    image_stride = np.asarray(sizes)[level_of_row]
    width = np.asarray([lv.width for lv in levels])[level_of_row]
    n_rows = len(y)
    ints = np.concatenate([np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows]),
                           level_of_row, row_base, image_stride, width, ctab_i.reshape(-1)])
    floats = np.concatenate([np.concatenate([r[2] for r in rows]),
                             np.concatenate([r[3] for r in rows]), ctab_w.reshape(-1)])
    ints_t = torch.from_numpy(ints).to(dev)                              # two uploads
    floats_t = torch.from_numpy(floats).to(dev)
    r0, r1, lvl, base, stride, wid = ints_t[:6 * n_rows].view(6, n_rows).unbind(0)
    c0_tab, c1_tab = ints_t[6 * n_rows:].view(2, n_lv, wmax).unbind(0)
    wy0, wy1 = floats_t[:2 * n_rows].view(2, n_rows, 1).unbind(0)
    wx0_tab, wx1_tab = floats_t[2 * n_rows:].view(2, n_lv, wmax).unbind(0)
    c0, c1, wx0, wx1 = c0_tab[lvl], c1_tab[lvl], wx0_tab[lvl], wx1_tab[lvl]  # rows x wmax
    top, bottom = src[:, :, r0], src[:, :, r1]                           # B x 3 x rows x W
    shape = (b, 3, n_rows, wmax)
    vals = top.gather(3, c0.expand(shape)) * (wx0 * wy0)                 # nw, then ne, sw, se:
    vals = vals + top.gather(3, c1.expand(shape)) * (wx1 * wy0)          # the C code's order
    del top
    vals = vals + bottom.gather(3, c0.expand(shape)) * (wx0 * wy1)
    vals = vals + bottom.gather(3, c1.expand(shape)) * (wx1 * wy1)
    del bottom
    vals = (vals - mean) / std
    # Scatter into one channel-major buffer [3, B * sum(hp * wp) + 1] pre-filled with the
    # normalised padding; columns past a level's width go to the last (scratch) element.
    j = torch.arange(wmax, device=dev)
    dest = base[:, None] + j + torch.arange(b, device=dev)[:, None, None] * stride[:, None]
    dest = torch.where(j < wid[:, None], dest, total)                    # B x rows x wmax
    buf = ((PAD_VALUE - mean) / std).view(3, 1).expand(3, total + 1).contiguous()
    buf.scatter_(1, dest.view(1, -1).expand(3, -1), vals.transpose(0, 1).reshape(3, -1))
    out = []
    for lv, off, size in zip(levels, offsets.tolist(), sizes):
        block = buf[:, off:off + b * size].view(3, b, lv.height + 2 * pad, lv.width + 2 * pad)
        out.append(block.transpose(0, 1).contiguous())                   # B x 3 x hp x wp
    return out


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
