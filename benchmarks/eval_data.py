"""Synthetic COCO-like evaluation data for the evaluation benchmark (no pixels are rendered).

Images of ``height x width`` (default 480 x 640; the small case uses 240 x 320) with about 7 objects
each (polygons, sizes log-uniform from 8 px to 300 px scaled to the image, 1 % crowd regions as
RLE),
80 categories, and per image ``n_proposals`` proposals rasterised straight to RLE: a third are
jittered copies of the objects, the rest random polygons, with scores that favour the jittered ones.
Everything is a pure function of the seed, so every evaluator in a benchmark sees the same data.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from segdist.proposals.types import ImageProposals


def _polygons(rng: np.random.Generator, cx: np.ndarray, cy: np.ndarray, rx: np.ndarray,
              ry: np.ndarray, height: int, width: int, vertices: int = 12,
              wobble: float = 0.15) -> list[list[float]]:
    """N closed star-shaped polygons ``[x0, y0, x1, y1, ...]`` around (cx, cy) with radii (rx, ry),
    clipped to the image."""
    n = len(cx)
    angles = np.sort(rng.uniform(0, 2 * np.pi, (n, vertices)), axis=1)  # N x V
    r = 1 + rng.uniform(-wobble, wobble, (n, vertices))
    xs = np.clip(cx[:, None] + rx[:, None] * r * np.cos(angles), 0, width)
    ys = np.clip(cy[:, None] + ry[:, None] * r * np.sin(angles), 0, height)
    return np.stack([xs, ys], axis=2).reshape(n, 2 * vertices).tolist()


def synthetic_gt(n_images: int, seed: int = 0, height: int = 480,
                 width: int = 640) -> dict[str, Any]:
    """COCO instances dict: ``n_images`` images of ``height x width`` with polygon objects."""
    images, anns = [], []
    aid = 1
    scale = min(height / 480, width / 640)
    for i in range(n_images):
        rng = np.random.default_rng([seed, i])
        image_id = 100000 + i
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "height": height,
                       "width": width})
        for _ in range(int(min(rng.poisson(7), 20))):
            size = math.exp(rng.uniform(math.log(8), math.log(300 * scale)))
            aspect = math.exp(rng.uniform(-0.7, 0.7))
            rx, ry = size * aspect / 2, size / aspect / 2
            cx, cy = rng.uniform(rx / 2, width - rx / 2), rng.uniform(ry / 2, height - ry / 2)
            poly = _polygons(rng, np.array([cx]), np.array([cy]), np.array([rx]), np.array([ry]),
                             height, width)[0]
            rle = mask_utils.merge(mask_utils.frPyObjects([poly], height, width))
            area = float(mask_utils.area(rle))
            if area == 0:
                continue
            crowd = rng.random() < 0.01
            seg: Any = [poly]
            if crowd:  # COCO's crowd regions are RLE
                seg = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
            anns.append({"id": aid, "image_id": image_id, "category_id": int(rng.integers(1, 81)),
                         "iscrowd": int(crowd), "area": area,
                         "bbox": [float(v) for v in mask_utils.toBbox(rle)], "segmentation": seg})
            aid += 1
    cats = [{"id": c, "name": f"class{c}"} for c in range(1, 81)]
    return {"images": images, "annotations": anns, "categories": cats}


def synthetic_proposals(coco_gt: dict[str, Any], n_proposals: int,
                        seed: int = 1) -> Iterator[ImageProposals]:
    """Per image (in id order): ``n_proposals`` RLE proposals, sorted by descending score."""
    by_image: dict[int, list[dict]] = {}
    for a in coco_gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for k, im in enumerate(sorted(coco_gt["images"], key=lambda im: im["id"])):
        rng = np.random.default_rng([seed, k])
        height, width = im["height"], im["width"]
        objects = np.asarray([a["bbox"] for a in by_image.get(im["id"], [])], dtype=np.float64)
        n_near = n_proposals // 3 if len(objects) else 0
        n_far = n_proposals - n_near
        # Jittered objects: centre moved by ~8 % of the size, scale by ~15 %.
        x, y, w, h = (objects[rng.integers(len(objects), size=n_near)].T if n_near
                      else np.zeros((4, 0)))
        s = np.exp(rng.normal(0, 0.15, n_near))
        near = _polygons(rng, x + w / 2 + rng.normal(0, 0.08, n_near) * w,
                         y + h / 2 + rng.normal(0, 0.08, n_near) * h,
                         np.maximum(w * s / 2, 1), np.maximum(h * s / 2, 1), height, width,
                         wobble=0.2)
        size = np.exp(rng.uniform(math.log(8), math.log(height), n_far))
        far = _polygons(rng, rng.uniform(0, width, n_far), rng.uniform(0, height, n_far),
                        size / 2, size * np.exp(rng.uniform(-0.7, 0.7, n_far)) / 2, height, width)
        scores = np.concatenate([rng.beta(4, 2, n_near), rng.beta(2, 4, n_far)]).astype(np.float32)
        rles = mask_utils.frPyObjects(near + far, height, width)
        order = np.argsort(-scores, kind="stable")
        rles = [rles[i] for i in order]
        yield ImageProposals(im["id"], height, width, scores[order], mask_utils.toBbox(rles),
                             [r["counts"] for r in rles], "bench")
