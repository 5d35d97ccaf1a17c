"""PASCAL VOC 2007/2012 layout read through fsspec, converted to COCO-format ground truth.

Layout (``root`` = a ``VOC20xx`` folder)::

    root/ImageSets/<image_set>/<split>.txt   image names, one per line (Main or Segmentation)
    root/Annotations/<name>.xml              size, objects (name, difficult, bndbox 1-based inclusive)
    root/JPEGImages/<name>.jpg               the images
    root/SegmentationObject/<name>.png       palette PNG, pixel = k for the k-th XML object, 0 =
                                             background, 255 = void (only some images have one)
    root/classes.txt                         optional (a segdist extension): class names, one per
                                             line, category id = line number (1-based)

Conversion rules (docs/datasets.md):

- Image ids: :func:`voc_image_id` (``2008_000123`` -> 2008000123, ``000123`` -> 123, anything else a
  hash in [1e10, 2**53)).
- Boxes: VOC ``xmin ymin xmax ymax`` are 1-based inclusive pixel indices; COCO ``[x, y, w, h]`` has
  ``x = xmin - 1``, ``y = ymin - 1``, ``w = xmax - xmin + 1``, ``h = ymax - ymin + 1``.
- Categories: ``classes`` argument, else ``root/classes.txt``, else the 20 VOC classes, ids 1..N in
  that order. An object whose class is not in the list is an error.
- Segments: only images with a SegmentationObject PNG get ``segmentation`` (compressed RLE, void
  pixels excluded) and ``area`` = mask pixel count; those images have ``has_segm: true`` and are
  listed in ``coco_gt["segm_image_ids"]``. Other images have boxes only (``area`` = box area, no
  ``segmentation`` key): segment evaluation must restrict ``imgIds`` to ``segm_image_ids``.
- ``difficult`` objects, and segmented images' objects with no pixel in their mask, get
  ``iscrowd = 1`` (which pycocotools treats as ignore: they neither count as ground truth to recall
  nor penalise proposals that cover them).
"""

from __future__ import annotations

import io
import posixpath
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segdist.data.ids import hashed_id
from segdist.data.records import Dataset, ImageRecord
from segdist.errors import DatasetError, StorageError
from segdist.storage import join, read_bytes, url_to_fs

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
VOID_INDEX = 255

_YEAR_NAME = re.compile(r"(\d{4})_(\d{6})")
_VOC2007_NAME = re.compile(r"\d{6}")
_FETCH_BATCH = 256  # files fetched per fsspec cat() call: concurrent on object stores, bounded memory


def voc_image_id(name: str) -> int:
    """Stable integer image id for a VOC image name.

    ``YYYY_NNNNNN`` with YYYY >= 1000 -> ``YYYY * 1_000_000 + NNNNNN`` (``2008_000123`` ->
    2008000123); six digits (VOC2007) -> their value (``000123`` -> 123); any other name ->
    ``1e10 + (first 8 bytes of sha256(name), big-endian) mod (2**53 - 1e10)``. The three ranges are
    disjoint, and the ids are the same on every machine and Python version.
    """
    m = _YEAR_NAME.fullmatch(name)
    if m and int(m.group(1)) >= 1000:
        return int(m.group(1)) * 1_000_000 + int(m.group(2))
    if _VOC2007_NAME.fullmatch(name):
        return int(name)
    # [1e9, 1e10) and [0, 1e6) above; the hash range [1e10, 2**53) cannot collide with them.
    return hashed_id(name)


@dataclass
class VocObject:
    """One ``<object>`` of an annotation XML.

    ``box`` is VOC's ``(xmin, ymin, xmax, ymax)``: 1-based, inclusive pixel indices (floats, as
    some files carry decimals).
    """

    name: str
    box: tuple[float, float, float, float]
    difficult: bool = False
    truncated: bool = False


@dataclass
class VocImage:
    """One image's annotation: XML fields plus, when the image has one, its SegmentationObject.

    ``instance_mask`` is ``uint8[height, width]`` of palette indices (k = k-th object, 0 background,
    255 void), or None when the image has no SegmentationObject PNG.
    """

    name: str
    file_name: str
    height: int
    width: int
    objects: list[VocObject] = field(default_factory=list)
    instance_mask: np.ndarray | None = None


def read_classes(root: str, storage_options: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """``root/classes.txt`` (one class per line) if it exists, else the 20 VOC classes."""
    uri = join(root, "classes.txt")
    try:
        text = read_bytes(uri, storage_options).decode("utf-8")
    except StorageError:
        return VOC_CLASSES
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not names or len(set(names)) != len(names):
        raise DatasetError(f"{uri}: expected distinct class names, one per line, got {names!r}")
    return names


def parse_voc_xml(data: bytes, uri: str) -> VocImage:
    """Parse one Annotations XML. Raises DatasetError naming the file and the missing element."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise DatasetError(f"{uri} is not valid XML ({exc})") from None
    name = posixpath.splitext(posixpath.basename(uri))[0]
    file_name = (root.findtext("filename") or "").strip() or f"{name}.jpg"
    size = root.find("size")
    if size is None:
        raise DatasetError(f"{uri}: missing element <size> (with <width> and <height>)")
    width, height = _int(size, "width", uri), _int(size, "height", uri)
    if width < 1 or height < 1:
        raise DatasetError(f"{uri}: <size> must be positive, got {width} x {height}")
    objects = []
    for k, obj in enumerate(root.findall("object"), start=1):
        cls = (obj.findtext("name") or "").strip()
        if not cls:
            raise DatasetError(f"{uri}: object {k} has no <name>")
        box_el = obj.find("bndbox")
        if box_el is None:
            raise DatasetError(f"{uri}: object {k} ({cls}) has no <bndbox>")
        box = tuple(_float(box_el, tag, uri) for tag in ("xmin", "ymin", "xmax", "ymax"))
        if box[2] < box[0] or box[3] < box[1]:
            raise DatasetError(f"{uri}: object {k} ({cls}) has xmax < xmin or ymax < ymin: {box}")
        objects.append(VocObject(
            name=cls, box=box,  # type: ignore[arg-type]
            difficult=(obj.findtext("difficult") or "0").strip() == "1",
            truncated=(obj.findtext("truncated") or "0").strip() == "1",
        ))
    return VocImage(name=name, file_name=file_name, height=height, width=width, objects=objects)


def read_instance_mask(data: bytes, uri: str) -> np.ndarray:
    """Decode a SegmentationObject PNG to its palette indices, ``uint8[H, W]`` (not to colours)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in ("P", "L"):
                raise DatasetError(
                    f"{uri}: SegmentationObject PNGs hold instance indices (palette or grayscale), "
                    f"got colour mode {im.mode}"
                )
            return np.array(im, dtype=np.uint8)
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 - any Pillow failure: report the file
        raise DatasetError(f"{uri}: unreadable SegmentationObject PNG ({exc})") from None


def voc_to_coco(
    images: Iterable[VocImage],
    classes: Sequence[str] = VOC_CLASSES,
    description: str = "PASCAL VOC converted by segdist",
) -> dict[str, Any]:
    """Build the COCO instances dict of VOC images (rules in the module docstring).

    ``images`` may be a generator: each image's instance mask is encoded and not kept, so a whole
    split converts in bounded memory. Images are ordered by id; annotation ids are 1..M in image
    order, then XML object order.
    """
    from pycocotools import mask as mask_utils

    cat_ids = {name: i for i, name in enumerate(classes, start=1)}
    out_images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    per_image: dict[int, list[dict[str, Any]]] = {}
    for img in images:
        image_id = voc_image_id(img.name)
        has_segm = img.instance_mask is not None
        out_images.append({
            "id": image_id, "file_name": img.file_name, "height": img.height, "width": img.width,
            "has_segm": has_segm, "voc_name": img.name,
        })
        rles: list[dict] = []
        areas: list[int] = []
        if has_segm:
            mask = img.instance_mask
            if mask.shape != (img.height, img.width):
                raise DatasetError(
                    f"{img.name}: SegmentationObject is {mask.shape[1]} x {mask.shape[0]} but the "
                    f"XML <size> says {img.width} x {img.height}"
                )
            present = set(np.unique(mask).tolist()) - {0, VOID_INDEX}
            extra = sorted(k for k in present if k > len(img.objects))
            if extra:
                raise DatasetError(
                    f"{img.name}: SegmentationObject has instance indices {extra} but the XML lists "
                    f"{len(img.objects)} objects (index k must be the k-th <object>)"
                )
            if img.objects:
                # H x W x K in Fortran order: pycocotools encodes column-major runs per mask.
                stack = np.asfortranarray(np.stack(
                    [mask == k for k in range(1, len(img.objects) + 1)], axis=2).astype(np.uint8))
                rles = mask_utils.encode(stack)
                areas = [int(a) for a in stack.sum(axis=(0, 1))]
        anns = []
        for k, obj in enumerate(img.objects):
            if obj.name not in cat_ids:
                raise DatasetError(
                    f"{img.name}: object class {obj.name!r} is not one of the dataset's classes "
                    f"{list(classes)}; list the classes in classes.txt beside ImageSets/ or pass "
                    "classes=..."
                )
            xmin, ymin, xmax, ymax = obj.box
            bbox = [xmin - 1.0, ymin - 1.0, xmax - xmin + 1.0, ymax - ymin + 1.0]
            ann: dict[str, Any] = {
                "image_id": image_id, "category_id": cat_ids[obj.name], "bbox": bbox,
                "iscrowd": int(obj.difficult), "difficult": int(obj.difficult),
                "truncated": int(obj.truncated),
            }
            if has_segm:
                rle = rles[k]
                ann["segmentation"] = {"size": [img.height, img.width],
                                       "counts": rle["counts"].decode("ascii")}
                ann["area"] = float(areas[k])
                if areas[k] == 0:
                    ann["iscrowd"] = 1  # nothing to recall: ignore rather than count as missed
            else:
                ann["area"] = bbox[2] * bbox[3]
            anns.append(ann)
        if image_id in per_image:
            raise DatasetError(f"two images map to image id {image_id}, one of them {img.name}")
        per_image[image_id] = anns
        img.instance_mask = None  # encoded: do not keep the full-resolution mask alive

    out_images.sort(key=lambda im: im["id"])
    next_id = 1
    for im in out_images:
        for ann in per_image[im["id"]]:
            annotations.append({"id": next_id, **ann})
            next_id += 1
    return {
        "info": {"description": description},
        "images": out_images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n, "supercategory": "voc"} for n, i in cat_ids.items()],
        "segm_image_ids": [im["id"] for im in out_images if im["has_segm"]],
    }


def read_image_set(root: str, split: str, image_set: str = "Main",
                   storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Image names listed in ``root/ImageSets/<image_set>/<split>.txt`` (first column, in order,
    duplicates dropped)."""
    uri = join(root, "ImageSets", image_set, f"{split}.txt")
    try:
        text = read_bytes(uri, storage_options).decode("utf-8")
    except StorageError:
        available = _list_names(join(root, "ImageSets", image_set), storage_options, ".txt")
        raise DatasetError(
            f"VOC image list {uri} does not exist; splits in ImageSets/{image_set}: "
            f"{available or 'none (is root the VOC20xx folder?)'}"
        ) from None
    # Per-class lists (aeroplane_val.txt) carry a second column (-1/0/1); the name is the first.
    names = (line.split()[0] for line in text.splitlines() if line.strip())
    return list(dict.fromkeys(names))


def load_voc(
    root: str,
    split: str = "val",
    image_set: str = "Main",
    storage_options: Mapping[str, Any] | None = None,
    limit: int | None = None,
    image_ids: Iterable[int] | None = None,
    classes: Sequence[str] | None = None,
) -> Dataset:
    """Load a PASCAL VOC split as a Dataset with COCO-format ground truth.

    Args:
        root: URI of the ``VOC20xx`` folder.
        split: the list name in ImageSets (``train``, ``val``, ``trainval``, ``test``).
        image_set: ``Main`` (all images, boxes) or ``Segmentation`` (only segmented images).
        image_ids: keep only these ids (:func:`voc_image_id` of the names); each must be listed.
        limit: then keep the first ``limit`` images by ascending id.
        classes: category names, ids 1..N; default ``root/classes.txt`` or the 20 VOC classes.

    ImageRecord: ``file_name`` from the XML ``<filename>`` (else ``<name>.jpg``),
    ``uri = root/JPEGImages/<file_name>``, height and width from the XML ``<size>``.
    """
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be >= 1, got {limit}")
    names = read_image_set(root, split, image_set, storage_options)
    by_id: dict[int, str] = {}
    for name in names:
        image_id = voc_image_id(name)
        if image_id in by_id:
            raise DatasetError(f"VOC names {by_id[image_id]!r} and {name!r} map to the same image "
                               f"id {image_id}; rename one of them")
        by_id[image_id] = name
    ids = sorted(by_id)
    if image_ids is not None:
        wanted = {int(i) for i in image_ids}
        unknown = sorted(wanted - set(by_id))
        if unknown:
            raise DatasetError(f"image_ids not in ImageSets/{image_set}/{split}.txt: {unknown[:10]}")
        ids = [i for i in ids if i in wanted]
    if limit is not None:
        ids = ids[:limit]
    selected = [by_id[i] for i in ids]
    resolved = tuple(classes) if classes is not None else read_classes(root, storage_options)

    segmented = set(_list_names(join(root, "SegmentationObject"), storage_options, ".png"))
    parsed: list[VocImage] = []  # XMLs only (small); masks are streamed into voc_to_coco
    for start in range(0, len(selected), _FETCH_BATCH):
        batch = selected[start:start + _FETCH_BATCH]
        xml_uris = [join(root, "Annotations", f"{n}.xml") for n in batch]
        for uri, data in zip(xml_uris, _fetch(xml_uris, storage_options, "annotation XML")):
            parsed.append(parse_voc_xml(data, uri))

    def with_masks() -> Iterator[VocImage]:
        for start in range(0, len(parsed), _FETCH_BATCH):
            batch = parsed[start:start + _FETCH_BATCH]
            mask_uris = [join(root, "SegmentationObject", f"{img.name}.png")
                         for img in batch if img.name in segmented]
            masks = dict(zip(mask_uris, _fetch(mask_uris, storage_options, "SegmentationObject")))
            for img in batch:
                uri = join(root, "SegmentationObject", f"{img.name}.png")
                if uri in masks:
                    img.instance_mask = read_instance_mask(masks.pop(uri), uri)
                yield img

    coco_gt = voc_to_coco(
        with_masks(), resolved,
        description=f"PASCAL VOC {root} ImageSets/{image_set}/{split}.txt converted by segdist",
    )
    records = [
        ImageRecord(image_id=voc_image_id(img.name), file_name=img.file_name,
                    uri=join(root, "JPEGImages", img.file_name), height=img.height, width=img.width)
        for img in parsed
    ]
    name = f"{posixpath.basename(str(root).rstrip('/')) or 'voc'}-{image_set.lower()}-{split}"
    return Dataset(name=name, images=records, coco_gt=coco_gt,
                   storage_options=dict(storage_options or {}))


def _fetch(uris: list[str], storage_options: Mapping[str, Any] | None, what: str) -> list[bytes]:
    """Bytes of several files in one fsspec call (concurrent requests on object stores)."""
    if not uris:
        return []
    fs, _ = url_to_fs(uris[0], storage_options)
    paths = [url_to_fs(u, storage_options)[1] for u in uris]
    try:
        got = fs.cat(paths, on_error="return")
    except OSError as exc:
        raise StorageError(f"cannot read VOC {what} files under {posixpath.dirname(uris[0])}: {exc}")
    out = []
    for uri, path in zip(uris, paths):
        data = got.get(path) if isinstance(got, dict) else got
        if isinstance(data, FileNotFoundError) or data is None:
            raise DatasetError(f"VOC {what} {uri} does not exist")
        if isinstance(data, BaseException):
            raise StorageError(f"cannot read {uri}: {data}")
        out.append(data)
    return out


def _list_names(uri: str, storage_options: Mapping[str, Any] | None, suffix: str) -> list[str]:
    """Stems of the files with ``suffix`` directly under ``uri`` (empty if it does not exist)."""
    fs, path = url_to_fs(uri, storage_options)
    try:
        entries = fs.ls(path, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    stems = [posixpath.basename(e.rstrip("/")) for e in entries]
    return sorted(s[: -len(suffix)] for s in stems if s.endswith(suffix))


def _int(parent: ET.Element, tag: str, uri: str) -> int:
    return int(round(_float(parent, tag, uri)))


def _float(parent: ET.Element, tag: str, uri: str) -> float:
    text = parent.findtext(tag)
    if text is None:
        raise DatasetError(f"{uri}: missing element <{tag}> in <{parent.tag}>")
    try:
        return float(text.strip())
    except ValueError:
        raise DatasetError(f"{uri}: <{tag}> must be a number, got {text!r}") from None
