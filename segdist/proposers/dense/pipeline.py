"""Whole-image DeepMask/SharpMask inference, as the original (InferDeepMask.lua, InferSharpMask.lua),
for a window of images at once with a fixed number of kernels per batch.

Two stages:

1. :func:`run_levels`, per batch of same-size images: every pyramid level (:mod:`.pyramid`),
   untiled when the batch fits the memory budget (else tile by tile), runs the network densely
   (stride 16) and scores every embedding cell. Per level only the level image, the trunk's forward
   and the score head run; the level's maps are kept (:class:`LevelMaps`).
2. :func:`finish`, for all batches of a window together: each image's best k cells over all its
   levels are selected by one stable sort per batch over [B, cells] (score descending, ties by
   level, row, col: exactly the original's ranking whatever the batch), the optional box NMS runs,
   then masks are computed for the selected windows only, pasted back into each image's frame
   (:func:`segdist.proposers.paste.paste_batch`), binarised at probability ``threshold``
   (logit > log(t / (1 - t))) and encoded to COCO RLE, all in slabs of windows sized by the memory
   budget: per slab a fixed number of ops and one ``nonzero``; one device-to-host copy of all
   slabs' characters, boxes and the scores per window.

Geometry (one location for score, mask and placement; the original's index quirk is not copied):
embedding cell (r, c) of a level reads the i_sz x i_sz window of the *padded* level whose top-left
pixel is (16r, 16c), i.e. level pixels [16r - 80, 16r + 80) x [16c - 80, 16c + 80). Its mask logits
cover exactly that window; in the original image (level -> image factor ry = H / H_level) the window
is rows [(16r - 80) * ry, (16r + 80) * ry).

The model is any object with the dense protocol of :class:`~segdist.models.deepmask.DeepMask` and
:class:`~segdist.models.sharpmask.SharpMask`: ``cfg`` (i_sz, f_sz), ``dense``, ``score_map``,
``window_masks``, ``mask_size``, ``halo_px``, ``activation_bytes_per_px`` and, for models with
per-window extras (SharpMask), ``extras_layout``: (step, size) of each extras map's window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from segdist.device import autocast
from segdist.proposals.rle import SlabEncoder
from segdist.proposals.types import ImageProposals
from segdist.proposers.dense.pool import Candidates
from segdist.proposers.dense.pyramid import (STRIDE, Level, plan_tiles, pyramid_images,
                                             pyramid_levels)
from segdist.proposers.dense.settings import InferenceSettings
from segdist.proposers.paste import paste_batch, slab_end


@dataclass
class LevelMaps:
    """One level of a batch of same-size images, whole (tiles assembled).

    scores: float32 [B, eh, ew] score logits per embedding cell. emb: [B, fc_dim, eh, ew].
    extras: per extras map [B, C, h, w], at most ceil(hp / 16) * step rows (and likewise columns):
    every cell's window lies inside that extent, zero beyond the map.
    """

    level: Level
    scores: torch.Tensor
    emb: torch.Tensor
    extras: list[torch.Tensor]


@dataclass
class Batch:
    """A batch of same-size images after stage 1: the window slots, size, and level maps."""

    slots: list[int]
    image_ids: list[int]
    height: int
    width: int
    levels: list[LevelMaps]


def _extras_layout(model) -> tuple[tuple[int, int], ...]:
    return tuple(getattr(model, "extras_layout", ()))


def _threshold_logit(settings: InferenceSettings) -> float:
    return math.log(settings.threshold / (1 - settings.threshold))


def run_levels(model, images: torch.Tensor, settings: InferenceSettings) -> list[LevelMaps]:
    """Stage 1 for a batch of same-size images.

    Args:
        model: a DeepMask or SharpMask in eval mode (or any object with the dense protocol), on
            the device of ``images``.
        images: uint8 [B, 3, H, W] RGB.
        settings: the pyramid, memory and precision settings.
    Returns:
        the maps of every level (:class:`LevelMaps`), in the settings' scale order.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 [B, 3, H, W], got {images.dtype} {list(images.shape)}")
    b, _, height, width = images.shape
    pad, f = model.cfg.i_sz // 2, model.cfg.f_sz
    layout = _extras_layout(model)
    out = []
    with torch.inference_mode(), autocast(images.device, settings.precision):
        levels = pyramid_levels(height, width, settings)
        inputs = pyramid_images(images, levels, pad)
        for level in levels:
            x = inputs.pop(0)  # each level image is dropped once its level has run
            hp, wp = level.height + 2 * pad, level.width + 2 * pad
            gh, gw = math.ceil(hp / STRIDE), math.ceil(wp / STRIDE)  # stride-16 grid
            eh, ew = gh - f + 1, gw - f + 1
            if settings.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            tiles = plan_tiles(level, model, settings, b)
            if len(tiles) == 1:
                emb, extras = model.dense(x)
                scores = model.score_map(emb).float()
                out.append(LevelMaps(level, scores, emb, list(extras)))
                continue
            # Tiled: assemble whole-level maps from each tile's own cells (halos make them exact).
            scores = emb = None
            extras_full: list[torch.Tensor] = []
            for t in tiles:
                e, ex = model.dense(x[:, :, t.y0:t.y1, t.x0:t.x1])
                ra, rc = t.a - t.y0 // STRIDE, t.c - t.x0 // STRIDE  # tile origin in local cells
                own = e[:, :, ra:ra + t.b - t.a, rc:rc + t.d - t.c]
                if emb is None:
                    emb = own.new_zeros(b, own.shape[1], eh, ew)
                    scores = torch.zeros(b, eh, ew, device=own.device)
                    extras_full = [m.new_zeros(b, m.shape[1], gh * step, gw * step)
                                   for m, (step, _) in zip(ex, layout)]
                emb[:, :, t.a:t.b, t.c:t.d] = own
                scores[:, t.a:t.b, t.c:t.d] = model.score_map(own).float()
                for full, m, (step, _) in zip(extras_full, ex, layout):
                    # rows [a*step, b*step) are this tile's (to the map's end for the last tile)
                    r0, c0 = t.a * step, t.c * step
                    r1 = t.b * step if t.b < eh else full.shape[2]
                    c1 = t.d * step if t.d < ew else full.shape[3]
                    oy, ox = t.y0 // STRIDE * step, t.x0 // STRIDE * step  # local map origin
                    r1 = min(r1, oy + m.shape[2])
                    c1 = min(c1, ox + m.shape[3])
                    full[:, :, r0:r1, c0:c1] = m[:, :, r0 - oy:r1 - oy, c0 - ox:c1 - ox]
            out.append(LevelMaps(level, scores, emb, extras_full))
    return out


def finish(model, batches: Sequence[Batch], settings: InferenceSettings, name: str,
           n_images: int) -> list[ImageProposals]:
    """Stage 2 for all batches of a window: selection, masks, paste-back, RLE.

    Args:
        model: the model that ran stage 1.
        batches: the window's batches (each a :class:`Batch`); slots 0..n_images-1 each once.
        settings: k, threshold, NMS, memory and precision settings.
        name: the preset recorded with the proposals.
        n_images: images in the window.
    Returns:
        one ImageProposals per slot: at most k, sorted by score, masks at the image's size.
    """
    # Candidates are image-major in batch order: position p is the p-th image of that order.
    order = [(slot, iid, b.height, b.width, cand_count(b, settings))
             for b in batches for slot, iid in zip(b.slots, b.image_ids)]
    if sorted(o[0] for o in order) != list(range(n_images)):
        raise ValueError(f"batches must cover slots 0..{n_images - 1} once each")
    with torch.inference_mode():
        parts, extras_bufs = [], []
        ext_offset = [0] * len(_extras_layout(model))
        pos = 0
        for batch in batches:
            cand, bufs = _select(model, batch, settings, ext_offset, pos)
            pos += len(batch.slots)
            for i, buf in enumerate(bufs):
                ext_offset[i] += buf.shape[0]
            extras_bufs.append(bufs)
            parts.append(cand)
        # batches without candidates (images too small for any level) add nothing
        bufs = [torch.cat([b[i] for b in extras_bufs if len(b[i])] or [extras_bufs[0][i]])
                for i in range(len(ext_offset))]
        del extras_bufs
        cand = Candidates.cat([p for p in parts if len(p)] or parts[:1])
        del parts
        counts = [o[4] for o in order]
        if settings.nms:
            cand, counts = _nms(model, cand, bufs, counts, settings)
        geometry = np.asarray([(b.height, b.width) for b in batches for _ in b.slots],
                              np.int64).reshape(-1, 2)
        geometry = np.repeat(geometry, counts, axis=0)                 # K x (h, w)
        # The scores travel to the host in the RLE's one copy. sigmoid runs image by image (one
        # op each): its vectorised and scalar (array tail) code paths differ in the last bit, so
        # over the whole window an image's scores would depend on where its logits start.
        logits = cand.logits.float()
        ends = np.cumsum(counts).tolist()
        scores_dev = torch.cat([torch.sigmoid(logits[a:b]) for a, b in zip([0] + ends[:-1], ends)]
                               or [logits]).view(torch.uint8)
        rles, boxes, scores = _encode(model, cand, bufs, geometry, settings, scores_dev)
        scores = scores.view(np.float32)
    out: list[ImageProposals | None] = [None] * n_images
    start = 0
    for (slot, iid, h, w, _), n in zip(order, counts):
        out[slot] = ImageProposals(int(iid), h, w, scores[start:start + n], boxes[start:start + n],
                                   rles[start:start + n], name)
        start += n
    return out  # type: ignore[return-value]


def cand_count(batch: Batch, settings: InferenceSettings) -> int:
    """Candidates kept per image of ``batch`` (host-known: k, or all cells when fewer)."""
    cap = settings.proposals * (settings.nms_pool if settings.nms else 1)
    return min(cap, sum(lm.scores.shape[1] * lm.scores.shape[2] for lm in batch.levels))


def _select(model, batch: Batch, settings: InferenceSettings, ext_offset: list[int], pos0: int
            ) -> tuple[Candidates, list[torch.Tensor]]:
    """The batch's candidates (image-major, ranking order; ``slot`` = pos0 + image index) and its
    flat extras buffers ([B * cells, C] per extras map, channels last; their rows start at
    ``ext_offset`` in the window's buffers)."""
    levels = batch.levels
    b = len(batch.slots)
    dev = levels[0].scores.device if levels else torch.device("cpu")
    n = cand_count(batch, settings)
    layout = _extras_layout(model)
    if n == 0:
        empty = torch.zeros(0, device=dev)
        z = empty.long()
        return (Candidates(z, empty, empty.view(0, 0), empty.double(), empty.double(),
                           empty.double(), empty.double(), z, z, z.view(0, len(layout)),
                           z.view(0, len(layout))),
                [torch.zeros(0, 1, device=dev) for _ in layout])
    i_sz, pad, f = model.cfg.i_sz, model.cfg.i_sz // 2, model.cfg.f_sz
    # Flat cell index over all levels, level-major then row, col: a stable descending sort ranks
    # ties by (level, row, col), as the original's (and every batch's) order.
    scores = torch.cat([lm.scores.reshape(b, -1) for lm in levels], 1)         # B x cells
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :n]  # B x n
    logits = scores.gather(1, order).reshape(-1)                               # B*n
    emb = torch.cat([lm.emb.permute(0, 2, 3, 1).reshape(b, -1, lm.emb.shape[1]) for lm in levels], 1)
    vecs = emb.gather(1, order[..., None].expand(b, n, emb.shape[2])).reshape(b * n, -1).float()
    del emb
    # Per-level constants, host-known, in one small tensor: cell offset, grid width, ry, rx, and
    # per extras map the level's offset and row stride in the flat buffer.
    sizes = [lm.scores.shape[1] * lm.scores.shape[2] for lm in levels]
    offs = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    table = [offs, [lm.scores.shape[2] for lm in levels],
             [lm.level.ry for lm in levels], [lm.level.rx for lm in levels]]
    # extras maps laid out in a flat buffer per map, each level's zero-padded to its full window
    # extent (ceil(hp / 16) * step rows and likewise columns)
    grid = [(lm.scores.shape[1] + f - 1, lm.scores.shape[2] + f - 1) for lm in levels]
    ext_dims = [[(gh * step, gw * step) for gh, gw in grid] for step, _ in layout]
    ext_sizes = [[r * c for r, c in dims] for dims in ext_dims]
    for i in range(len(layout)):
        table.append(np.concatenate([[0], np.cumsum(ext_sizes[i])[:-1]]))
        table.append([c for _, c in ext_dims[i]])
    consts = torch.tensor(np.asarray(table, dtype=np.float64).T, device=dev)   # L x columns
    flat = order.reshape(-1)
    lvl = torch.searchsorted(consts[:, 0].long().contiguous(), flat, right=True) - 1  # B*n
    c = consts[lvl]                                                            # B*n x columns
    local = flat - c[:, 0].long()
    gw = c[:, 1].long()
    row, col = torch.div(local, gw, rounding_mode="floor"), local % gw
    ry, rx = c[:, 2], c[:, 3]
    tops = (row.double() * STRIDE - pad) * ry
    lefts = (col.double() * STRIDE - pad) * rx
    img = torch.arange(b, device=dev).repeat_interleave(n, output_size=b * n)  # B*n
    bufs, bases, strides = [], [], []
    for i, (step, _) in enumerate(layout):
        per_image = sum(ext_sizes[i])
        base_lvl, stride = c[:, 4 + 2 * i].long(), c[:, 5 + 2 * i].long()
        bases.append(ext_offset[i] + img * per_image + base_lvl + row * step * stride + col * step)
        strides.append(stride)
        chans = levels[0].extras[i].shape[1]
        buf = torch.zeros(b, per_image, chans, device=dev)                  # channels last
        for lm, off, (nr, nc) in zip(levels, table[4 + 2 * i], ext_dims[i]):
            m = lm.extras[i]
            buf[:, int(off):int(off) + nr * nc].view(b, nr, nc, chans)[:, :m.shape[2], :m.shape[3]] \
                = m.permute(0, 2, 3, 1)
        bufs.append(buf.reshape(-1, chans))
    slot = img + pos0
    cand = Candidates(
        slot=slot, logits=logits, vecs=vecs, tops=tops, lefts=lefts,
        win_h=i_sz * ry, win_w=i_sz * rx,
        heights=torch.full_like(slot, batch.height), widths=torch.full_like(slot, batch.width),
        ext_base=torch.stack(bases, 1) if bases else slot.new_zeros(b * n, 0),
        ext_stride=torch.stack(strides, 1) if strides else slot.new_zeros(b * n, 0))
    return cand, bufs


def _window_extras(model, cand: Candidates, bufs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each candidate's window of every extras map: [K, C, size, size] (zeros outside the map)."""
    out = []
    for i, (_, size) in enumerate(_extras_layout(model)):
        ar = torch.arange(size, device=cand.logits.device)
        index = (cand.ext_base[:, i, None, None] + ar[None, :, None] * cand.ext_stride[:, i, None, None]
                 + ar[None, None, :])                                           # K x size x size
        out.append(bufs[i][index].permute(0, 3, 1, 2).contiguous())             # K x C x size x size
    return out


def _mask_logits(model, cand: Candidates, bufs: list[torch.Tensor],
                 settings: InferenceSettings) -> torch.Tensor:
    """float32 [K, o, o] mask logits of the candidates' windows."""
    with autocast(cand.logits.device, settings.precision):
        return model.window_masks(cand.vecs, _window_extras(model, cand, bufs)).float()


def _nms(model, cand: Candidates, bufs: list[torch.Tensor], counts: list[int],
         settings: InferenceSettings) -> tuple[Candidates, list[int]]:
    """The optional box NMS: per image, candidates whose mask box overlaps a better one's by more
    than ``settings.nms`` IoU are dropped; the first k survivors are kept (opt-in, one host sync
    per window for the survivors' count)."""
    import torchvision

    thr = _threshold_logit(settings)
    o = model.mask_size
    boxes = []
    for s in range(0, len(cand), 256):
        part = cand.take(slice(s, s + 256))
        on = _mask_logits(model, part, bufs, settings) > thr
        rows_any, cols_any = on.any(2), on.any(1)                              # K x o
        ar = torch.arange(o, device=on.device)
        r0 = torch.where(rows_any, ar, o).amin(1)
        r1 = torch.where(rows_any, ar, -1).amax(1) + 1
        c0 = torch.where(cols_any, ar, o).amin(1)
        c1 = torch.where(cols_any, ar, -1).amax(1) + 1
        ww, wh = part.win_w.float(), part.win_h.float()
        bx = torch.stack([part.lefts + c0 * ww / o, part.tops + r0 * wh / o,
                          part.lefts + c1 * ww / o, part.tops + r1 * wh / o], 1)
        bx = torch.minimum(bx.clamp(min=0), torch.stack([part.widths, part.heights] * 2, 1))
        bx[~rows_any.any(1)] = 0
        boxes.append(bx)
    keep = torchvision.ops.batched_nms(torch.cat(boxes).float(), cand.logits.float(),
                                       cand.slot, settings.nms)
    keep = keep.sort().values  # candidate order: image-major, ranking order within an image
    slot = cand.slot[keep]
    # rank of each survivor within its image; keep the first k
    first = torch.searchsorted(slot, slot, right=False)
    rank = torch.arange(len(keep), device=keep.device) - first
    keep = keep[rank < settings.proposals]
    per_image = torch.bincount(cand.slot[keep], minlength=len(counts)).tolist()
    return cand.take(keep), per_image


def _encode(model, cand: Candidates, bufs: list[torch.Tensor], geometry: np.ndarray,
            settings: InferenceSettings, extra: torch.Tensor
            ) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """Compressed RLE and tight xywh boxes (float32 [K, 4]) of all candidates' masks, computed in
    slabs of windows whose full-resolution canvases fit the memory budget (then dropped); with
    ``extra`` (a uint8 tensor) brought to the host in the same copy.

    ``geometry``: int64 [K, 2] host-known per candidate: its image's height and width."""
    k = len(cand)
    encoder = SlabEncoder(cand.logits.device)
    o = model.mask_size
    thr = _threshold_logit(settings)
    h, w = geometry.T
    budget = settings.memory_budget_mb * 2 ** 20
    s = 0
    while s < k:
        # per window beside its canvas: the mask head's output and (SharpMask) the refinement's
        # working set, ~32 B per logit
        e, hmax, wmax, mixed = slab_end(h, w, s, budget, per_mask=32 * o * o)
        part = cand.take(slice(s, e))
        logits = _mask_logits(model, part, bufs, settings)
        masks = paste_batch(logits, part.tops, part.lefts, part.win_h, part.win_w, part.heights,
                            part.widths, hmax, wmax, thr)
        del logits
        encoder.add(masks, part.heights if mixed else None, part.widths if mixed else None)
        del masks
        s = e
    rles, boxes, _, extra_h = encoder.finish(extra)
    return rles, boxes, extra_h

