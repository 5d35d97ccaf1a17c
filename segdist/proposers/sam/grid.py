"""Where the automatic mask generator prompts: the crops of an image and the points in each.

Both follow the official generators (segment_anything / sam2 ``utils/amg.py``) to the pixel, since
their outputs must be identical: crop layer 0 is the whole image; layer i (1..n) cuts it into
2^i x 2^i overlapping crops; layer i is prompted with a regular grid of
``points_per_side // downscale^i`` points per side, centred in the crop's cells.
"""

from __future__ import annotations

import math
from itertools import product

import numpy as np


def point_grid(n_per_side: int) -> np.ndarray:
    """float64 [n*n, 2] (x, y) points in [0, 1]^2: cell centres of an n x n grid, x fastest."""
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def layer_grids(points_per_side: int, n_layers: int, downscale: int) -> list[np.ndarray]:
    """The normalised point grid of each crop layer 0..n_layers (layer i has
    ``int(points_per_side / downscale**i)`` points per side)."""
    return [point_grid(int(points_per_side / downscale ** i)) for i in range(n_layers + 1)]


def crop_boxes(height: int, width: int, n_layers: int, overlap_ratio: float
               ) -> list[tuple[tuple[int, int, int, int], int]]:
    """``[((x0, y0, x1, y1), layer), ...]``: the whole image (layer 0), then for each layer i
    (1..n_layers) its 2^i x 2^i crops, x-major, in pixels (x1, y1 exclusive, clipped to the image).

    Crops of layer i overlap by ``int(overlap_ratio * short_side * 2 / 2^i)`` pixels.
    """
    out = [((0, 0, width, height), 0)]
    short = min(height, width)
    for layer in range(1, n_layers + 1):
        n = 2 ** layer
        overlap = int(overlap_ratio * short * (2 / n))
        cw = int(math.ceil((overlap * (n - 1) + width) / n))
        ch = int(math.ceil((overlap * (n - 1) + height) / n))
        xs = [int((cw - overlap) * i) for i in range(n)]
        ys = [int((ch - overlap) * i) for i in range(n)]
        for x0, y0 in product(xs, ys):
            out.append(((x0, y0, min(x0 + cw, width), min(y0 + ch, height)), layer))
    return out
