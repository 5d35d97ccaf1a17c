"""COCO instances JSON (2014/2017 layout) and LVIS v1 read through fsspec into a :class:`Dataset`.

The file is read once; ``Dataset.coco_gt`` is the instances dict itself, restricted to the selected
images (``image_ids``/``limit``) and their annotations, ready for ``pycocotools.coco.COCO``.
Annotation files whose name ends in ``.gz`` are gunzipped. Test-set "image info" files (images and
categories, no annotations) load too, with an empty annotation list.

LVIS files have the same structure with two differences that matter here: an image names its file
by ``coco_url`` (``http://images.cocodataset.org/train2017/000000155379.jpg``) instead of
``file_name``, and annotations have no ``iscrowd``. An image without ``file_name`` gets one from
its ``coco_url`` (``coco_url_layout``); ``iscrowd`` defaults to 0 as for any COCO file. LVIS's
per-image ``neg_category_ids`` and ``not_exhaustive_category_ids`` stay in ``coco_gt`` untouched:
class-agnostic recall (pycocotools with ``useCats = 0``) counts every annotated instance and has no
use for category-level labels of absence.
"""

from __future__ import annotations

import gzip
import json
import posixpath
import zlib
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from segdist.data.records import Dataset, ImageRecord
from segdist.errors import DatasetError, StorageError
from segdist.storage import join, read_bytes

_IMAGE_KEYS = ("id", "height", "width")  # and file_name, or coco_url (LVIS)
COCO_URL_LAYOUTS = ("split-folder", "flat")
_ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")


def load_coco(
    annotations_uri: str,
    images_uri: str,
    storage_options: Mapping[str, Any] | None = None,
    limit: int | None = None,
    image_ids: Iterable[int] | None = None,
    coco_url_layout: str = "split-folder",
) -> Dataset:
    """Load a COCO instances file (or an LVIS file: same structure).

    Args:
        annotations_uri: URI of ``instances_*.json`` / ``lvis_v1_*.json`` (or ``.json.gz``).
        images_uri: URI of the image folder; ``ImageRecord.uri = join(images_uri, file_name)``.
        storage_options: fsspec options for both URIs (credentials, endpoint).
        image_ids: keep only these images (every id must exist in the file).
        limit: then keep only the first ``limit`` images by ascending id.
        coco_url_layout: for images without ``file_name``: ``"split-folder"`` takes the last
            folder and the file name of ``coco_url`` (``train2017/000000155379.jpg``),
            ``"flat"`` the file name alone. The derived name is set as the entry's ``file_name``.

    Returns a Dataset named after the file (``instances_val2017``), images sorted by id, and
    ``coco_gt`` = the instances dict with ``images`` and ``annotations`` filtered to the selection.
    Raises StorageError if the file cannot be read, DatasetError if it is not a valid instances
    file (the message names the missing key and the entry).
    """
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be >= 1, got {limit}")
    if coco_url_layout not in COCO_URL_LAYOUTS:
        raise DatasetError(f"coco_url_layout must be one of {COCO_URL_LAYOUTS}, got "
                           f"{coco_url_layout!r}")
    gt = read_coco_json(annotations_uri, storage_options)
    images, annotations = _validated(gt, annotations_uri, coco_url_layout)

    if image_ids is not None:
        wanted = {int(i) for i in image_ids}
        known = {img["id"] for img in images}
        unknown = sorted(wanted - known)
        if unknown:
            raise DatasetError(
                f"{annotations_uri}: image_ids not in the file: {unknown[:10]}"
                + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
            )
        images = [img for img in images if img["id"] in wanted]
    images = sorted(images, key=lambda img: img["id"])
    if limit is not None:
        images = images[:limit]
    keep = {img["id"] for img in images}

    coco_gt = {k: v for k, v in gt.items() if k not in ("images", "annotations")}
    coco_gt["images"] = images
    coco_gt["annotations"] = [a for a in annotations if a["image_id"] in keep]
    coco_gt.setdefault("categories", [])

    records = [
        ImageRecord(
            image_id=img["id"], file_name=img["file_name"], uri=join(images_uri, img["file_name"]),
            height=img["height"], width=img["width"],
        )
        for img in images
    ]
    return Dataset(
        name=_dataset_name(annotations_uri), images=records, coco_gt=coco_gt,
        storage_options=dict(storage_options or {}),
    )


def read_coco_json(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read a JSON (or ``.gz`` JSON) file and return its top-level object, which must be a dict."""
    try:
        data = read_bytes(uri, storage_options)
    except StorageError as exc:
        raise StorageError(f"cannot read COCO annotations: {exc}") from None
    if uri.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetError(f"{uri} is not a valid gzip file ({exc})") from None
    try:
        obj = json.loads(data)
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{uri} is not UTF-8 JSON ({exc})") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{uri} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    if not isinstance(obj, dict):
        raise DatasetError(
            f"{uri}: expected a COCO instances object ({{'images': [...], 'annotations': [...], "
            f"'categories': [...]}}), got a JSON {type(obj).__name__}"
        )
    return obj


def _validated(gt: dict[str, Any], uri: str,
               coco_url_layout: str = "split-folder") -> tuple[list[dict], list[dict]]:
    """Check the keys the pipeline relies on; fill the two that COCO tools default, and LVIS
    images' ``file_name`` from their ``coco_url``."""
    if "images" not in gt:
        raise DatasetError(f"{uri}: missing key 'images' (a COCO instances file has 'images', "
                           "'annotations' and 'categories')")
    images, annotations = gt["images"], gt.get("annotations", [])
    for key, value in (("images", images), ("annotations", annotations),
                       ("categories", gt.get("categories", []))):
        if not isinstance(value, list):
            raise DatasetError(f"{uri}: '{key}' must be a list, got {type(value).__name__}")

    seen: dict[int, tuple[int, int]] = {}
    for pos, img in enumerate(images):
        _require(img, _IMAGE_KEYS, f"{uri}: images[{pos}]")
        if not isinstance(img["id"], int) or isinstance(img["id"], bool):
            raise DatasetError(f"{uri}: images[{pos}]['id'] must be an integer, got {img['id']!r}")
        if "file_name" not in img:
            img["file_name"] = _file_name_from_url(img, coco_url_layout, f"{uri}: images[{pos}]")
        for side in ("height", "width"):
            if not isinstance(img[side], int) or img[side] < 1:
                raise DatasetError(
                    f"{uri}: image id {img['id']}: '{side}' must be a positive integer, got {img[side]!r}"
                )
        if img["id"] in seen:
            raise DatasetError(f"{uri}: image id {img['id']} appears twice in 'images'")
        seen[img["id"]] = (img["height"], img["width"])

    for pos, ann in enumerate(annotations):
        _require(ann, _ANNOTATION_KEYS, f"{uri}: annotations[{pos}]")
        if ann["image_id"] not in seen:
            raise DatasetError(
                f"{uri}: annotation id {ann['id']} refers to image_id {ann['image_id']}, "
                "which is not in 'images'"
            )
        # pycocotools' COCOeval reads both; older third-party exports omit them.
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            ann["area"] = _area(ann, *seen[ann["image_id"]], uri)
    return images, annotations


def _file_name_from_url(img: dict[str, Any], layout: str, where: str) -> str:
    """An LVIS image's file name from its ``coco_url`` (see ``load_coco``'s coco_url_layout)."""
    url = img.get("coco_url")
    if not isinstance(url, str) or not url.strip():
        raise DatasetError(f"{where}: missing key 'file_name' (COCO) or 'coco_url' (LVIS): one of "
                           "them names the image file")
    parts = [p for p in urlsplit(url.strip()).path.split("/") if p]
    if not parts:
        raise DatasetError(f"{where}: 'coco_url' {url!r} names no file")
    return "/".join(parts[-2:] if layout == "split-folder" else parts[-1:])


def _require(entry: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(entry, dict):
        raise DatasetError(f"{where} must be an object, got {type(entry).__name__}")
    for key in keys:
        if key not in entry:
            raise DatasetError(f"{where}: missing key '{key}' (needed: {', '.join(keys)})")


def _area(ann: dict[str, Any], height: int, width: int, uri: str) -> float:
    """Area of an annotation without one: its segment's pixel count, else its box's area."""
    seg = ann.get("segmentation")
    if seg:
        from pycocotools import mask as mask_utils

        from segdist.data.masks import segmentation_to_rle

        try:
            return float(mask_utils.area(segmentation_to_rle(seg, height, width)))
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            raise DatasetError(f"{uri}: annotation id {ann['id']}: unreadable 'segmentation' "
                               f"({exc})") from None
    try:
        return float(ann["bbox"][2]) * float(ann["bbox"][3])
    except (TypeError, ValueError, IndexError):
        raise DatasetError(f"{uri}: annotation id {ann['id']}: 'bbox' must be [x, y, w, h], "
                           f"got {ann['bbox']!r}") from None


def _dataset_name(uri: str) -> str:
    name = posixpath.basename(uri.rstrip("/"))
    for suffix in (".gz", ".json"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name or "coco"
