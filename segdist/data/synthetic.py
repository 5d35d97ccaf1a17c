"""A deterministic synthetic instance-segmentation dataset ("shapes") in COCO or VOC layout.

Each image: a textured background (smooth noise, stripes, checks or a gradient, low contrast) and
``min_objects..max_objects`` textured objects of four categories (ellipse, polygon, ring, blob) with
COCO small / medium / large sizes, drawn bottom to top. Later objects occlude earlier ones; the
ground truth of every object is its **visible** part (the label map after painting), and a placement
that would hide more than half of an earlier object is retried elsewhere. Some images get one
``iscrowd`` region (a cluster of small ellipses, one annotation). Object colours are picked to
contrast with what lies under them, so boundaries are clear enough for a small DeepMask to learn.

Everything derives from ``numpy.random.default_rng([seed, index])`` per image: the same seed gives
the same bytes (with the same numpy and Pillow versions), and the COCO and VOC exports of a seed
describe the same images and instances (same ids, boxes, masks; VOC images are all JPEG).

Layouts (``OUT`` = ``out_uri``)::

    coco: OUT/images/2026_000001.{jpg,png}
          OUT/annotations/instances_{all,train,val}.json   (all = train + val)
    voc:  OUT/VOC2012/{JPEGImages,Annotations,SegmentationObject,SegmentationClass}/...
          OUT/VOC2012/ImageSets/{Main,Segmentation}/{train,val,trainval}.txt
          OUT/VOC2012/classes.txt

Image names are ``2026_NNNNNN`` (N = 1..n), so image ids are ``voc_image_id(name)`` = 2026000001...
in both layouts. VOC has no crowd flag: crowd regions are ``difficult`` objects there, which the VOC
reader turns back into ``iscrowd = 1``.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image, ImageDraw

from segdist.data.voc import voc_image_id
from segdist.errors import ConfigError
from segdist.storage import atomic_write, join

CATEGORIES: tuple[str, ...] = ("ellipse", "polygon", "ring", "blob")
YEAR = 2026
JPEG_QUALITY = 90
PNG_SHARE = 1 / 3  # share of COCO-export images written as PNG (the rest JPEG)

# Object size classes by longer side in px, with their probabilities. Areas end up on both sides of
# COCO's 32^2 / 96^2 thresholds (shapes fill 50-80 % of their box).
_SIZE_CLASSES = (("small", 0.2, 12, 40), ("medium", 0.42, 44, 130), ("large", 0.38, 140, 10_000))
_MIN_VISIBLE_SHARE = 0.5  # an earlier object keeps at least this share of its in-image area
_MIN_AREA = 40  # px, smallest visible object
_MIN_CONTRAST = 90.0  # RGB distance between an object's colour and what lies under it


@dataclass
class SyntheticInstance:
    """One annotated object: its category, visible mask ``bool[H, W]`` (the ground truth), crowd
    flag, whether its shape was cut by the image border (VOC ``truncated``), and ``full_area``, its
    in-image pixel count before later objects covered part of it."""

    category: str
    mask: np.ndarray
    iscrowd: bool
    truncated: bool
    full_area: int


@dataclass
class SyntheticImage:
    """One rendered image: ``image`` is ``uint8[H, W, 3]`` RGB; ``instances`` in paint order
    (bottom to top); ``ext`` is the COCO export's file type ("jpg" or "png")."""

    index: int
    name: str
    image_id: int
    image: np.ndarray
    instances: list[SyntheticInstance]
    ext: str

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


def image_name(index: int) -> str:
    """VOC-style name of image ``index`` (0-based): ``2026_000001`` for index 0."""
    return f"{YEAR}_{index + 1:06d}"


def make_scene(
    seed: int,
    index: int,
    *,
    min_side: int = 160,
    max_side: int = 640,
    min_objects: int = 1,
    max_objects: int = 8,
    crowd_prob: float = 0.15,
) -> SyntheticImage:
    """Render image ``index`` of the dataset with ``seed`` (a pure function of its arguments)."""
    rng = np.random.default_rng([seed, index])
    height, width = _image_size(rng, min_side, max_side)
    canvas = _background(rng, height, width)
    label = np.zeros((height, width), dtype=np.int32)  # 0 = background, k = k-th placed instance
    shapes: list[tuple[str, bool, bool]] = []  # (category, iscrowd, truncated) per label value
    full_area: list[int] = [0]  # in-image area when placed, per label value (index 0 unused)

    if rng.random() < crowd_prob:
        placed = _place(rng, canvas, label, full_area, lambda: _crowd(rng, height, width))
        if placed is not None:
            shapes.append(("ellipse", True, placed))
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        placed = _place(rng, canvas, label, full_area,
                        lambda c=category: _shape(rng, c, height, width))
        if placed is not None:
            shapes.append((category, False, placed))

    # Mild sensor noise over everything, so flat regions are not perfectly flat.
    noisy = canvas + rng.normal(0.0, 3.0, canvas.shape)
    image = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    instances = [
        SyntheticInstance(category=c, mask=label == k, iscrowd=crowd, truncated=cut,
                          full_area=full_area[k])
        for k, (c, crowd, cut) in enumerate(shapes, start=1)
    ]
    ext = "png" if rng.random() < PNG_SHARE else "jpg"
    name = image_name(index)
    return SyntheticImage(index=index, name=name, image_id=voc_image_id(name), image=image,
                          instances=instances, ext=ext)


def split_of(seed: int, n_images: int, val_fraction: float) -> list[str]:
    """``"train"`` or ``"val"`` per image index: ``round(n * val_fraction)`` images (at least one
    and at most n - 1 when 0 < val_fraction and n >= 2) drawn without replacement from the seed."""
    n_val = int(round(n_images * val_fraction))
    if val_fraction > 0 and n_images >= 2:
        n_val = min(max(n_val, 1), n_images - 1)
    n_val = min(n_val, n_images)
    rng = np.random.default_rng([seed, 2**31 - 1])  # a stream no image index uses
    val = set(rng.choice(n_images, size=n_val, replace=False).tolist()) if n_val else set()
    return ["val" if i in val else "train" for i in range(n_images)]


def make_synthetic(
    out_uri: str,
    n_images: int,
    seed: int = 0,
    fmt: str = "coco",
    *,
    min_side: int = 160,
    max_side: int = 640,
    min_objects: int = 1,
    max_objects: int = 8,
    crowd_prob: float = 0.15,
    val_fraction: float = 0.2,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a synthetic dataset under ``out_uri`` (any fsspec URI; every file written atomically).

    Args:
        n_images: number of images (ids 2026000001..).
        seed: everything derives from it; same seed, same bytes.
        fmt: ``"coco"`` or ``"voc"`` (layouts in the module docstring).
        min_side, max_side: image width and height are drawn from this range (aspect <= 2).
        min_objects, max_objects: objects per image (fewer when there is no room without hiding
            more than half of an earlier object).
        crowd_prob: probability that an image has one iscrowd region.
        val_fraction: share of images in the ``val`` split (disjoint from ``train``).

    Returns a dict with ``format``, ``root``, ``n_images``, the split lists ``train``/``val``
    (image ids), per-layout entry points (COCO: ``images`` and ``annotations`` {all, train, val};
    VOC: ``image_sets`` {train, val, trainval}) and ``files`` (every URI written).
    """
    _check_options(n_images, fmt, min_side, max_side, min_objects, max_objects, crowd_prob,
                   val_fraction)
    splits = split_of(seed, n_images, val_fraction)
    opts = dict(storage_options or {})
    scenes = (
        make_scene(seed, i, min_side=min_side, max_side=max_side, min_objects=min_objects,
                   max_objects=max_objects, crowd_prob=crowd_prob)
        for i in range(n_images)
    )
    if fmt == "coco":
        result = _write_coco(out_uri, scenes, splits, seed, opts)
    else:
        result = _write_voc(out_uri, scenes, splits, opts)
    result.update({
        "format": fmt, "n_images": n_images,
        "train": [voc_image_id(image_name(i)) for i, s in enumerate(splits) if s == "train"],
        "val": [voc_image_id(image_name(i)) for i, s in enumerate(splits) if s == "val"],
    })
    return result


def coco_annotation(instance: SyntheticInstance, ann_id: int, image_id: int) -> dict[str, Any]:
    """COCO annotation of one instance: compressed RLE with ASCII counts, area = visible pixel
    count, bbox = tight xywh box of the visible mask (integers)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(instance.mask.astype(np.uint8)))
    x0, y0, x1, y1 = _tight_box(instance.mask)
    return {
        "id": ann_id, "image_id": image_id, "category_id": CATEGORIES.index(instance.category) + 1,
        "segmentation": {"size": [int(instance.mask.shape[0]), int(instance.mask.shape[1])],
                         "counts": rle["counts"].decode("ascii")},
        "area": int(instance.mask.sum()), "bbox": [x0, y0, x1 - x0, y1 - y0],
        "iscrowd": int(instance.iscrowd),
    }


# --- writers -------------------------------------------------------------------------------------

def _write_coco(out, scenes, splits, seed, opts) -> dict[str, Any]:
    images_uri = join(out, "images")
    files: list[str] = []
    entries: list[tuple[str, dict, list[dict]]] = []
    ann_id = 1
    for scene in scenes:
        file_name = f"{scene.name}.{scene.ext}"
        uri = join(images_uri, file_name)
        atomic_write(uri, _encode(scene.image, scene.ext), opts)
        files.append(uri)
        anns = []
        for inst in scene.instances:
            anns.append(coco_annotation(inst, ann_id, scene.image_id))
            ann_id += 1
        image = {"id": scene.image_id, "file_name": file_name, "height": scene.height,
                 "width": scene.width}
        entries.append((splits[scene.index], image, anns))

    categories = [{"id": i, "name": n, "supercategory": "shape"}
                  for i, n in enumerate(CATEGORIES, start=1)]
    annotations: dict[str, str] = {}
    for subset in ("all", "train", "val"):
        chosen = [e for e in entries if subset == "all" or e[0] == subset]
        doc = {
            "info": {"description": f"segdist synthetic shapes, seed {seed}, split {subset}",
                     "version": "1", "year": YEAR},
            "licenses": [],
            "images": [e[1] for e in chosen],
            "annotations": [a for e in chosen for a in e[2]],
            "categories": categories,
        }
        uri = join(out, "annotations", f"instances_{subset}.json")
        atomic_write(uri, json.dumps(doc, separators=(",", ":")).encode("ascii"), opts)
        annotations[subset] = uri
        files.append(uri)
    return {"root": out, "images": images_uri, "annotations": annotations, "files": files}


def _write_voc(out, scenes, splits, opts) -> dict[str, Any]:
    root = join(out, "VOC2012")
    files: list[str] = []
    names: dict[str, list[str]] = {"train": [], "val": []}
    palette = _voc_palette()
    for scene in scenes:
        name = scene.name
        names[splits[scene.index]].append(name)
        instance_map = np.zeros((scene.height, scene.width), np.uint8)
        class_map = np.zeros((scene.height, scene.width), np.uint8)
        for k, inst in enumerate(scene.instances, start=1):
            instance_map[inst.mask] = k
            # VOC marks difficult regions void (255) in the class map.
            class_map[inst.mask] = 255 if inst.iscrowd else CATEGORIES.index(inst.category) + 1
        for sub, data in (
            (f"JPEGImages/{name}.jpg", _encode(scene.image, "jpg")),
            (f"Annotations/{name}.xml", _voc_xml(scene).encode("utf-8")),
            (f"SegmentationObject/{name}.png", _palette_png(instance_map, palette)),
            (f"SegmentationClass/{name}.png", _palette_png(class_map, palette)),
        ):
            uri = join(root, *sub.split("/"))
            atomic_write(uri, data, opts)
            files.append(uri)
    image_sets: dict[str, str] = {}
    lists = {"train": names["train"], "val": names["val"],
             "trainval": sorted(names["train"] + names["val"])}
    for image_set in ("Main", "Segmentation"):
        for split, listed in lists.items():
            uri = join(root, "ImageSets", image_set, f"{split}.txt")
            atomic_write(uri, "".join(f"{n}\n" for n in listed).encode("ascii"), opts)
            files.append(uri)
            if image_set == "Main":
                image_sets[split] = uri
    classes_uri = join(root, "classes.txt")
    atomic_write(classes_uri, "".join(f"{c}\n" for c in CATEGORIES).encode("ascii"), opts)
    files.append(classes_uri)
    return {"root": root, "image_sets": image_sets, "files": files}


def _voc_xml(scene: SyntheticImage) -> str:
    objects = []
    for inst in scene.instances:
        x0, y0, x1, y1 = _tight_box(inst.mask)
        # VOC boxes: 1-based inclusive pixel indices.
        objects.append(
            "  <object>\n"
            f"    <name>{escape(inst.category)}</name>\n    <pose>Unspecified</pose>\n"
            f"    <truncated>{int(inst.truncated)}</truncated>\n"
            f"    <difficult>{int(inst.iscrowd)}</difficult>\n"
            f"    <bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin>"
            f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox>\n"
            "  </object>\n"
        )
    return (
        "<annotation>\n  <folder>VOC2012</folder>\n"
        f"  <filename>{scene.name}.jpg</filename>\n"
        "  <source><database>segdist synthetic shapes</database></source>\n"
        f"  <size><width>{scene.width}</width><height>{scene.height}</height>"
        "<depth>3</depth></size>\n  <segmented>1</segmented>\n"
        + "".join(objects) + "</annotation>\n"
    )


def _voc_palette() -> list[int]:
    """The PASCAL VOC colour map (bit-interleaved label colours), 256 RGB entries."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def _palette_png(indices: np.ndarray, palette: list[int]) -> bytes:
    im = Image.fromarray(indices, "P")
    im.putpalette(palette)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _encode(image: np.ndarray, ext: str) -> bytes:
    buf = io.BytesIO()
    if ext == "png":
        Image.fromarray(image).save(buf, "PNG")
    else:
        Image.fromarray(image).save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)``, end-exclusive, of the True pixels of ``mask`` (all zeros if none)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return 0, 0, 0, 0
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _check_options(n_images, fmt, min_side, max_side, min_objects, max_objects, crowd_prob,
                   val_fraction) -> None:
    if fmt not in ("coco", "voc"):
        raise ConfigError(f"format must be one of 'coco', 'voc' (got {fmt!r})")
    if not isinstance(n_images, int) or n_images < 1:
        raise ConfigError(f"the number of images must be >= 1 (got {n_images!r})")
    if n_images > 999_999:
        raise ConfigError(f"at most 999999 images (VOC names have six digits), got {n_images}")
    if not 32 <= min_side <= max_side <= 4096:
        raise ConfigError(f"image sides need 32 <= min_side <= max_side <= 4096 "
                          f"(got min_side={min_side}, max_side={max_side})")
    if not 0 <= min_objects <= max_objects <= 200:
        raise ConfigError(f"objects per image need 0 <= min_objects <= max_objects <= 200 "
                          f"(got {min_objects}..{max_objects})")
    if not 0.0 <= crowd_prob <= 1.0:
        raise ConfigError(f"crowd_prob must be in [0, 1] (got {crowd_prob})")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1) (got {val_fraction})")


# --- rendering -----------------------------------------------------------------------------------

@dataclass
class _Shape:
    """A shape to paint: ``mask`` is ``bool[y1 - y0, x1 - x0]`` over the window ``(y0, x0, y1, x1)``
    of the image; ``truncated`` when the full shape reaches outside the image."""

    y0: int
    x0: int
    mask: np.ndarray
    truncated: bool
    texture: str


def _image_size(rng: np.random.Generator, min_side: int, max_side: int) -> tuple[int, int]:
    while True:
        h, w = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
        if max(h, w) <= 2 * min(h, w):
            return h, w


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Bilinearly interpolated random grid: ``float64[h, w]`` in [0, 1], ``cells`` blobs across."""
    grid = rng.random((cells + 1, cells + 1))
    ys = np.linspace(0, cells, h, endpoint=False)
    xs = np.linspace(0, cells, w, endpoint=False)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _pattern(rng: np.random.Generator, h: int, w: int, kind: str, scale: float) -> np.ndarray:
    """A texture field ``float64[h, w]`` in about [-1, 1]; ``scale`` ~ the feature size in px."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    angle = rng.uniform(0, math.pi)
    along = xx * math.cos(angle) + yy * math.sin(angle)
    if kind == "stripes":
        return np.sin(2 * math.pi * along / scale + rng.uniform(0, 2 * math.pi))
    if kind == "checks":
        across = -xx * math.sin(angle) + yy * math.cos(angle)
        return np.where((np.floor(along / scale) + np.floor(across / scale)) % 2 == 0, 1.0, -1.0)
    if kind == "gradient":
        span = max(float(np.ptp(along)), 1.0)
        return 2 * (along - along.min()) / span - 1
    cells = max(2, int(round(max(h, w) / scale)))
    return 2 * _smooth_noise(rng, h, w, cells) - 1


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """An RGB colour (float64[3], 0..255) from HSV with moderate-to-high saturation and value."""
    hue, sat, val = rng.uniform(0, 1), rng.uniform(0.35, 1.0), rng.uniform(0.3, 1.0)
    i = int(hue * 6) % 6
    f = hue * 6 - int(hue * 6)
    p, q, t = val * (1 - sat), val * (1 - f * sat), val * (1 - (1 - f) * sat)
    rgb = [(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q)][i]
    return np.array(rgb) * 255.0


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """``float64[h, w, 3]`` textured background: a base colour modulated by a low-contrast pattern."""
    base = _random_colour(rng) * rng.uniform(0.5, 0.9) + rng.uniform(10, 60)
    other = np.clip(base + rng.normal(0, 25, 3), 0, 255)
    kind = ("noise", "stripes", "checks", "gradient")[int(rng.integers(4))]
    field = _pattern(rng, h, w, kind, scale=rng.uniform(24, 96))
    mix = (field[:, :, None] + 1) / 2  # 0..1
    return np.clip(base * (1 - mix) + other * mix, 0, 255)


def _paint(rng: np.random.Generator, canvas: np.ndarray, shape: _Shape) -> None:
    """Fill ``shape``'s pixels of ``canvas`` with a textured colour that contrasts with what is
    under it (background or earlier objects)."""
    h, w = shape.mask.shape
    window = canvas[shape.y0:shape.y0 + h, shape.x0:shape.x0 + w]
    under = window[shape.mask].mean(axis=0)
    best, best_dist = None, -1.0
    for _ in range(24):
        colour = _random_colour(rng)
        dist = float(np.linalg.norm(colour - under))
        if dist > best_dist:
            best, best_dist = colour, dist
        if dist >= _MIN_CONTRAST:
            break
    if shape.texture == "flat":
        fill = np.broadcast_to(best, (h, w, 3)).astype(np.float64)
    else:
        scale = rng.uniform(4, 14) if shape.texture == "stripes" else rng.uniform(8, 40)
        amp = rng.uniform(10, 28)
        field = _pattern(rng, h, w, shape.texture, scale)
        fill = best[None, None, :] + amp * field[:, :, None]
    window[shape.mask] = np.clip(fill[shape.mask], 0, 255)


def _place(rng, canvas, label, full_area, make) -> bool | None:
    """Try up to 8 placements of ``make()``; paint and label the first that keeps every earlier
    object at least half visible. Returns the shape's truncated flag, or None if none fitted."""
    visible = np.bincount(label.ravel(), minlength=len(full_area))
    for _ in range(8):
        shape = make()
        if shape is None:
            continue
        area = int(shape.mask.sum())
        if area < _MIN_AREA:
            continue
        h, w = shape.mask.shape
        under = label[shape.y0:shape.y0 + h, shape.x0:shape.x0 + w][shape.mask]
        lost = np.bincount(under, minlength=len(full_area))
        remaining = visible - lost
        if any(remaining[k] < max(_MIN_VISIBLE_SHARE * full_area[k], _MIN_AREA)
               for k in range(1, len(full_area))):
            continue
        _paint(rng, canvas, shape)
        k = len(full_area)
        label[shape.y0:shape.y0 + h, shape.x0:shape.x0 + w][shape.mask] = k
        full_area.append(area)
        return shape.truncated
    return None


def _object_size(rng: np.random.Generator, height: int, width: int) -> float:
    """Longer side in px, drawn from the small/medium/large classes (log-uniform within one)."""
    limit = 0.9 * min(height, width)
    r = rng.random()
    for _, p, lo, hi in _SIZE_CLASSES:
        if r < p:
            break
        r -= p
    hi = min(hi, limit)
    lo = min(lo, hi)
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _window(rng, height, width, half: float) -> tuple[float, float, int, int, int, int]:
    """Centre (cy, cx) and clipped window (y0, x0, y1, x1) for a shape of radius ``half``; the centre
    stays inside the image, so at most about half of the shape is cut off."""
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    r = half + 1
    y0, x0 = max(0, int(math.floor(cy - r))), max(0, int(math.floor(cx - r)))
    y1, x1 = min(height, int(math.ceil(cy + r))), min(width, int(math.ceil(cx + r)))
    return cy, cx, y0, x0, y1, x1


def _cut(mask: np.ndarray, y0: int, x0: int, height: int, width: int) -> bool:
    """Whether a shape drawn in a window at (y0, x0) reaches the image border (VOC 'truncated'):
    the window is at least the shape's extent, so touching the border means continuing past it."""
    h, w = mask.shape
    return bool((y0 == 0 and mask[0].any()) or (x0 == 0 and mask[:, 0].any())
                or (y0 + h == height and mask[-1].any()) or (x0 + w == width and mask[:, -1].any()))


def _shape(rng: np.random.Generator, category: str, height: int, width: int) -> _Shape | None:
    """One object of ``category``: an ellipse, a star-shaped polygon, a ring (ellipse with an
    elliptical hole), or a blob (smooth random radius), rotated, with its texture kind."""
    size = _object_size(rng, height, width)
    if category == "ring":
        size = max(size, 24.0)  # thinner rings than 3 px are not rings
    radius = size / 2
    aspect = rng.uniform(0.5, 1.0)
    theta = rng.uniform(0, math.pi)
    cy, cx, y0, x0, y1, x1 = _window(rng, height, width, radius)
    if y1 <= y0 or x1 <= x0:
        return None
    texture = ("flat", "flat", "stripes", "gradient", "noise")[int(rng.integers(5))]
    if category == "polygon":
        mask = _polygon(rng, cy - y0, cx - x0, radius, aspect, theta, (y1 - y0, x1 - x0))
    else:
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64) + 0.5  # pixel centres
        dy, dx = yy - cy, xx - cx
        u = (dx * math.cos(theta) + dy * math.sin(theta)) / radius
        v = (-dx * math.sin(theta) + dy * math.cos(theta)) / (radius * aspect)
        rho2 = u * u + v * v
        if category == "ellipse":
            mask = rho2 <= 1.0
        elif category == "ring":
            inner = rng.uniform(0.35, max(0.35, min(0.7, 1 - 3.0 / (radius * aspect))))
            mask = (rho2 <= 1.0) & (rho2 >= inner * inner)
        else:  # blob
            phi = np.arctan2(v, u)
            bumps = np.zeros_like(phi)
            total = 0.0
            for k in (2, 3, 4, 5):
                a = rng.uniform(0, 0.22 / (k - 1))
                bumps += a * np.cos(k * phi + rng.uniform(0, 2 * math.pi))
                total += a
            mask = np.sqrt(rho2) <= (1 + bumps) / (1 + total)
    return _Shape(y0=y0, x0=x0, mask=mask, truncated=_cut(mask, y0, x0, height, width),
                  texture=texture)


def _polygon(rng, cy, cx, radius, aspect, theta, shape) -> np.ndarray:
    """Star-shaped polygon with 3..9 vertices (regular-ish or irregular), rasterised by Pillow."""
    n = int(rng.integers(3, 10))
    if rng.random() < 0.5:  # regular-ish: even angles, equal radii
        angles = np.arange(n) * 2 * math.pi / n + rng.uniform(0, 2 * math.pi)
        radii = np.ones(n)
    else:
        angles = np.sort(rng.uniform(0, 2 * math.pi, n))
        radii = rng.uniform(0.45, 1.0, n)
    u, v = radius * radii * np.cos(angles), radius * aspect * radii * np.sin(angles)
    xs = cx + u * math.cos(theta) - v * math.sin(theta)
    ys = cy + u * math.sin(theta) + v * math.cos(theta)
    im = Image.new("L", (shape[1], shape[0]), 0)
    ImageDraw.Draw(im).polygon([(float(x), float(y)) for x, y in zip(xs, ys)], fill=1)
    return np.array(im, dtype=bool)


def _crowd(rng: np.random.Generator, height: int, width: int) -> _Shape | None:
    """A crowd region: 10-30 small overlapping ellipses in a 50-150 px area (less in small
    images), as one mask."""
    room = 0.8 * min(height, width)
    side = rng.uniform(min(50.0, room), min(150.0, room))
    cy, cx, y0, x0, y1, x1 = _window(rng, height, width, side / 2)
    if y1 <= y0 or x1 <= x0:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64) + 0.5
    mask = np.zeros(yy.shape, dtype=bool)
    for _ in range(int(rng.integers(10, 31))):
        py, px = cy + rng.uniform(-side / 2, side / 2), cx + rng.uniform(-side / 2, side / 2)
        ry, rx = rng.uniform(3, 8), rng.uniform(3, 8)
        mask |= ((yy - py) / ry) ** 2 + ((xx - px) / rx) ** 2 <= 1
    return _Shape(y0=y0, x0=x0, mask=mask, truncated=_cut(mask, y0, x0, height, width),
                  texture="flat")
