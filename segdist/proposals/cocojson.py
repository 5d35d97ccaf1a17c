"""COCO results JSON for proposals: the format pycocotools ``COCO.loadRes`` reads.

Two kinds of file per chunk (see docs/formats.md):

- **segm**: ``[{"image_id", "category_id": 1, "score", "segmentation": {"size": [h, w],
  "counts": str}}, ...]`` with *no* ``"bbox"`` key. ``loadRes`` takes its bbox branch as soon as a
  result carries ``"bbox"``, which sets ``area`` to the box area and breaks segment AR by object
  size; a segm file therefore never has one.
- **bbox**: ``[{"image_id", "category_id": 1, "score", "bbox": [x, y, w, h]}, ...]``.

``category_id`` is always 1: with ``useCats = 0`` pycocotools silently drops results whose category
is not a GT category, and 1 is one in COCO, VOC-converted and synthetic GT. Results are written
image by image (ascending id) in rank order (descending score), which is the order the readers
restore. Files ending in ``.gz`` are gzip-compressed (mtime 0, so a retried chunk is byte-identical).

The encoders build the text in bulk from NumPy arrays (no list of per-proposal dicts; the float
reprs of a whole image in one call, the escapes of all its RLE strings in one pass); floats are
written with Python's shortest round-trip repr of the float32 value widened to float64, so reading
back and casting to float32 gives the identical bits.
"""

from __future__ import annotations

import gzip
import itertools
import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from segdist.errors import SegdistError
from segdist.proposals.types import ImageProposals

CATEGORY_ID = 1

# Boxes of masks are the masks' tight boxes; decoding a segm-only file recomputes them this way.
_GZIP_LEVEL = 6


def _check_finite(p: ImageProposals) -> None:
    if not (np.isfinite(p.scores).all() and np.isfinite(p.boxes).all()):
        raise ValueError(f"image {p.image_id}: scores and boxes must be finite to be written as JSON")


def _reprs(values: np.ndarray) -> list[bytes]:
    """``repr`` of each value widened to float64 as ASCII bytes, computed in bulk (the list's repr
    formats every element with float.__repr__ in C)."""
    if values.size == 0:
        return []
    return repr(values.astype(np.float64).reshape(-1).tolist()).encode("ascii")[1:-1].split(b", ")


def _interleave(first: bytes, columns: Sequence[Sequence[bytes] | bytes], last: bytes) -> bytes:
    """``first + (row_0 + sep) + ... + row_n`` where each row is its columns' items concatenated
    (a ``bytes`` column repeats in every row) and the last row ends with ``last`` instead of the
    separator (the final column); one ``join`` in C for the whole image."""
    n = max(len(c) for c in columns if not isinstance(c, bytes))
    cols = [itertools.repeat(c, n) if isinstance(c, bytes) else c for c in columns]
    parts = list(itertools.chain.from_iterable(zip(*cols)))
    parts[-1] = last
    return first + b"".join(parts)


def _image_segm(p: ImageProposals) -> bytes:
    """The records of one image, one per line, comma-separated (b"" for an image without any)."""
    if not len(p):
        return b""
    if p.counts is None:
        raise ValueError(f"image {p.image_id} has box-only proposals (counts=None): no segm file")
    head = b'{"image_id":%d,"category_id":%d,"score":' % (int(p.image_id), CATEGORY_ID)
    size = b',"segmentation":{"size":[%d,%d],"counts":"' % (int(p.height), int(p.width))
    # counts use the characters 48..111: of these only the backslash needs a JSON escape, so all
    # strings are escaped in one pass (joined by a byte they never contain)
    counts = b"\n".join(p.counts).replace(b"\\", b"\\\\").split(b"\n")
    return _interleave(head, [_reprs(p.scores), size, counts, b'"}},\n' + head], b'"}}')


def _image_bbox(p: ImageProposals) -> bytes:
    if not len(p):
        return b""
    head = b'{"image_id":%d,"category_id":%d,"score":' % (int(p.image_id), CATEGORY_ID)
    b = p.boxes.astype(np.float64)
    if _integral(b):  # tight boxes of masks: repr(float(n)) is str(n) + ".0", far cheaper
        v = repr(b.astype(np.int64).reshape(-1).tolist()).encode("ascii")[1:-1].split(b", ")
        x, y, w, h, sep, end = v[0::4], v[1::4], v[2::4], v[3::4], b".0,", b".0]},\n"
    else:
        v = _reprs(b)
        x, y, w, h, sep, end = v[0::4], v[1::4], v[2::4], v[3::4], b",", b"]},\n"
    return _interleave(head, [_reprs(p.scores), b',"bbox":[', x, sep, y, sep, w, sep, h,
                              end + head], end[:-2])


def _integral(v: np.ndarray) -> bool:
    """All values whole numbers that repr writes as "<int>.0" (no -0.0, below 1e16)."""
    return bool(np.all(v == np.floor(v)) and np.all(np.abs(v) < 1e15)
                and not np.any(np.signbit(v) & (v == 0)))


def _join(images: Iterable[bytes]) -> bytes:
    # One result per line: still one JSON list, but diffable and greppable. The brackets go onto the
    # first and last image's text so that the chunk's text (hundreds of MB) is copied only once.
    texts = [text for text in images if text]
    if not texts:
        return b"[]\n"
    texts[0] = b"[" + texts[0]
    texts[-1] = texts[-1] + b"]\n"
    return b",\n".join(texts)


def _maybe_gzip(data: bytes, compress: bool) -> bytes:
    return gzip.compress(data, compresslevel=_GZIP_LEVEL, mtime=0) if compress else data


def encode_segm(proposals: Sequence[ImageProposals], *, gzip_output: bool = False) -> bytes:
    """COCO results JSON of the masks (no "bbox" key), images in the given order, ranks in order.

    Args:
        proposals: per-image proposals with masks (``counts`` not None); scores float32[N].
        gzip_output: gzip the JSON text (for ``.json.gz`` files).
    Returns:
        the file's bytes (ASCII JSON, or gzip of it).
    """
    for p in proposals:
        _check_finite(p)
    return _maybe_gzip(_join(_image_segm(p) for p in proposals), gzip_output)


def encode_bbox(proposals: Sequence[ImageProposals], *, gzip_output: bool = False) -> bytes:
    """COCO results JSON of the boxes: ``"bbox": [x, y, w, h]`` (COCO xywh, pixels) and score."""
    for p in proposals:
        _check_finite(p)
    return _maybe_gzip(_join(_image_bbox(p) for p in proposals), gzip_output)


def load_results(data: bytes, source: str = "<bytes>") -> list[dict[str, Any]]:
    """Parse a COCO results file's bytes (gzip detected by its magic number) into a list of dicts."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise SegdistError(f"{source} is not a readable gzip file ({exc})") from exc
    try:
        results = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SegdistError(f"{source} is not valid JSON ({exc}); expected a COCO results list") from exc
    if not isinstance(results, list):
        raise SegdistError(f"{source}: expected a JSON list of COCO results, got {type(results).__name__}")
    return results


def _group(results: list[dict[str, Any]], source: str) -> dict[int, list[dict[str, Any]]]:
    groups: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        try:
            groups.setdefault(int(r["image_id"]), []).append(r)
        except (KeyError, TypeError, ValueError) as exc:
            raise SegdistError(f"{source}: a result without a valid image_id: {str(r)[:200]}") from exc
    return groups


def decode(segm: list[dict[str, Any]] | None, bbox: list[dict[str, Any]] | None, *,
           model: str = "unknown", source: str = "<results>") -> list[ImageProposals]:
    """Proposals per image from parsed segm and/or bbox results of one chunk, sorted by image id.

    Within an image results are stably sorted by descending score (our files are already in that
    order, so ranks round-trip). With a segm list, height/width come from the RLE ``size`` and boxes
    from the bbox list when given (same order required), else from ``pycocotools.mask.toBbox``.
    With only a bbox list, masks are None and height/width are 0 (unknown: bbox results carry no
    image size).
    """
    from pycocotools import mask as mask_utils

    if segm is None and bbox is None:
        raise ValueError("decode needs segm or bbox results")
    seg_groups = _group(segm, source) if segm is not None else None
    box_groups = _group(bbox, source) if bbox is not None else None
    ids = sorted(set(seg_groups or {}) | set(box_groups or {}))
    out = []
    for image_id in ids:
        try:
            if seg_groups is not None:
                rs = seg_groups.get(image_id, [])
                order = np.argsort(-np.asarray([r["score"] for r in rs], dtype=np.float32),
                                   kind="stable")
                rs = [rs[i] for i in order]
                sizes = {tuple(r["segmentation"]["size"]) for r in rs}
                if len(sizes) != 1:
                    raise SegdistError(f"{source}: image {image_id} has masks of sizes {sorted(sizes)}")
                height, width = (int(v) for v in sizes.pop())
                counts = [_counts_bytes(r["segmentation"], image_id, source) for r in rs]
                scores = np.asarray([r["score"] for r in rs], dtype=np.float32)
                if box_groups is not None:
                    bs = box_groups.get(image_id, [])
                    border = np.argsort(-np.asarray([r["score"] for r in bs], dtype=np.float32),
                                        kind="stable")
                    if len(bs) != len(rs):
                        raise SegdistError(f"{source}: image {image_id} has {len(rs)} segm but "
                                           f"{len(bs)} bbox results; the two files do not match")
                    boxes = np.asarray([bs[i]["bbox"] for i in border], dtype=np.float32)
                else:
                    rles = [{"size": [height, width], "counts": c} for c in counts]
                    boxes = mask_utils.toBbox(rles) if rles else np.zeros((0, 4))
            else:
                bs = box_groups[image_id]
                border = np.argsort(-np.asarray([r["score"] for r in bs], dtype=np.float32),
                                    kind="stable")
                bs = [bs[i] for i in border]
                height = width = 0
                counts = None
                scores = np.asarray([r["score"] for r in bs], dtype=np.float32)
                boxes = np.asarray([r["bbox"] for r in bs], dtype=np.float32)
        except (KeyError, TypeError) as exc:
            raise SegdistError(f"{source}: image {image_id}: malformed COCO result ({exc!r}); "
                               "expected image_id, score and segmentation{size,counts} or bbox") from exc
        out.append(ImageProposals(image_id, height, width, scores, boxes.reshape(-1, 4),
                                  counts, model))
    return out


def _counts_bytes(seg: dict[str, Any], image_id: int, source: str) -> bytes:
    counts = seg["counts"]
    if isinstance(counts, list):
        # Uncompressed RLE (a list of run lengths): compress it like pycocotools does.
        from pycocotools import mask as mask_utils

        h, w = seg["size"]
        return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)["counts"]
    if not isinstance(counts, str):
        raise SegdistError(f"{source}: image {image_id}: segmentation counts must be an RLE string")
    return counts.encode("ascii")


def encode_images_index(images: Sequence[dict[str, Any]]) -> bytes:
    """``images.json``: a COCO dataset of the run's images and no annotations, one image a line.

    ``images`` are ``{"id", "file_name", "height", "width"}`` (written ascending by id). The one
    category is :data:`CATEGORY_ID`, the results' own, so ``COCO(images.json).loadRes(segm file)``
    joins results to file names with pycocotools alone.
    """
    rows = sorted(({"id": int(im["id"]), "file_name": str(im["file_name"]),
                    "height": int(im["height"]), "width": int(im["width"])} for im in images),
                  key=lambda im: im["id"])
    lines = ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    return ('{"info": {"description": "the images of a segdist run"},\n"images": [\n' + lines
            + '],\n"annotations": [],\n"categories": [{"id": %d, "name": "object", '
            '"supercategory": "object"}]}\n' % CATEGORY_ID).encode("utf-8")
