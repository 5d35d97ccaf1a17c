"""Whole-image DeepMask/SharpMask inference, as the original (InferDeepMask.lua, InferSharpMask.lua).

For a batch of same-size images: every pyramid level (:mod:`.pyramid`), tile by tile, runs the
network densely (stride 16) and scores every embedding cell; each image's best cells over all
levels are kept in its :class:`~.pool.CandidatePool` (optionally NMS); masks are computed only for
the final k cells, pasted back into the image's frame (:func:`segdist.proposers.paste.paste_masks`),
binarised at probability ``threshold`` (logit > log(t / (1 - t))) and encoded to COCO RLE in
batches sized by the memory budget.

Geometry (one location for score, mask and placement; the original's index quirk is not copied):
embedding cell (r, c) of a level reads the i_sz x i_sz window of the *padded* level whose top-left
pixel is (16r, 16c), i.e. level pixels [16r - 80, 16r + 80) x [16c - 80, 16c + 80). Its mask logits
cover exactly that window; in the original image (level -> image factor ry = H / H_level) the window
is rows [(16r - 80) * ry, (16r + 80) * ry).

The model is any object with the dense protocol of :class:`~segdist.models.deepmask.DeepMask` and
:class:`~segdist.models.sharpmask.SharpMask`: ``cfg`` (i_sz, f_sz), ``dense``, ``score_map``,
``window_extras``, ``window_masks``, ``mask_size``, ``halo_px``, ``activation_bytes_per_px``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from segdist.device import autocast
from segdist.proposals.types import ImageProposals
from segdist.proposers.dense.pool import CandidatePool, offer
from segdist.proposers.dense.pyramid import (STRIDE, Level, Tile, level_window, plan_tiles,
                                             pyramid_levels)
from segdist.proposers.dense.settings import InferenceSettings
from segdist.proposers.paste import paste_masks


def propose(model, images: torch.Tensor, image_ids: Sequence[int], settings: InferenceSettings,
            name: str) -> list[ImageProposals]:
    """Proposals for a batch of same-size images.

    Args:
        model: a DeepMask or SharpMask in eval mode (or any object with the same dense protocol,
            see the module docstring), on the device of ``images``.
        images: uint8 [B, 3, H, W] RGB.
        image_ids: the B images' ids.
        settings: the pyramid, k, threshold, NMS, memory settings.
        name: the preset recorded with the proposals.
    Returns:
        one ImageProposals per image: at most k, sorted by score, masks at H x W.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 [B, 3, H, W], got {images.dtype} {list(images.shape)}")
    b, _, height, width = images.shape
    cap = settings.proposals * (settings.nms_pool if settings.nms else 1)
    levels = pyramid_levels(height, width, settings)
    pools: list[CandidatePool | None] = [None] * b
    with torch.inference_mode():
        with autocast(images.device, settings.precision):
            for level in levels:
                for tile in plan_tiles(level, model, settings, b):
                    _collect(model, images, level, tile, pools, cap, settings)
        by_index = {lv.index: lv for lv in levels}
        out = []
        for iid, pool in zip(image_ids, pools):
            if pool is None or len(pool) == 0:
                out.append(ImageProposals(int(iid), height, width, np.zeros(0, np.float32),
                                          np.zeros((0, 4), np.float32), [], name))
                continue
            pool = _select(model, pool, by_index, height, width, settings)
            counts, boxes = _encode_masks(model, pool, by_index, height, width, settings)
            scores = torch.sigmoid(pool.logits.float()).cpu().numpy().astype(np.float32)
            out.append(ImageProposals(int(iid), height, width, scores, boxes, counts, name))
    return out


def _threshold_logit(settings: InferenceSettings) -> float:
    return math.log(settings.threshold / (1 - settings.threshold))


def _collect(model, images: torch.Tensor, level: Level, tile: Tile,
             pools: list[CandidatePool | None], cap: int, settings: InferenceSettings) -> None:
    """Run one tile of one level and offer its best cells to each image's pool (in place)."""
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
        vals, idx = flat.topk(min(cap, flat.numel()), sorted=False)
        lowest = None if pool is None else pool.floor(cap)
        if lowest is not None:  # only cells that can still enter the pool
            keep = vals >= lowest
            vals, idx = vals[keep], idx[keep]
            if len(idx) == 0:
                continue
        lr, lc = idx // nc + ra, idx % nc + rc
        local = torch.stack([torch.full_like(lr, bi), lr, lc], 1)  # K x 3 (batch, row, col)
        vecs = emb[local[:, 0], :, lr, lc].float()                  # K x fc_dim
        wins = [w.float() for w in model.window_extras(extras, local)]
        new = CandidatePool(vals, torch.full_like(lr, level.index), lr - ra + tile.a,
                            lc - rc + tile.c, vecs, wins)
        pools[bi] = offer(pool, new, cap)


def _window_geometry(level: Level, rows: torch.Tensor, cols: torch.Tensor, i_sz: int
                     ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Image-frame window (tops, lefts float64 [K], height, width) of cells (rows, cols) of a level."""
    pad = i_sz // 2
    tops = (rows.double() * STRIDE - pad) * level.ry
    lefts = (cols.double() * STRIDE - pad) * level.rx
    return tops, lefts, i_sz * level.ry, i_sz * level.rx


def _select(model, pool: CandidatePool, levels: dict[int, Level], height: int, width: int,
            settings: InferenceSettings) -> CandidatePool:
    """The final k candidates of one image in ranking order (after the optional box NMS)."""
    sel = torch.arange(len(pool), device=pool.vecs.device)
    if settings.nms:
        import torchvision

        with autocast(pool.vecs.device, settings.precision):
            boxes = _window_boxes(model, pool, levels, height, width, _threshold_logit(settings),
                                  chunk=256)
        sel = torchvision.ops.nms(boxes.float(), pool.logits.float(), settings.nms)
        sel = sel.sort().values  # nms returns by decreasing score; pool order is the tie order
    return pool.take(sel[:settings.proposals])


def _window_boxes(model, pool: CandidatePool, levels: dict[int, Level], height: int, width: int,
                  thr: float, chunk: int) -> torch.Tensor:
    """float64 [N, 4] xyxy image boxes of each candidate's mask binarised at mask resolution."""
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


def _encode_masks(model, pool: CandidatePool, levels: dict[int, Level], height: int, width: int,
                  settings: InferenceSettings) -> tuple[list[bytes], np.ndarray]:
    """Compressed RLE and tight xywh boxes (float32 [K, 4]) of the pool's masks at H x W, computed
    in batches whose full-resolution canvases fit the memory budget (then dropped)."""
    from segdist.proposals.rle import encode_masks

    dev = pool.vecs.device
    o, i_sz = model.mask_size, model.cfg.i_sz
    thr = _threshold_logit(settings)
    # bytes per mask in a batch: canvas + RLE working set (~4 B/px) + the window's float product
    max_win = max(math.ceil(i_sz * lv.ry + 1) * math.ceil(i_sz * lv.rx + 1) for lv in levels.values())
    per_mask = 5 * height * width + 16 * min(max_win, height * width) + 8 * o * o
    chunk = max(1, min(len(pool), settings.memory_budget_mb * 2 ** 20 // per_mask))
    counts: list[bytes] = []
    boxes = []
    for s in range(0, len(pool), chunk):
        part = pool.take(torch.arange(s, min(s + chunk, len(pool)), device=dev))
        with autocast(dev, settings.precision):
            logits = model.window_masks(part.vecs, part.extras)
        logits = logits.float()
        canvas = torch.zeros(len(part), height, width, dtype=torch.bool, device=dev)
        for li in part.level.unique().tolist():
            members = (part.level == li).nonzero().squeeze(1)
            tops, lefts, wh, ww = _window_geometry(levels[li], part.row[members],
                                                   part.col[members], i_sz)
            paste_masks(logits[members], tops, lefts, wh, ww, height, width, thr, canvas, members)
        del logits
        c, bx, _ = encode_masks(canvas)
        del canvas
        counts.extend(c)
        boxes.append(bx)
    return counts, np.concatenate(boxes).astype(np.float32)
