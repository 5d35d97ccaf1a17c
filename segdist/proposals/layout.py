"""The output layout (every folder and file name a run writes), and writing a chunk atomically.

Layout for an output URI ``OUT`` (see docs/formats.md); this module is the one place that knows
these names (the job, the proposal store and the evaluation all ask it)::

    OUT/parquet/chunk-000012.parquet
    OUT/coco-json/chunk-000012.segm.json[.gz]   (only when the proposals have masks)
    OUT/coco-json/chunk-000012.bbox.json[.gz]
    OUT/coco-json/images.json                   the run's images (id, file_name, height, width)
    OUT/manifest.json                            written last by the job's driver
    OUT/_segdist/run.json                        the job's run record (written before any chunk)
    OUT/_segdist/lease.json                      the driver writing the output now
    OUT/_segdist/chunks/chunk-000012.json        the job's per-chunk commit records
    OUT/eval/                                    ``segdist evaluate``'s report (default place)

Every file is written with :func:`segdist.storage.atomic_write`, so each appears whole or not at
all. The files of a chunk are written in a fixed order (segm, bbox, parquet) and a chunk counts as
written only when all of them exist (:func:`chunk_committed`); a writer killed between two files
leaves a chunk that is not committed and is rewritten (byte-identical) on resume.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from segdist import storage
from segdist.proposals import cocojson
from segdist.proposals import parquet as parquet_format
from segdist.proposals.types import ImageProposals
from segdist.storage_errors import retry

FORMATS = ("coco-json", "parquet")
PARQUET_DIR = "parquet"
COCO_DIR = "coco-json"
IMAGES_INDEX = "images.json"  # beside the COCO-JSON chunks: written by the job at its end
MANIFEST = "manifest.json"
STATE_DIR = "_segdist"
RUN_FILE = "run.json"
LEASE_FILE = "lease.json"  # the driver writing the output now (segdist.job.lease)
CHUNKS_DIR = "chunks"
EVAL_DIR = "eval"
CHUNK_PREFIX = "chunk-"
#: A chunk's files (or a killed writer's temporary file of one) in the format folders.
CHUNK_FILE_RE = re.compile(r"^(\.tmp-)?" + re.escape(CHUNK_PREFIX) + r"\d{6,}\.")
#: A COCO-JSON chunk file: groups (chunk index, "segm" or "bbox", ".gz" or None).
COCO_CHUNK_RE = re.compile(re.escape(CHUNK_PREFIX) + r"(\d+)\.(segm|bbox)\.json(\.gz)?$")
# Write order: Parquet last, since it is the one file that also lists zero-proposal images.
_ORDER = ("segm", "bbox", "parquet")


def chunk_name(i: int) -> str:
    """``chunk_name(12) -> "chunk-000012"`` (six digits: one million chunks sort lexically)."""
    if i < 0:
        raise ValueError(f"chunk index must be >= 0, got {i}")
    return f"{CHUNK_PREFIX}{i:06d}"


def manifest_uri(out_uri: str) -> str:
    """``OUT/manifest.json``."""
    return storage.join(out_uri, MANIFEST)


def manifest_candidates(location: str) -> list[str]:
    """Where the manifest of the run holding ``location`` is: in it, or one level up when
    ``location`` is one of the run's format folders (``OUT/parquet``, ``OUT/coco-json``)."""
    root = location.rstrip("/")
    out = [manifest_uri(root)]
    parent, base = root.rsplit("/", 1) if "/" in root else ("", root)
    if base in (PARQUET_DIR, COCO_DIR) and parent:
        out.append(manifest_uri(parent))
    return out


def _check_formats(formats: Iterable[str]) -> list[str]:
    formats = list(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {formats}")
    return formats


def chunk_uris(out_uri: str, i: int, formats: Iterable[str], gzip: bool = False, *,
               masks: bool = True) -> dict[str, str]:
    """URIs of chunk ``i``'s files, keyed ``"parquet"``, ``"segm"``, ``"bbox"`` (those in use).

    ``masks=False`` (box-only proposals, e.g. ``maskrcnn-rpn``) leaves out the segm file.
    """
    formats = _check_formats(formats)
    name = chunk_name(i)
    ext = ".json.gz" if gzip else ".json"
    uris: dict[str, str] = {}
    if "coco-json" in formats:
        if masks:
            uris["segm"] = storage.join(out_uri, COCO_DIR, f"{name}.segm{ext}")
        uris["bbox"] = storage.join(out_uri, COCO_DIR, f"{name}.bbox{ext}")
    if "parquet" in formats:
        uris["parquet"] = storage.join(out_uri, PARQUET_DIR, f"{name}.parquet")
    return uris


def _check_chunk(proposals: Sequence[ImageProposals]) -> bool:
    """Validate a chunk before anything is written; returns whether it carries masks."""
    seen: set[int] = set()
    with_masks = {p.counts is not None for p in proposals if len(p)}
    if len(with_masks) > 1:
        raise ValueError("a chunk mixes images with masks and box-only images; write them apart")
    for p in proposals:
        if p.image_id in seen:
            raise ValueError(f"image {p.image_id} appears twice in one chunk")
        seen.add(p.image_id)
        if len(p) > 1 and (p.scores[1:] > p.scores[:-1]).any():
            raise ValueError(f"image {p.image_id}: proposals must be sorted by descending score")
        if p.height < 0 or p.width < 0:
            raise ValueError(f"image {p.image_id}: negative size {p.height}x{p.width}")
        if p.counts is not None and len(p) and (p.height < 1 or p.width < 1):
            raise ValueError(f"image {p.image_id}: masks need a positive image size, got "
                             f"{p.height}x{p.width}")
    # A chunk of images without any proposal writes the segm file too (an empty list), so that
    # chunk_committed(masks=True) of a mask model holds for it.
    return with_masks.pop() if with_masks else True


def write_chunk(out_uri: str, i: int, proposals: Sequence[ImageProposals], formats: Iterable[str],
                gzip: bool = False, storage_options: Mapping[str, Any] | None = None, *,
                row_group_rows: int = parquet_format.ROW_GROUP_ROWS,
                file_names: Mapping[int, str] | None = None,
                failed: Sequence[Mapping[str, Any]] = (),
                retry_s: float = 0.0) -> dict[str, dict[str, Any]]:
    """Write chunk ``i`` in the given formats, each file atomically; images sorted by id.

    Args:
        out_uri: output location (any fsspec URI).
        i: chunk index (names the files).
        proposals: the chunk's images, unique ids, each sorted by descending score; all with masks
            or all box-only (counts None).
        formats: subset of ``("coco-json", "parquet")``.
        gzip: write ``.json.gz`` instead of ``.json``.
        file_names: image id -> the image's file name (relative path), stored in the Parquet
            file's per-image metadata (COCO results have no place for it: ``images.json``).
        failed: the chunk's images that could not be processed (``image_id``, ``file_name``,
            ``reason``); the Parquet file's metadata lists them (COCO results cannot).
        retry_s: how long a transient storage error is retried per file (backoff with jitter,
            :func:`segdist.storage_errors.retry`), the encoded file kept in memory meanwhile.
    Returns:
        ``{key: {"uri", "bytes", "etag", "images", "proposals"}}`` for every file written
        (``etag``: the store's, where the write returns one, else None).
    """
    formats = _check_formats(formats)
    masks = _check_chunk(proposals)
    ordered = sorted(proposals, key=lambda p: p.image_id)
    uris = chunk_uris(out_uri, i, formats, gzip, masks=masks)
    n_props = sum(len(p) for p in ordered)
    info: dict[str, dict[str, Any]] = {}
    for key in _ORDER:
        if key not in uris:
            continue
        if key == "segm":
            data = cocojson.encode_segm(ordered, gzip_output=gzip)
        elif key == "bbox":
            data = cocojson.encode_bbox(ordered, gzip_output=gzip)
        else:
            data = parquet_format.encode(ordered, row_group_rows=row_group_rows,
                                         file_names=file_names, failed=failed)
        etag = retry(lambda: storage.atomic_write(uris[key], data, storage_options), retry_s,
                     f"write {uris[key]}")
        # COCO results list only images with proposals; Parquet's metadata lists them all.
        images = len(ordered) if key == "parquet" else sum(1 for p in ordered if len(p))
        info[key] = {"uri": uris[key], "bytes": len(data), "etag": etag, "images": images,
                     "proposals": n_props}
        del data
    return info


def chunk_committed(out_uri: str, i: int, formats: Iterable[str], gzip: bool = False,
                    storage_options: Mapping[str, Any] | None = None, *, masks: bool = True) -> bool:
    """True when every file of chunk ``i`` exists (pass ``masks=False`` for box-only runs)."""
    return all(storage.exists(u, storage_options)
               for u in chunk_uris(out_uri, i, formats, gzip, masks=masks).values())


def images_index_uri(out_uri: str) -> str:
    """``OUT/coco-json/images.json``."""
    return storage.join(out_uri, COCO_DIR, IMAGES_INDEX)


def write_images_index(out_uri: str, images: Sequence[Mapping[str, Any]],
                       storage_options: Mapping[str, Any] | None = None) -> str:
    """Write ``OUT/coco-json/images.json`` (atomically): ``images`` are ``{"id", "file_name",
    "height", "width"}``; see :func:`segdist.proposals.cocojson.encode_images_index`."""
    uri = images_index_uri(out_uri)
    storage.atomic_write(uri, cocojson.encode_images_index(images), storage_options)
    return uri
