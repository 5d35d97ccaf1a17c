"""Pictures of proposals: translucent coloured masks, outlines and score labels over the image.

As the original's computeProposals.lua drew its top proposals (coloured masks over the image), with
each proposal's score written at the top-left of its box so that a picture can be read on its own.
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from segdist.proposals.rle import decode
from segdist.proposals.types import ImageProposals

ALPHA = 0.45  # mask opacity: the object stays visible under its colour


def palette(n: int) -> np.ndarray:
    """``n`` distinct saturated colours, uint8 [n, 3] (hues spread by the golden ratio)."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    return np.array([[round(255 * c) for c in colorsys.hsv_to_rgb(h, 0.85, 1.0)] for h in hues],
                    dtype=np.uint8).reshape(n, 3)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` (bool [H, W]) with a 4-neighbour outside the mask or the image."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~interior


def draw_proposals(image: np.ndarray, proposals: ImageProposals, top: int = 20) -> np.ndarray:
    """The image with its ``top`` best proposals drawn over it.

    Args:
        image: uint8 [H, W, 3] RGB, the image the proposals were computed on (same H, W).
        proposals: its proposals (masks as RLE, or boxes only), sorted by score.
        top: how many to draw (the best ones; the best is drawn last, i.e. on top).
    Returns:
        a new uint8 [H, W, 3] RGB image: each mask blended with its colour at opacity ``ALPHA``,
        its outline in full colour, and "score" (two decimals) in a box at the top-left of its
        bounding box. Box-only proposals get a rectangle outline instead of a mask.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
    h, w = image.shape[:2]
    if (proposals.height, proposals.width) != (h, w):
        raise ValueError(f"proposals are for a {proposals.height}x{proposals.width} image, the "
                         f"image is {h}x{w}")
    props = proposals.top(max(0, top))
    n = len(props)
    colours = palette(n)
    out = image.astype(np.float32)
    masks = decode(props.counts, h, w).astype(bool) if props.has_masks else None
    outlines = []
    for i in reversed(range(n)):  # lower scores first, so the best ends up on top
        c = colours[i].astype(np.float32)
        if masks is not None:
            m = masks[i]
            out[m] = (1 - ALPHA) * out[m] + ALPHA * c
            outlines.append((_outline(m), i))
    canvas = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
    pixels = np.asarray(canvas).copy()
    for edge, i in outlines:
        pixels[edge] = colours[i]
    canvas = Image.fromarray(pixels)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i in reversed(range(n)):
        x, y, bw, bh = (float(v) for v in props.boxes[i])
        colour = tuple(int(v) for v in colours[i])
        if masks is None and bw > 0 and bh > 0:
            draw.rectangle([x, y, x + bw - 1, y + bh - 1], outline=colour, width=2)
        label = f"{float(props.scores[i]):.2f}"
        left, t, right, bottom = draw.textbbox((0, 0), label, font=font)
        tx = int(min(max(x, 0), max(w - (right - left) - 2, 0)))
        ty = int(min(max(y, 0), max(h - (bottom - t) - 2, 0)))
        draw.rectangle([tx, ty, tx + right - left + 1, ty + bottom - t + 1], fill=colour)
        draw.text((tx + 1 - left, ty + 1 - t), label, fill=(0, 0, 0), font=font)
    return np.asarray(canvas).copy()


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 [H, W, 3] RGB image."""
    import io

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
