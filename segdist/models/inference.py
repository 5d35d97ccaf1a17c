"""Whole-image DeepMask/SharpMask inference, as the original (InferDeepMask.lua, InferSharpMask.lua).

For each image: a scale pyramid 2^smin .. 2^smax (step 0.5); each level is the image resampled
bilinearly to round(s*H) x round(s*W), padded by i_sz/2 = 80 px of value 0.5 on every side and
normalised with the ImageNet mean/std; the network runs densely (stride 16) and scores every cell;
the global top-k cells over all levels are kept (optionally NMS); masks are computed only for
those cells, resized, binarised at probability 0.2 (logit > log(0.2/0.8)) and pasted back into the
image's frame; then encoded to COCO RLE in batches sized by a memory budget.

Geometry (one location for score, mask and placement; the original's index quirk is not copied):
embedding cell (r, c) of a level reads the i_sz x i_sz window of the *padded* level whose top-left
pixel is (16r, 16c), i.e. level pixels [16r - 80, 16r + 80) x [16c - 80, 16c + 80). Its mask logits
cover exactly that window; in the original image (level -> image factor ry = H / H_level) the window
is rows [(16r - 80) * ry, (16r + 80) * ry). Pixel (y, x) of the image (centre (y + .5, x + .5)) takes
the mask value bilinearly sampled at that centre (align_corners=False convention).

Memory is bounded for any image size:
- ``max_image_side``: the pyramid is computed for the image scaled so that its longer side is at
  most that many pixels (resampled straight from the original, coordinates stay in the original).
- Levels whose padded size exceeds the trunk budget are processed in tiles aligned to stride 16,
  each read with a halo of the network's receptive radius so that tiled results equal untiled
  ones. Per tile only candidate cells that can still enter the global top-k are kept (their
  embedding vectors and, for SharpMask, their horizontal-net windows), never whole maps.
- Masks go from logits to RLE in batches whose full-resolution canvases fit the budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from segdist.errors import ConfigError

STRIDE = 16
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PAD_VALUE = 0.5

# preset -> (smin, smax) in log2 units, step 0.5
PRESET_RANGES: dict[str, tuple[float, float]] = {
    "deepmask": (-2.5, 0.5),
    "sharpmask": (-2.5, 0.5),
    "deepmask-zoom": (-2.5, 1.0),
    "sharpmask-zoom": (-2.5, 1.0),
    "deepmask-zoom2": (-2.5, 1.5),
    "sharpmask-zoom2": (-2.5, 1.5),
}


def scale_exponents(smin: float, smax: float, step: float = 0.5) -> list[float]:
    """log2 scales smin, smin+step, ..., up to smax inclusive (robust to float steps)."""
    if step <= 0 or smax < smin:
        raise ConfigError(f"scale range needs step > 0 and max >= min (got {smin}..{smax} step {step})")
    n = int(math.floor((smax - smin) / step + 1e-9)) + 1
    return [smin + i * step for i in range(n)]


def preset_scales(name: str) -> tuple[float, ...]:
    """The pyramid scales (2^s) of a DeepMask/SharpMask preset name."""
    if name not in PRESET_RANGES:
        raise ConfigError(f"no scale pyramid for model {name!r}; presets: {sorted(PRESET_RANGES)}")
    smin, smax = PRESET_RANGES[name]
    return tuple(2.0 ** e for e in scale_exponents(smin, smax, 0.5))


@dataclass(frozen=True)
class InferenceSettings:
    """How whole-image inference runs.

    scales: pyramid scales (2^s). proposals: k, kept per image. threshold: mask binarisation
    probability. nms: IoU threshold of an optional box NMS over the candidates (None: no NMS, as the
    original). max_image_side: longer side the pyramid is computed for (None: the image's own).
    memory_budget_mb: bounds the trunk tiles and the mask/RLE batches. tile_cells: embedding cells
    per tile side (None: derived from the budget). precision: autocast dtype of the networks
    ("fp32" = none). channels_last: NHWC inputs. nms_pool: with NMS, candidates kept = nms_pool * k.
    """

    scales: tuple[float, ...]
    proposals: int = 1000
    threshold: float = 0.2
    nms: float | None = None
    max_image_side: int | None = None
    memory_budget_mb: int = 1024
    tile_cells: int | None = None
    precision: str = "fp32"
    channels_last: bool = False
    nms_pool: int = 3

    def __post_init__(self) -> None:
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ConfigError(f"inference scales must be positive and non-empty (got {self.scales})")
        if self.proposals < 1:
            raise ConfigError(f"proposals must be >= 1 (got {self.proposals})")
        if not 0 < self.threshold < 1:
            raise ConfigError(f"mask threshold must be a probability in (0, 1) (got {self.threshold})")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be fp32, bf16 or fp16 (got {self.precision!r})")
        if self.tile_cells is not None and self.tile_cells < 1:
            raise ConfigError(f"tile_cells must be >= 1 (got {self.tile_cells})")


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


@dataclass(frozen=True)
class MaskProposals:
    """Proposals of one image: scores float32[N] descending, boxes float32[N, 4] COCO xywh (tight
    boxes of the masks), counts N compressed-RLE bytes of (height, width) masks, areas int64[N];
    level/row/col int64[N]: the pyramid level index and embedding cell each came from."""

    height: int
    width: int
    scores: np.ndarray
    boxes: np.ndarray
    counts: list[bytes]
    areas: np.ndarray
    level: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    row: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    col: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


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


# -------------------------------------------------------------------------------------------------
# Candidate pool (per image): the best cells seen so far with what their masks need


class _Pool:
    """Top-``cap`` candidate cells of one image across levels and tiles.

    Ordered by (score desc, level, row, col): the same cells win whatever the tiling.
    """

    def __init__(self, cap: int):
        self.cap = cap
        self.logits = self.level = self.row = self.col = self.vecs = None
        self.extras: list[torch.Tensor] = []

    def __len__(self) -> int:
        return 0 if self.logits is None else len(self.logits)

    def floor(self) -> float | None:
        """Lowest score still able to enter (None while the pool is not full)."""
        if len(self) < self.cap:
            return None
        return float(self.logits[-1])

    def add(self, logits, level, row, col, vecs, extras) -> None:
        if self.logits is not None:
            logits = torch.cat([self.logits, logits])
            level = torch.cat([self.level, level])
            row = torch.cat([self.row, row])
            col = torch.cat([self.col, col])
            vecs = torch.cat([self.vecs, vecs])
            extras = [torch.cat([a, b]) for a, b in zip(self.extras, extras)]
        # location order first, then a stable sort by score: ties resolve by location
        loc = (level * (1 << 20) + row) * (1 << 20) + col
        order = torch.sort(loc, stable=True).indices
        order = order[torch.sort(logits[order], descending=True, stable=True).indices][: self.cap]
        self.logits, self.level, self.row, self.col = logits[order], level[order], row[order], col[order]
        self.vecs = vecs[order]
        self.extras = [e[order] for e in extras]


def _collect(model, images: torch.Tensor, level: Level, tile: Tile, pools: list[_Pool],
             settings: InferenceSettings) -> None:
    """Run one tile of one level and offer its best cells to each image's pool."""
    pad = model.cfg.i_sz // 2
    x = level_window(images, level, pad, tile.y0, tile.y1, tile.x0, tile.x1)
    if settings.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    emb, extras = model.dense(x)
    ra, rc = tile.a - tile.y0 // STRIDE, tile.c - tile.x0 // STRIDE  # tile origin in local cells
    nr, nc = tile.b - tile.a, tile.d - tile.c
    scores = model.score_map(emb[:, :, ra:ra + nr, rc:rc + nc]).float()  # B x nr x nc
    for bi, pool in enumerate(pools):
        flat = scores[bi].reshape(-1)
        k = min(pool.cap, flat.numel())
        vals, idx = flat.topk(k, sorted=False)
        lowest = pool.floor()
        if lowest is not None:
            keep = vals >= lowest
            vals, idx = vals[keep], idx[keep]
            if len(idx) == 0:
                continue
        lr, lc = idx // nc + ra, idx % nc + rc
        local = torch.stack([torch.full_like(lr, bi), lr, lc], 1)  # K x 3 (batch, row, col)
        vecs = emb[local[:, 0], :, lr, lc].float()                  # K x fc_dim
        wins = [w.float() for w in model.window_extras(extras, local)]
        pool.add(vals, torch.full_like(lr, level.index), lr - ra + tile.a, lc - rc + tile.c,
                 vecs, wins)


# -------------------------------------------------------------------------------------------------
# Paste-back


def _axis_matrix(starts: torch.Tensor, origin: torch.Tensor, extent: torch.Tensor, n_out: int,
                 limit: int, o: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Interpolation matrices [K, n_out, o] and validity [K, n_out] for output pixels
    starts[k] + j (j < n_out) of windows [origin, origin + extent) (float64 [K]) sampled from o
    cells with F.interpolate's align_corners=False convention (edge cells extend to the border)."""
    dev = starts.device
    pix = starts[:, None] + torch.arange(n_out, device=dev)           # K x n_out
    centre = pix.double() + 0.5
    org, ext = origin[:, None], extent[:, None]
    valid = (centre >= org) & (centre < org + ext) & (pix >= 0) & (pix < limit)
    u = ((centre - org) * (o / ext) - 0.5).clamp(0, o - 1)
    i0 = u.floor().long()
    i1 = (i0 + 1).clamp(max=o - 1)
    w1 = (u - i0.double()).float()
    m = torch.zeros(len(starts), n_out, o, device=dev)
    m.scatter_add_(2, i0[..., None], (1 - w1)[..., None])
    m.scatter_add_(2, i1[..., None], w1[..., None])
    return m, valid


def paste_masks(logits: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor,
                win_h: float | torch.Tensor, win_w: float | torch.Tensor, height: int, width: int,
                thr_logit: float,
                out: torch.Tensor | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
    """Binarised masks in the image frame.

    Args:
        logits: float32 [K, o, o] per-window values (logits; Mask R-CNN passes probabilities),
            each covering its window (row-major, rows = y).
        tops, lefts: float64 [K], window top-left in image pixels (may be negative).
        win_h, win_w: window size in image pixels: a float (same for all K) or float64 [K].
        height, width: image size.
        thr_logit: a pixel is on when its bilinearly resized value is > thr_logit.
        out, index: optionally a zeroed bool canvas [N, height, width] and int64 [K] slots of it
            to write into (avoids a second full-resolution copy).
    Returns:
        bool [K, height, width] (or ``out``, with the K masks written at ``index``).
    """
    k, o = logits.shape[0], logits.shape[-1]
    dev = logits.device
    if out is None:
        out = torch.zeros(k, height, width, dtype=torch.bool, device=dev)
        index = torch.arange(k, device=dev)
    if k == 0:
        return out
    win_h = torch.as_tensor(win_h, dtype=torch.float64, device=dev).expand(k)
    win_w = torch.as_tensor(win_w, dtype=torch.float64, device=dev).expand(k)
    ny = min(math.ceil(float(win_h.max())) + 1, height)
    nx = min(math.ceil(float(win_w.max())) + 1, width)
    # first pixel whose centre is inside the window, shifted so the span stays in the image:
    # then every written index is in range and unique per mask (no clamping, no collisions)
    sy = torch.ceil(tops - 0.5).long().clamp(0, height - ny)
    sx = torch.ceil(lefts - 0.5).long().clamp(0, width - nx)
    my, vy = _axis_matrix(sy, tops, win_h, ny, height, o)
    mx, vx = _axis_matrix(sx, lefts, win_w, nx, width, o)
    vals = my @ logits.float() @ mx.transpose(1, 2)                   # K x ny x nx
    on = (vals > thr_logit) & vy[:, :, None] & vx[:, None, :]
    del vals
    rows = (sy[:, None] + torch.arange(ny, device=dev))[:, :, None]   # K x ny x 1
    cols = (sx[:, None] + torch.arange(nx, device=dev))[:, None, :]   # K x 1 x nx
    out.index_put_((index[:, None, None], rows, cols), on)
    return out


def _window_geometry(level: Level, rows: torch.Tensor, cols: torch.Tensor, i_sz: int
                     ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Image-frame window (tops, lefts, height, width) of embedding cells (rows, cols) of a level."""
    pad = i_sz // 2
    tops = (rows.double() * STRIDE - pad) * level.ry
    lefts = (cols.double() * STRIDE - pad) * level.rx
    return tops, lefts, i_sz * level.ry, i_sz * level.rx


def _window_boxes(model, pool: _Pool, levels: dict[int, Level], height: int, width: int,
                  thr: float, chunk: int) -> torch.Tensor:
    """xyxy image boxes of each candidate's mask binarised at mask resolution (for NMS)."""
    o = model.mask_size
    boxes = torch.zeros(len(pool), 4, dtype=torch.float64, device=pool.vecs.device)
    i_sz = model.cfg.i_sz
    for s in range(0, len(pool), chunk):
        sl = slice(s, s + chunk)
        logits = model.window_masks(pool.vecs[sl], [e[sl] for e in pool.extras]).float()
        on = logits > thr
        rows_any, cols_any = on.any(2), on.any(1)                     # K x o
        ar = torch.arange(o, device=on.device)
        r0 = torch.where(rows_any, ar, o).amin(1)
        r1 = torch.where(rows_any, ar, -1).amax(1) + 1
        c0 = torch.where(cols_any, ar, o).amin(1)
        c1 = torch.where(cols_any, ar, -1).amax(1) + 1
        for li in pool.level[sl].unique().tolist():
            sel = (pool.level[sl] == li).nonzero().squeeze(1)
            lv = levels[li]
            tops, lefts, wh, ww = _window_geometry(lv, pool.row[sl][sel], pool.col[sl][sel], i_sz)
            b = torch.stack([lefts + c0[sel] * ww / o, tops + r0[sel] * wh / o,
                             lefts + c1[sel] * ww / o, tops + r1[sel] * wh / o], 1)
            b[:, 0::2] = b[:, 0::2].clamp(0, width)
            b[:, 1::2] = b[:, 1::2].clamp(0, height)
            empty = ~rows_any[sel].any(1)
            b[empty] = 0
            boxes[s + sel] = b
    return boxes


# -------------------------------------------------------------------------------------------------
# Public entry points


def _autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


def propose(model, images: torch.Tensor, settings: InferenceSettings) -> list[MaskProposals]:
    """Proposals for a batch of same-size images.

    Args:
        model: a DeepMask or SharpMask in eval mode (or any object with the same inference
            protocol: ``cfg``, ``dense``, ``score_map``, ``window_extras``, ``window_masks``,
            ``mask_size``, ``halo_px``), on the device of ``images``.
        images: uint8 [B, 3, H, W] RGB.
        settings: the pyramid, k, threshold, NMS, memory settings.
    Returns:
        one :class:`MaskProposals` per image: at most k, sorted by score, masks at H x W.
    """
    from segdist.proposals.rle import encode_masks

    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 [B, 3, H, W], got {images.dtype} {list(images.shape)}")
    b, _, height, width = images.shape
    k = settings.proposals
    cap = k * (settings.nms_pool if settings.nms else 1)
    levels = pyramid_levels(height, width, settings)
    pools = [_Pool(cap) for _ in range(b)]
    thr = math.log(settings.threshold / (1 - settings.threshold))
    budget = settings.memory_budget_mb * 2 ** 20
    with torch.inference_mode():
        with _autocast(images.device, settings.precision):
            for level in levels:
                for tile in plan_tiles(level, model, settings, b):
                    _collect(model, images, level, tile, pools, settings)
        by_index = {lv.index: lv for lv in levels}
        results = []
        for pool in pools:
            results.append(_finish(model, pool, by_index, height, width, k, thr, settings, budget,
                                   encode_masks))
    return results


def _finish(model, pool: _Pool, levels: dict[int, Level], height: int, width: int, k: int,
            thr: float, settings: InferenceSettings, budget: int, encode) -> MaskProposals:
    """Select the final k cells of one image, compute their masks in batches, encode to RLE."""
    dev = pool.vecs.device if len(pool) else torch.device("cpu")
    o, i_sz = model.mask_size, model.cfg.i_sz
    if len(pool) == 0:
        z = np.zeros(0, np.int64)
        return MaskProposals(height, width, np.zeros(0, np.float32), np.zeros((0, 4), np.float32),
                             [], z, z, z, z)
    sel = torch.arange(len(pool), device=dev)
    if settings.nms:
        import torchvision

        with _autocast(dev, settings.precision):
            boxes = _window_boxes(model, pool, levels, height, width, thr, chunk=256)
        sel = torchvision.ops.nms(boxes.float(), pool.logits.float(), settings.nms)
        sel = sel.sort().values  # nms returns by decreasing score; pool order is the tie order
    sel = sel[:k]
    # bytes per mask in a batch: canvas + RLE working set (~4 B/px) + the window's float product
    max_win = max(math.ceil(i_sz * lv.ry + 1) * math.ceil(i_sz * lv.rx + 1) for lv in levels.values())
    per_mask = 5 * height * width + 16 * min(max_win, height * width) + 8 * o * o
    chunk = max(1, min(len(sel), budget // per_mask))
    counts: list[bytes] = []
    boxes_out, areas_out = [], []
    for s in range(0, len(sel), chunk):
        idx = sel[s:s + chunk]
        with _autocast(dev, settings.precision):
            logits = model.window_masks(pool.vecs[idx], [e[idx] for e in pool.extras])
        logits = logits.float()
        canvas = torch.zeros(len(idx), height, width, dtype=torch.bool, device=dev)
        lvl = pool.level[idx]
        for li in lvl.unique().tolist():
            members = (lvl == li).nonzero().squeeze(1)
            tops, lefts, wh, ww = _window_geometry(levels[li], pool.row[idx][members],
                                                   pool.col[idx][members], i_sz)
            paste_masks(logits[members], tops, lefts, wh, ww, height, width, thr, canvas, members)
        del logits
        c, bx, ar = encode(canvas)
        del canvas
        counts.extend(c)
        boxes_out.append(bx)
        areas_out.append(ar)
    return MaskProposals(
        height, width,
        torch.sigmoid(pool.logits[sel].float()).cpu().numpy().astype(np.float32),
        np.concatenate(boxes_out).astype(np.float32), counts, np.concatenate(areas_out),
        pool.level[sel].cpu().numpy(), pool.row[sel].cpu().numpy(), pool.col[sel].cpu().numpy(),
    )


def propose_images(model, images: Sequence[np.ndarray], settings: InferenceSettings,
                   device: torch.device | str = "cpu", batch_size: int = 4) -> list[MaskProposals]:
    """Proposals for decoded images (uint8 H x W x 3 RGB numpy arrays), in input order.

    Images of the same size are batched through the network together (up to ``batch_size``).
    """
    device = torch.device(device)
    out: list[MaskProposals | None] = [None] * len(images)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        if not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
            got = f"{im.dtype} {im.shape}" if isinstance(im, np.ndarray) else type(im).__name__
            raise ValueError(f"image {i}: expected a uint8 H x W x 3 RGB array, got {got}")
        groups.setdefault(im.shape[:2], []).append(i)
    for members in groups.values():
        for s in range(0, len(members), batch_size):
            part = members[s:s + batch_size]
            batch = torch.from_numpy(np.stack([images[i] for i in part])).to(device)
            batch = batch.permute(0, 3, 1, 2).contiguous()
            for i, res in zip(part, propose(model, batch, settings)):
                out[i] = res
    return out  # type: ignore[return-value]
