"""COCO run-length encoding of mask batches, vectorised in torch, byte-identical to pycocotools.

The format (pycocotools ``maskApi.c``): a mask of size (h, w) is read in column-major order
(pixel (y, x) at flat index ``x * h + y``); the counts alternate runs of 0s and 1s, starting with
a run of 0s (of length 0 when the first pixel is set). The compressed string stores each count as
a signed difference to the count two places before (only from the fourth count on: ``i > 2`` in
the C code) in a LEB128-like code of 5 data bits per character, characters ``'0'`` (48) upwards,
bit 0x20 meaning "more characters follow".

:func:`encode_with_boxes` does, for a whole batch and on the masks' own device: a column-major
flatten, one difference pass, one ``nonzero``, run lengths from the change offsets, tight boxes and
areas from the runs; then a single device-to-host copy, and the compressed strings of all masks at
once with numpy. No Python loop runs per run or per pixel; the only per-mask Python work is slicing
the final byte string.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["encode", "encode_with_boxes", "encode_masks", "encode_boxes", "decode"]


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


def _runs_on_device(masks: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Everything the host needs, packed in one int64 tensor on the masks' device.

    Args:
        masks: bool[N, H, W] (N >= 1).

    Returns:
        ``(packed, total_runs)`` where ``packed`` is int64[T + N + 4N + N]: the T differenced counts
        of all masks (as the compressed string stores them), the number of runs per mask, the tight
        boxes (x, y, w, h) and the areas.
    """
    n, h, w = masks.shape
    area_px = h * w
    dev = masks.device
    # Column-major flatten: flat[i, x * h + y] = masks[i, y, x].
    flat = masks.transpose(1, 2).reshape(n, area_px)
    # change[i, j]: pixel j differs from pixel j-1 (pixel -1 counts as 0, so runs start with 0s).
    change = torch.empty_like(flat)
    change[:, :1] = flat[:, :1]
    torch.ne(flat[:, 1:], flat[:, :-1], out=change[:, 1:])
    mask_of_change, pos = change.nonzero(as_tuple=True)  # sorted by (mask, position)
    del flat, change
    m = pos.numel()
    total = m + n
    nruns = torch.bincount(mask_of_change, minlength=n) + 1  # int64[N]
    slot_end = torch.cumsum(nruns, 0)  # int64[N], exclusive end of each mask's runs
    slot_start = slot_end - nruns
    # Run ends (exclusive, in flat pixel index): change positions, then h*w closing each mask.
    # Change c of mask i lands at slot c + i: each earlier mask adds one closing slot.
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
    last = ends[fg] - 1
    x0 = torch.div(first, h, rounding_mode="floor")
    x1 = torch.div(last, h, rounding_mode="floor")
    # A run that wraps into a later column touches the bottom row and the top row.
    wraps = x1 > x0
    y0 = torch.where(wraps, torch.zeros_like(first), first - x0 * h)
    y1 = torch.where(wraps, torch.full_like(last, h - 1), last - x1 * h)
    big = torch.full((n,), max(h, w), dtype=torch.int64, device=dev)
    zero = torch.zeros(n, dtype=torch.int64, device=dev)
    xs = big.scatter_reduce(0, fg_owner, x0, "amin")
    ys = big.scatter_reduce(0, fg_owner, y0, "amin")
    xe = zero.scatter_reduce(0, fg_owner, x1, "amax")
    ye = zero.scatter_reduce(0, fg_owner, y1, "amax")
    areas = zero.index_add(0, fg_owner, last - first + 1)
    boxes = torch.stack([xs, ys, xe - xs + 1, ye - ys + 1], dim=1)  # N x 4, xywh
    boxes = torch.where((areas > 0)[:, None], boxes, torch.zeros_like(boxes))  # toBbox: 0s if empty
    packed = torch.cat([diff, nruns, boxes.reshape(-1), areas])
    return packed, total


def _compress(diff: np.ndarray, nruns: np.ndarray) -> list[bytes]:
    """Compressed RLE strings from differenced counts, all masks at once.

    Args:
        diff: int64[T] differenced counts of all masks, concatenated.
        nruns: int64[N] number of counts per mask (sums to T).
    """
    # Characters per value: one, plus one for every 5-bit group after which the remaining
    # (arithmetically shifted) value is not yet pure sign, i.e. x >> (5j + 4) not in {0, -1}.
    nchar = np.ones(diff.shape, dtype=np.int64)
    shift = 4
    while True:
        rest = diff >> shift
        more = (rest != 0) & (rest != -1)
        if not more.any():
            break
        nchar += more
        shift += 5
    width = int(nchar.max()) if diff.size else 1
    j = np.arange(width, dtype=np.int64)
    groups = (diff[:, None] >> (5 * j)) & 0x1F  # T x width
    cont = (j[None, :] < (nchar[:, None] - 1)).astype(np.int64) << 5  # 0x20: more follow
    chars = (groups | cont) + 48
    flat = chars[j[None, :] < nchar[:, None]].astype(np.uint8).tobytes()  # row-major = run order
    per_mask = np.add.reduceat(nchar, np.cumsum(nruns) - nruns) if diff.size else nchar[:0]
    offsets = np.concatenate([[0], np.cumsum(per_mask)]).tolist()
    return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def encode_with_boxes(masks: torch.Tensor | np.ndarray) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """Compressed COCO RLE, tight boxes and areas of a batch of masks, in one pass.

    Args:
        masks: bool or integer tensor (or numpy array) ``[N, H, W]`` on any device; a pixel is
            foreground when nonzero. Row-major as images are (``masks[i, y, x]``).

    Returns:
        ``(counts, boxes, areas)``: ``counts`` a list of N ASCII ``bytes``, each equal to
        ``pycocotools.mask.encode(np.asfortranarray(mask[..., None]))[0]["counts"]``;
        ``boxes`` float32[N, 4], COCO ``[x, y, w, h]`` tight box in pixels (pixel columns x..x+w-1;
        all zeros for an empty mask, as ``pycocotools.mask.toBbox``); ``areas`` int64[N] pixel counts.

    Memory on the device: about 2 bytes per mask pixel plus 40 bytes per run; callers batch masks
    by a memory budget.
    """
    masks = _as_bool_masks(masks)
    n = masks.shape[0]
    if n == 0:
        return [], np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    packed, total = _runs_on_device(masks)
    host = packed.cpu().numpy()  # the one device-to-host copy of the batch
    diff = host[:total]
    nruns = host[total:total + n]
    boxes = host[total + n:total + 5 * n].reshape(n, 4).astype(np.float32)
    areas = host[total + 5 * n:].copy()
    return _compress(diff, nruns), boxes, areas


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


def encode_masks(masks: torch.Tensor | np.ndarray) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """:func:`encode_with_boxes` with the fastest exact backend for where the masks live.

    Masks on a GPU use the torch encoder (one device-to-host copy of runs, not of pixels). Masks
    on the CPU go to pycocotools' C encoder, measured about 6x faster there than torch's CPU
    kernels for the same bytes (docs/benchmarks.md). Same outputs either way (tests check both).
    """
    masks = _as_bool_masks(masks)
    if masks.shape[0] == 0 or masks.device.type != "cpu":
        return encode_with_boxes(masks)
    return _encode_with_pycocotools(masks)


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
