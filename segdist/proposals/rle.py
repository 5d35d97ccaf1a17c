"""COCO run-length encoding of mask batches, vectorised in torch, byte-identical to pycocotools.

The format (pycocotools ``maskApi.c``): a mask of size (h, w) is read in column-major order
(pixel (y, x) at flat index ``x * h + y``); the counts alternate runs of 0s and 1s, starting with
a run of 0s (of length 0 when the first pixel is set). The compressed string stores each count as
a signed difference to the count two places before (only from the fourth count on: ``i > 2`` in
the C code) in a LEB128-like code of 5 data bits per character, characters ``'0'`` (48) upwards,
bit 0x20 meaning "more characters follow".

:func:`encode_with_boxes` does, for a whole batch and on the masks' own device: a column-major
flatten, one difference pass, one ``nonzero``, run lengths from the change offsets, tight boxes and
areas from the runs, and the 5-bit character coding of every count as tensor ops; then a single
device-to-host copy of the characters, and the host only slices them into per-mask strings. No
Python loop runs per run or per pixel. Masks of several sizes can share one canvas (``heights``,
``widths``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from segdist.device import gpu_path
from segdist.profiling import host_stage

__all__ = ["encode", "encode_with_boxes", "encode_masks", "encode_boxes", "decode", "SlabEncoder",
           "encode_on_device", "codes_to_host"]


def _as_bool_masks(masks: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(masks, np.ndarray):
        masks = torch.from_numpy(masks)
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"masks must be a torch.Tensor or numpy array, got {type(masks).__name__}")
    if masks.dim() != 3:
        raise ValueError(f"masks must have shape [N, H, W], got {tuple(masks.shape)}")
    if masks.is_floating_point() or masks.is_complex():
        raise TypeError(f"masks must be bool or an integer type (binarise first), got {masks.dtype}")
    return masks if masks.dtype == torch.bool else masks != 0


# A differenced count takes at most this many 5-bit characters: |x| < 2^34 (a mask has < 2^31 px).
MAX_CHARS = 7


def _runs_on_device(masks: torch.Tensor, heights: torch.Tensor | None,
                    widths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor,
                                                          torch.Tensor, torch.Tensor]:
    """Differenced counts, runs per mask, tight boxes and areas, on the masks' device.

    Args:
        masks: bool[N, H, W] (N >= 1).
        heights, widths: int64[N] size of each mask (its top-left h x w block of the canvas; the
            rest must be False), or None: every mask is the full H x W.
    Returns:
        ``(diff int64[T], nruns int64[N], boxes int64[N, 4] xywh, areas int64[N])``: the T
        differenced counts of all masks as the compressed string stores them, in mask order.
    """
    n, h, w = masks.shape
    dev = masks.device
    # Column-major view: ct[i, x, y] = masks[i, y, x] (free when masks is a transposed canvas).
    ct = masks.transpose(1, 2)
    # change[i, x, y]: pixel (y, x) differs from the one before it in column-major order of a
    # mask of height h_i (pixel -1 counts as 0, so runs start with 0s).
    change = torch.empty(n, w, h, dtype=torch.bool, device=dev)
    torch.ne(ct[:, :, 1:], ct[:, :, :-1], out=change[:, :, 1:])
    if heights is None or not h:
        last = ct[:, :-1, h - 1] if h else None                                       # N x (W-1)
    else:  # the last row of each column is the mask's own row h_i - 1
        last = ct.gather(2, (heights - 1).view(n, 1, 1).expand(n, w, 1))[:, :-1, 0]
    if h:
        torch.ne(ct[:, 1:, 0], last, out=change[:, 1:, 0])
    if h and w:
        change[:, 0, 0] = ct[:, 0, 0]
    if heights is not None:  # nothing changes outside a mask's own block
        change &= (torch.arange(h, device=dev) < heights[:, None, None])
        change &= (torch.arange(w, device=dev) < widths[:, None])[:, :, None]
        hs, area_px = heights, heights * widths
    else:
        hs = torch.full((n,), h, dtype=torch.int64, device=dev)
        area_px = torch.full((n,), h * w, dtype=torch.int64, device=dev)
    mask_of_change, cx, cy = change.nonzero(as_tuple=True)  # sorted by (mask, x, y): run order
    del change
    pos = cx * hs[mask_of_change] + cy                      # index in the mask's own flattening
    m = pos.numel()
    total = m + n
    nruns = torch.bincount(mask_of_change, minlength=n) + 1  # int64[N]
    slot_end = torch.cumsum(nruns, 0)  # int64[N], exclusive end of each mask's runs
    slot_start = slot_end - nruns
    # Run ends (exclusive): change positions, then h_i*w_i closing each mask. Change c of mask i
    # lands at slot c + i: each earlier mask adds one closing slot.
    ends = torch.empty(total, dtype=torch.int64, device=dev)
    ends[torch.arange(m, device=dev) + mask_of_change] = pos
    ends[slot_end - 1] = area_px
    starts = torch.empty_like(ends)
    starts[1:] = ends[:-1]
    starts[slot_start] = 0
    counts = ends - starts

    owner = torch.repeat_interleave(torch.arange(n, device=dev), nruns, output_size=total)
    local = torch.arange(total, device=dev) - slot_start[owner]  # run index within its mask
    # Differenced counts as rleToString writes them: x_i - x_{i-2} for i > 2 only.
    prev2 = torch.zeros_like(counts)
    prev2[2:] = counts[:-2]
    diff = counts - torch.where(local > 2, prev2, torch.zeros_like(prev2))

    # Foreground runs are the odd ones; their first/last pixels give the tight box.
    fg = (local % 2) == 1
    fg_owner = owner[fg]
    first = starts[fg]
    last_px = ends[fg] - 1
    fh = hs[fg_owner]
    x0 = torch.div(first, fh, rounding_mode="floor")
    x1 = torch.div(last_px, fh, rounding_mode="floor")
    # A run that wraps into a later column touches the bottom row and the top row.
    wraps = x1 > x0
    y0 = torch.where(wraps, torch.zeros_like(first), first - x0 * fh)
    y1 = torch.where(wraps, fh - 1, last_px - x1 * fh)
    big = torch.full((n,), max(h, w), dtype=torch.int64, device=dev)
    zero = torch.zeros(n, dtype=torch.int64, device=dev)
    xs = big.scatter_reduce(0, fg_owner, x0, "amin")
    ys = big.scatter_reduce(0, fg_owner, y0, "amin")
    xe = zero.scatter_reduce(0, fg_owner, x1, "amax")
    ye = zero.scatter_reduce(0, fg_owner, y1, "amax")
    areas = zero.index_add(0, fg_owner, last_px - first + 1)
    boxes = torch.stack([xs, ys, xe - xs + 1, ye - ys + 1], dim=1)  # N x 4, xywh
    boxes = torch.where((areas > 0)[:, None], boxes, torch.zeros_like(boxes))  # toBbox: 0s if empty
    return diff, nruns, boxes, areas


def _characters(diff: torch.Tensor, nruns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The compressed strings of all masks, coded on the device.

    Args:
        diff: int64[T] differenced counts of all masks, concatenated (T >= 1).
        nruns: int64[N] counts per mask (sums to T).
    Returns:
        ``(chars uint8[T * MAX_CHARS + 1], per_mask int64[N])``: the strings of all masks back to
        back at the start of ``chars`` (the rest is scratch), and each string's length.
    """
    dev = diff.device
    t = diff.numel()
    j = torch.arange(MAX_CHARS, device=dev)
    # Characters per value: one, plus one for every 5-bit group after which the remaining
    # (arithmetically shifted) value is not yet pure sign, i.e. x >> (5j + 4) not in {0, -1}.
    rest = diff[:, None] >> (5 * j[:-1] + 4)                          # T x (MAX_CHARS - 1)
    nchar = 1 + ((rest != 0) & (rest != -1)).sum(1)                    # T
    groups = (diff[:, None] >> (5 * j)) & 0x1F                         # T x MAX_CHARS
    chars = (groups | ((j < nchar[:, None] - 1).long() << 5)) + 48      # 0x20: more follow
    offsets = torch.cumsum(nchar, 0) - nchar                           # T, exclusive
    # Character j of value i goes to offsets[i] + j; unused slots go to one scratch byte at the end.
    target = torch.where(j < nchar[:, None], offsets[:, None] + j, t * MAX_CHARS)
    out = torch.zeros(t * MAX_CHARS + 1, dtype=torch.uint8, device=dev)
    out.scatter_(0, target.reshape(-1), chars.reshape(-1).to(torch.uint8))
    owner = torch.repeat_interleave(torch.arange(len(nruns), device=dev), nruns, output_size=t)
    per_mask = torch.zeros(len(nruns), dtype=torch.int64, device=dev).index_add_(0, owner, nchar)
    return out, per_mask


@dataclass(frozen=True)
class DeviceCodes:
    """A slab's encoding, still on the device: ``data`` uint8 = the int64 numbers (string lengths
    [n], boxes [n, 4] xywh, areas [n]) as bytes, then the characters (``chars`` bytes, of which
    the first sum(lengths) are the strings back to back). ``n`` masks."""

    data: torch.Tensor
    n: int
    chars: int


def encode_on_device(masks: torch.Tensor, heights: torch.Tensor | None = None,
                     widths: torch.Tensor | None = None) -> DeviceCodes:
    """The encoding of a slab of masks, computed on their device and left there (one ``nonzero``:
    the only host sync); :func:`codes_to_host` brings any number of slabs over in one copy.
    Arguments as :func:`encode_with_boxes` (masks bool [N, H, W], N >= 1)."""
    if (heights is None) != (widths is None):
        raise ValueError("give both heights and widths, or neither")
    n = masks.shape[0]
    diff, nruns, boxes, areas = _runs_on_device(masks, heights, widths)
    chars, per_mask = _characters(diff, nruns)
    numbers = torch.cat([per_mask, boxes.reshape(-1), areas])
    return DeviceCodes(torch.cat([numbers.view(torch.uint8), chars]), n, chars.numel())


def codes_to_host(parts: list[DeviceCodes], extra: torch.Tensor | None = None
                  ) -> tuple[list[bytes], np.ndarray, np.ndarray, np.ndarray | None]:
    """Counts, boxes (float32 [N, 4]) and areas (int64 [N]) of slabs encoded on the device, with
    one device-to-host copy for all of them (and of ``extra``, any uint8 tensor on the same
    device, returned as a uint8 array: e.g. scores to bring along)."""
    tensors = [p.data for p in parts] + ([extra] if extra is not None else [])
    if not tensors:
        return [], np.zeros((0, 4), np.float32), np.zeros(0, np.int64), None
    host = torch.cat(tensors).cpu().numpy() if len(tensors) > 1 else tensors[0].cpu().numpy()
    counts: list[bytes] = []
    boxes, areas = [], []
    with host_stage("rle_host"):
        at = 0
        for p in parts:
            nums = host[at:at + 48 * p.n].view(np.int64)
            flat = host[at + 48 * p.n:at + 48 * p.n + p.chars].tobytes()
            ends = np.cumsum(nums[:p.n]).tolist()
            counts.extend(flat[a:b] for a, b in zip([0] + ends[:-1], ends))
            boxes.append(nums[p.n:5 * p.n].reshape(p.n, 4).astype(np.float32))
            areas.append(nums[5 * p.n:].copy())
            at += 48 * p.n + p.chars
    rest = host[at:] if extra is not None else None
    if not parts:
        return [], np.zeros((0, 4), np.float32), np.zeros(0, np.int64), rest
    return counts, np.concatenate(boxes), np.concatenate(areas), rest


def encode_with_boxes(masks: torch.Tensor | np.ndarray, *, heights: torch.Tensor | None = None,
                      widths: torch.Tensor | None = None
                      ) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """Compressed COCO RLE, tight boxes and areas of a batch of masks, in one pass.

    Args:
        masks: bool or integer tensor (or numpy array) ``[N, H, W]`` on any device; a pixel is
            foreground when nonzero. Row-major as images are (``masks[i, y, x]``); any strides.
        heights, widths: optional int64[N] on the masks' device: mask i is the top-left
            ``heights[i] x widths[i]`` block (masks of several image sizes in one canvas; pixels
            outside their block must be 0). None: every mask is H x W.

    Returns:
        ``(counts, boxes, areas)``: ``counts`` a list of N ASCII ``bytes``, each equal to
        ``pycocotools.mask.encode(np.asfortranarray(mask[..., None]))[0]["counts"]``;
        ``boxes`` float32[N, 4], COCO ``[x, y, w, h]`` tight box in pixels (pixel columns x..x+w-1;
        all zeros for an empty mask, as ``pycocotools.mask.toBbox``); ``areas`` int64[N] pixel counts.

    Everything but the final slicing runs on the masks' device: runs, boxes and the 5-bit
    character coding; then one device-to-host copy of the characters, lengths, boxes and areas.
    Memory on the device: about 2 bytes per mask pixel plus ~100 bytes per run; callers batch masks
    by a memory budget.
    """
    masks = _as_bool_masks(masks)
    if masks.shape[0] == 0:
        return [], np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    counts, boxes, areas, _ = codes_to_host([encode_on_device(masks, heights, widths)])
    return counts, boxes, areas


class SlabEncoder:
    """Encodes a sequence of mask slabs with the fastest exact backend for their device.

    On the GPU path each slab is encoded on the device (:func:`encode_on_device`: one sync) and
    kept there; :meth:`finish` copies all slabs (and an ``extra`` tensor) to the host at once. On
    the CPU each slab goes to pycocotools' C encoder as it comes (:func:`encode_masks`).
    """

    def __init__(self, device: torch.device):
        self.gpu = gpu_path(device)
        self._device_parts: list[DeviceCodes] = []
        self._host_parts: list[tuple[list[bytes], np.ndarray, np.ndarray]] = []

    def add(self, masks: torch.Tensor, heights: torch.Tensor | None = None,
            widths: torch.Tensor | None = None) -> None:
        """Encode one slab (bool [N, H, W]; heights/widths as :func:`encode_with_boxes`)."""
        if masks.shape[0] == 0:
            return
        if self.gpu:
            self._device_parts.append(encode_on_device(masks, heights, widths))
        else:
            self._host_parts.append(encode_masks(masks, heights=heights, widths=widths))

    def finish(self, extra: torch.Tensor | None = None
               ) -> tuple[list[bytes], np.ndarray, np.ndarray, np.ndarray | None]:
        """(counts, boxes, areas, extra as uint8 numpy or None) of all slabs, in order."""
        if self.gpu:
            return codes_to_host(self._device_parts, extra)
        rest = None if extra is None else extra.cpu().numpy()
        if not self._host_parts:
            return [], np.zeros((0, 4), np.float32), np.zeros(0, np.int64), rest
        return ([c for part in self._host_parts for c in part[0]],
                np.concatenate([p[1] for p in self._host_parts]),
                np.concatenate([p[2] for p in self._host_parts]), rest)


def _encode_with_pycocotools(masks: torch.Tensor) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    from pycocotools import mask as mask_utils

    # [N, H, W] -> Fortran-ordered uint8 [H, W, N]: pixel (y, x) of mask i at y + x*H + i*H*W.
    fortran = masks.view(torch.uint8).transpose(1, 2).contiguous().numpy().transpose(2, 1, 0)
    rles = mask_utils.encode(fortran)
    boxes = mask_utils.toBbox(rles).astype(np.float32).reshape(-1, 4)
    # Not mask_utils.area: with numpy 2 it raises OverflowError for 256+ masks (pycocotools sizes
    # a temporary uint8 array by the mask count). The pixel count is the same number.
    areas = masks.flatten(1).sum(1).numpy().astype(np.int64)
    return [r["counts"] for r in rles], boxes, areas


def encode_masks(masks: torch.Tensor | np.ndarray, *, heights: torch.Tensor | None = None,
                 widths: torch.Tensor | None = None) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """:func:`encode_with_boxes` with the fastest exact backend for where the masks live.

    Masks on a GPU use the torch encoder (one device-to-host copy of characters, not of pixels).
    Masks on the CPU go to pycocotools' C encoder, measured about 6x faster there than torch's CPU
    kernels for the same bytes (docs/benchmarks.md), one call per mask size. Same outputs either
    way (tests check both). ``heights``/``widths``: as in :func:`encode_with_boxes`.
    """
    masks = _as_bool_masks(masks)
    if masks.shape[0] == 0 or gpu_path(masks.device):
        return encode_with_boxes(masks, heights=heights, widths=widths)
    if heights is None:
        return _encode_with_pycocotools(masks)
    n = masks.shape[0]
    counts: list[bytes] = [b""] * n
    boxes, areas = np.zeros((n, 4), np.float32), np.zeros(n, np.int64)
    sizes = torch.stack([heights, widths], 1).cpu().numpy()
    for h, w in np.unique(sizes, axis=0).tolist():
        members = np.flatnonzero((sizes[:, 0] == h) & (sizes[:, 1] == w))
        c, b, a = _encode_with_pycocotools(masks[torch.from_numpy(members), :h, :w])
        for i, ci in zip(members.tolist(), c):
            counts[i] = ci
        boxes[members], areas[members] = b, a
    return counts, boxes, areas


def encode(masks: torch.Tensor | np.ndarray) -> list[bytes]:
    """Compressed COCO RLE strings of ``masks`` (bool/int ``[N, H, W]``, any device).

    Byte-identical to ``pycocotools.mask.encode``; see :func:`encode_with_boxes`.
    """
    return encode_with_boxes(masks)[0]


def _value(x: int) -> str:
    """One differenced count as rleToString writes it (5 bits per character, 0x20 = more)."""
    chars = []
    more = True
    while more:
        c = x & 0x1F
        x >>= 5  # arithmetic shift, as the C code's on a long
        more = x != -1 if c & 0x10 else x != 0
        chars.append(chr((c | 0x20 if more else c) + 48))
    return "".join(chars)


def encode_boxes(boxes: np.ndarray, height: int, width: int) -> list[bytes]:
    """Compressed COCO RLE of box-shaped masks, straight from the boxes (no mask is made).

    Args:
        boxes: int [N, 4] ``(x0, y0, x1, y1)``: the mask is pixel columns x0..x1-1 and rows
            y0..y1-1, with 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height.
    Returns:
        N ASCII ``bytes``, each equal to ``pycocotools.mask.encode`` of that box's mask.

    Column-major, a box's runs are: the zeros before its first pixel, then per column its ``bh``
    ones and the ``height - bh`` zeros to the next column, then the zeros after it (runs merge into
    one when the box spans the full height). Differenced two places back (from the fourth count
    on), every inner run of a box is 0: the string is a few values around a run of '0's.
    """
    b = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    bad = (b[:, 0] < 0) | (b[:, 1] < 0) | (b[:, 2] > width) | (b[:, 3] > height) | \
          (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])
    if bad.any():
        raise ValueError(f"boxes must satisfy 0 <= x0 < x1 <= {width}, 0 <= y0 < y1 <= {height}; "
                         f"got {b[bad][0].tolist()}")
    h = int(height)
    out = []
    for x0, y0, x1, y1 in b.tolist():
        bh, bw = y1 - y0, x1 - x0
        tail = (width - x1) * h + (h - y1)  # zeros after the box's last pixel
        if bh == h:  # full-height: the columns' ones are one run
            runs = [_value(x0 * h), _value(bw * h)] + ([_value(tail)] if tail else [])
        elif bw == 1:
            runs = [_value(x0 * h + y0), _value(bh)] + ([_value(tail)] if tail else [])
        else:
            gap = h - bh
            runs = [_value(x0 * h + y0), _value(bh), _value(gap), "0" * (2 * bw - 3)]
            if tail:
                runs.append(_value(tail - gap))
        out.append("".join(runs).encode("ascii"))
    return out


def decode(counts: list[bytes] | list[str], height: int, width: int) -> np.ndarray:
    """Masks from compressed RLE strings (via pycocotools): uint8[N, height, width] of 0/1."""
    from pycocotools import mask as mask_utils

    if len(counts) == 0:
        return np.zeros((0, height, width), np.uint8)
    rles = [{"size": [int(height), int(width)], "counts": c} for c in counts]
    return np.ascontiguousarray(np.moveaxis(mask_utils.decode(rles), -1, 0))
