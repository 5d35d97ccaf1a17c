"""Greedy non-maximum suppression by group, for a batch of images, with a bounded number of syncs.

torchvision's ``batched_nms`` runs per image, and above a few thousand boxes (a Mask R-CNN image
with a score threshold of 0 has ~90,000 class boxes) it loops over the groups: a ``unique``, then
per class a ``where`` and an ``nms``, each a host sync on a GPU. :func:`grouped_nms` gives the
same answer for every image of a batch at once with a fixed set of tensor ops per check and one
device-to-host copy per check (usually one check per call).

The answer is exactly that of torchvision's per-group ``nms`` as its CPU kernel computes it:
candidates of a group are visited by score, descending, ties in input order (a stable sort);
a candidate is kept unless a kept candidate before it in its group overlaps it with
IoU > ``iou_threshold``, the IoU computed in float32 as ``inter / (area_a + area_b - inter)``
with ``area = (x2 - x1) * (y2 - y1)``. The kept candidates are returned by score, descending,
ties in input order, at most ``keep`` per image.

How, without a loop per group or per candidate:

1. **A prefix is enough.** Whether a candidate is kept depends only on its group's candidates
   before it. So the ``m`` best candidates of an image (all groups together, by score) decide
   their own fate, and if at least ``keep`` of them survive, those are the answer. ``m`` starts
   at ``prefix`` and doubles (one more check) while an image keeps fewer than ``keep`` of a
   prefix that does not yet hold all its valid candidates.
2. **A band, not a matrix.** The prefix is re-ordered by (group, score rank), so a candidate's
   group-mates before it lie within ``group_size - 1`` places: its overlaps with them form a row
   of a ``[m, group_size - 1]`` band (``[B, m, w]`` for the batch), not of an ``m x m`` matrix.
3. **The greedy pass as a fixed point.** ``kept = valid & ~any(kept[before] & suppresses)``
   iterated from ``kept = valid`` settles every candidate whose longest chain of suppressors is
   shorter than the number of rounds, and its fixed point is the greedy answer. Rounds run in
   blocks of ``rounds``; one copy to the host per block says whether anything still changed and
   how many each image kept.

Shapes: boxes ``[B, N, 4]`` (x1, y1, x2, y2; any float dtype, compared in float32), scores
``[B, N]``, groups ``[B, N]`` (int), valid ``[B, N]`` (bool; invalid candidates are never kept
and never suppress). All on one device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Kept:
    """What :func:`grouped_nms` kept. ``index``: ``[B, K]`` positions into the N candidates of each
    image, by score, descending (a row's entries past ``counts[b]`` are padding); ``counts``: per
    image, on the host; ``summary``: the host copy of ``summary(index, mask)`` for the final
    answer (empty if none was asked); ``checks``: host reads it took."""

    index: torch.Tensor
    counts: list[int]
    summary: np.ndarray
    checks: int


def float32_threshold(threshold: float) -> float:
    """The float32 ``t`` with ``x > t  <=>  x > threshold`` for every float32 ``x`` (torchvision's
    CPU kernel compares the float32 IoU with the double threshold)."""
    t = np.float32(threshold)
    return float(t if float(t) <= threshold else np.nextafter(t, np.float32(-np.inf)))


def grouped_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor,
                valid: torch.Tensor, iou_threshold: float, keep: int, *, group_size: int,
                prefix: int | None = None, rounds: int = 16, budget_bytes: int = 2 ** 30,
                summary: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                ) -> Kept:
    """Greedy NMS within each group of each image (see the module docstring).

    Args:
        group_size: an upper bound on the candidates of one group in one image (e.g. the number
            of proposals, for class boxes; the per-level top n, for RPN levels).
        keep: at most this many kept candidates per image are returned.
        prefix: candidates per image looked at first (default: all).
        rounds: fixed-point rounds between two host reads.
        budget_bytes: the band's working set per slab of images.
        summary: ``f(index [B, K], mask [B, K]) -> int64 tensor`` of anything the caller needs on
            the host with the answer (e.g. level counts); read in the same copy.
    """
    b, n = scores.shape
    dev = scores.device
    if n == 0 or keep <= 0:
        empty = torch.zeros((b, 0), dtype=torch.int64, device=dev)
        extra = summary(empty, empty.bool()) if summary else torch.zeros(0, dtype=torch.int64)
        return Kept(empty, [0] * b, extra.cpu().numpy(), 0)
    key = torch.where(valid, scores.float(), float("-inf"))
    by_rank = torch.sort(key, dim=1, descending=True, stable=True).indices     # B x N
    n_valid = valid.sum(1)
    t = float32_threshold(iou_threshold)
    m = n if prefix is None else min(n, max(prefix, keep))
    checks = 0
    while True:
        index, counts, extra, done, c = _prefix_pass(
            boxes, groups, valid, by_rank, n_valid, m, t, keep, group_size, rounds,
            budget_bytes, summary)
        checks += c
        if done or m == n:
            break
        m = min(n, 2 * m)
    return Kept(index, counts, extra, checks)


def _prefix_pass(boxes, groups, valid, by_rank, n_valid, m, t, keep, group_size, rounds,
                 budget_bytes, summary):
    """NMS over the ``m`` best candidates of every image. Returns (index, counts, summary, whether
    every image kept ``keep`` or ran out of valid candidates, host reads)."""
    b = by_rank.shape[0]
    dev = by_rank.device
    top = by_rank[:, :m]                                                      # B x m, by rank
    ar = torch.arange(m, device=dev)
    g = groups.gather(1, top)
    # group-contiguous order: (group, rank); the keys are distinct, so any sort is stable
    perm = torch.sort(g * m + ar, dim=1).indices
    src = top.gather(1, perm)                                                 # B x m
    bx = boxes.gather(1, src[..., None].expand(-1, -1, 4)).float()            # B x m x 4
    same_g = g.gather(1, perm)
    ok = valid.gather(1, src)
    w = min(m, group_size) - 1                                                # look-back width
    if w <= 0:
        suppress = torch.zeros((b, m, 0), dtype=torch.bool, device=dev)
        back = torch.zeros((m, 0), dtype=torch.int64, device=dev)
    else:
        back = ar[:, None] - torch.arange(1, w + 1, device=dev)              # m x w: q - d
        inside = back >= 0
        back = back.clamp(min=0)
        suppress = _band(bx, same_g, back, inside, t, budget_bytes)          # B x m x w
    kept, checks = ok, 0
    while True:
        prev = kept
        for _ in range(rounds):
            prev, kept = kept, ok > (kept[:, back] & suppress).any(-1)
        # whether the last round changed anything, per image what it kept, the answer: one read
        kept_rank = torch.zeros_like(kept).scatter_(1, perm, kept)           # B x m, by rank
        n_kept = kept_rank.sum(1)
        k = min(keep, m)
        first = torch.where(kept_rank, ar, m).sort(dim=1).values[:, :k]     # ranks of the kept
        mask = first < m
        index = top.gather(1, first.clamp(max=m - 1))
        enough = (n_kept >= keep) | (n_valid <= m)
        parts = [(kept != prev).any().view(1).long(), n_kept, enough.long()]
        extra_dev = summary(index, mask) if summary else None
        if extra_dev is not None:
            parts.append(extra_dev.to(dev).long().view(-1))
        host = torch.cat(parts).cpu().numpy()
        checks += 1
        if not host[0]:
            counts = np.minimum(host[1:1 + b], keep).tolist()
            done = bool(host[1 + b:1 + 2 * b].all())
            return index, counts, host[1 + 2 * b:], done, checks


def _band(bx: torch.Tensor, groups: torch.Tensor, back: torch.Tensor, inside: torch.Tensor,
          t: float, budget_bytes: int) -> torch.Tensor:
    """``[B, m, w]`` bool: candidate ``q - d - 1`` (same group, earlier) suppresses ``q``, i.e.
    their float32 IoU exceeds ``t``; computed in slabs (whole images, or rows of one image when
    an image's band alone exceeds ``budget_bytes``)."""
    b, m, _ = bx.shape
    w = back.shape[1]
    rows = max(1, budget_bytes // (w * 4 * 10))  # ~10 float32 intermediates of a row at once
    images, rows = (max(1, rows // m), m) if rows >= m else (1, rows)
    out = torch.empty((b, m, w), dtype=torch.bool, device=bx.device)
    x1, y1, x2, y2 = bx.unbind(-1)                                            # B x m each
    area = (x2 - x1) * (y2 - y1)
    for s in range(0, b, images):
        for r in range(0, m, rows):
            i, q, p = slice(s, s + images), slice(r, r + rows), back[r:r + rows]
            # p = the earlier candidate (torchvision's "i"), q = the later one ("j")
            xx1 = torch.maximum(x1[i][:, p], x1[i, q, None])
            yy1 = torch.maximum(y1[i][:, p], y1[i, q, None])
            xx2 = torch.minimum(x2[i][:, p], x2[i, q, None])
            yy2 = torch.minimum(y2[i][:, p], y2[i, q, None])
            inter = (xx2 - xx1).clamp_(min=0) * (yy2 - yy1).clamp_(min=0)
            iou = inter / (area[i][:, p] + area[i, q, None] - inter)
            g = groups[i]
            out[i, q] = (iou > t) & (g[:, p] == g[:, q, None]) & inside[q]
    return out
