"""Paste-back: per-window mask values into the image frame, binarised (shared by every proposer
that predicts masks on a small grid: DeepMask/SharpMask windows, Mask R-CNN's 28 x 28 boxes).

:func:`paste_batch` is the one op: K grids of o x o values, each covering a window of its image
(top-left and size in image pixels, fractional), resized bilinearly (align_corners=False: pixel
(y, x) of the image takes the value sampled at its centre (y + .5, x + .5)) and thresholded, on one
canvas for masks of any images. Every canvas pixel is computed, as two small matrix products per
mask (rows, then columns): the shapes do not depend on the windows, so a slab needs no host sync.
:func:`paste_geometry` is torchvision's Mask R-CNN geometry expressed as such windows.
"""

from __future__ import annotations

import numpy as np
import torch


def _axis_matrix(starts: torch.Tensor, origin: torch.Tensor, extent: torch.Tensor, n_out: int,
                 limit: torch.Tensor, o: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Interpolation matrices [K, n_out, o] and validity [K, n_out] for output pixels
    starts[k] + j (j < n_out) of windows [origin, origin + extent) (float64 [K]) sampled from o
    cells with F.interpolate's align_corners=False convention (edge cells extend to the border);
    pixels at or beyond ``limit`` (int64 [K], the image side) are invalid."""
    dev = starts.device
    pix = starts[:, None] + torch.arange(n_out, device=dev)           # K x n_out
    centre = pix.double() + 0.5
    org, ext = origin[:, None], extent[:, None]
    valid = (centre >= org) & (centre < org + ext) & (pix >= 0) & (pix < limit[:, None])
    u = ((centre - org) * (o / ext) - 0.5).clamp(0, o - 1)
    i0 = u.floor().long()
    i1 = (i0 + 1).clamp(max=o - 1)
    w1 = (u - i0.double()).float()
    m = torch.zeros(len(starts), n_out, o, device=dev)
    m.scatter_add_(2, i0[..., None], (1 - w1)[..., None])
    m.scatter_add_(2, i1[..., None], w1[..., None])
    return m, valid


def paste_batch(logits: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor,
                win_h: torch.Tensor, win_w: torch.Tensor, heights: torch.Tensor,
                widths: torch.Tensor, height: int, width: int, thr_logit: float) -> torch.Tensor:
    """Binarised masks of K windows of any images, on one canvas (the batched form).

    Args:
        logits: float32 [K, o, o] per-window values (row-major, rows = y; logits, or Mask R-CNN's
            probabilities).
        tops, lefts, win_h, win_w: float64 [K], window top-left and size in image pixels.
        heights, widths: int64 [K], each mask's image size (<= height, width): pixels outside a
            mask's own image are off.
        height, width: the canvas (the largest image of the slab).
        thr_logit: a pixel is on when its bilinearly resized value is > thr_logit.
    Returns:
        bool [K, height, width]: mask k in the top-left heights[k] x widths[k] block.

    Every pixel of the canvas is computed (two small matrix products per mask), so the ops and
    their shapes do not depend on where the windows are: no host sync, and a pixel's value is the
    same whatever else shares the slab.
    """
    o = logits.shape[-1]
    dev = logits.device
    zero = torch.zeros(len(logits), dtype=torch.int64, device=dev)
    my, vy = _axis_matrix(zero, tops, win_h, height, heights, o)
    mx, vx = _axis_matrix(zero, lefts, win_w, width, widths, o)
    vals = my @ logits.float() @ mx.transpose(1, 2)                   # K x height x width
    return (vals > thr_logit) & vy[:, :, None] & vx[:, None, :]


def _expanded_int_boxes(boxes: torch.Tensor, m: int) -> torch.Tensor:
    """torchvision's paste geometry: boxes grown by one mask cell per side, truncated to int."""
    scale = (m + 2) / m
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    return torch.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], 1).long()


def paste_geometry(probs: torch.Tensor, boxes: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchvision's paste geometry for Mask R-CNN masks, as windows for :func:`paste_batch`.

    Args:
        probs: mask probabilities [K, M, M]; boxes: xyxy [K, 4] in image pixels.
    Returns:
        (padded float32 [K, M+2, M+2], tops, lefts, win_h, win_w float64 [K]): the mask padded
        by one zero cell, the box expanded to match and rounded to integer pixels, as
        torchvision's ``paste_masks_in_image`` does.
    """
    m = probs.shape[-1]
    padded = torch.nn.functional.pad(probs.float(), (1, 1, 1, 1))   # K x (M+2) x (M+2)
    ib = _expanded_int_boxes(boxes, m)
    w = (ib[:, 2] - ib[:, 0] + 1).clamp(min=1).double()
    h = (ib[:, 3] - ib[:, 1] + 1).clamp(min=1).double()
    return padded, ib[:, 1].double(), ib[:, 0].double(), h, w


def slab_end(heights: np.ndarray, widths: np.ndarray, start: int, budget: int,
             per_mask: int = 0) -> tuple[int, int, int, bool]:
    """The longest slab of masks from ``start`` whose canvases fit ``budget`` bytes.

    A slab pastes every mask on one canvas as large as its largest image: ~10 bytes per canvas
    pixel and mask (the float product, the mask and its validity, the RLE's change map and work),
    plus ``per_mask`` bytes of each mask's own working set. ``heights``, ``widths``: int64 [K],
    each mask's image size. Returns (end, canvas height, canvas width, mixed): masks
    [start, end) form the slab (at least one), ``mixed`` when their images differ in size."""
    hm, wm = np.maximum.accumulate(heights[start:]), np.maximum.accumulate(widths[start:])
    cost = np.arange(1, len(hm) + 1) * (10 * hm * wm + per_mask)          # non-decreasing
    end = start + max(1, int(np.searchsorted(cost, budget, side="right")))
    hmax, wmax = int(hm[end - start - 1]), int(wm[end - start - 1])
    mixed = bool((heights[start:end] != hmax).any() or (widths[start:end] != wmax).any())
    return end, hmax, wmax, mixed
