"""``OUT/manifest.json``: what a run produced, written last (atomically) by the driver.

It records the config (credentials redacted), the model and its weights' sha256, package versions,
every committed chunk with its image and proposal counts and file names (relative to the output),
the images that failed and why, the chunks that failed, timings (``timings``: this run's;
``runs``: those of every run that wrote chunks into the output, oldest first), the hosts whose
workers wrote the committed chunks, and ``file_names``: every image id the committed chunks account
for -> the image's file name (its path relative to the dataset). ``complete`` is true only when
every chunk of the plan is committed.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from segdist import __version__, storage
from segdist.data.records import ImageRecord
from segdist.job.state import ChunkRecord
from segdist.proposals.layout import MANIFEST

MANIFEST_VERSION = 1
_PACKAGES = ("torch", "torchvision", "ray", "pycocotools", "pyarrow", "numpy", "fsspec", "s3fs",
             "pillow", "pydantic")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version(), "segdist": __version__}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def image_index(records: Mapping[int, ChunkRecord],
                known: Mapping[int, ImageRecord]) -> list[dict[str, Any]]:
    """``{"id", "file_name", "height", "width"}`` of every image the records wrote, by id.

    From each record's ``image_info`` (the size its worker decoded); records written before
    segdist kept it fall back to the dataset's record of the image (``known``).
    """
    out = []
    for rec in records.values():
        info = {e["id"]: e for e in rec.image_info}
        for image_id in rec.image_ids:
            entry = info.get(image_id)
            if entry is None and image_id in known:
                r = known[image_id]
                entry = {"id": image_id, "file_name": r.file_name, "height": r.height,
                         "width": r.width}
            if entry is not None:
                out.append(entry)
    return sorted(out, key=lambda e: e["id"])


def build_manifest(*, config: Mapping[str, Any], model: Mapping[str, Any], dataset: Mapping[str, Any],
                   chunk_size: int, n_chunks: int, records: Mapping[int, ChunkRecord],
                   failed_chunks: list[Mapping[str, Any]], timings: Mapping[str, Any],
                   images: list[Mapping[str, Any]] | None = None,
                   runs: list[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The manifest as plain data (see the module docstring); ``records`` by chunk index,
    ``images`` what :func:`image_index` gives for them (for ``file_names``), ``runs`` the timings
    of every run that wrote chunks (this one included, when it did)."""
    chunks = []
    failed_images = []
    for index in sorted(records):
        rec = records[index]
        chunks.append({"index": index, "name": rec.name, "images": rec.images,
                       "proposals": rec.proposals, "failed_images": len(rec.failed),
                       "files": {k: v["path"] for k, v in sorted(rec.files.items())},
                       "bytes": sum(v.get("bytes", 0) for v in rec.files.values()),
                       "first_image_id": rec.image_ids[0] if rec.image_ids else None,
                       "last_image_id": rec.image_ids[-1] if rec.image_ids else None})
        failed_images.extend({"chunk": index, **f} for f in rec.failed)
    return {
        "manifest_version": MANIFEST_VERSION,
        "complete": len(records) == n_chunks and not failed_chunks,
        "written": utc_now(),
        "config": dict(config),
        "model": dict(model),
        "dataset": dict(dataset),
        "packages": package_versions(),
        "chunk_size": chunk_size,
        "totals": {
            "chunks": n_chunks,
            "chunks_committed": len(records),
            "chunks_failed": len(failed_chunks),
            "images": sum(c["images"] for c in chunks),
            "images_failed": len(failed_images),
            "proposals": sum(c["proposals"] for c in chunks),
        },
        "chunks": chunks,
        "failed_images": failed_images,
        "failed_chunks": list(failed_chunks),
        "timings": dict(timings),
        "runs": [dict(r) for r in runs or ()],
        # A record's worker is "host:pid".
        "hosts": sorted({rec.worker.rsplit(":", 1)[0] for rec in records.values() if rec.worker}),
        # JSON keys are strings: {"2026000001": "images/2026_000001.jpg", ...}, ascending id.
        "file_names": {str(i): name for i, name in sorted(
            [*((int(e["id"]), e["file_name"]) for e in images or ()),
             *((int(f["image_id"]), f["file_name"]) for f in failed_images
               if f.get("file_name") is not None)])},
    }


def write_manifest(out_uri: str, manifest: Mapping[str, Any],
                   storage_options: Mapping[str, Any] | None = None) -> str:
    """Write ``OUT/manifest.json`` (atomically); returns its URI."""
    uri = storage.join(out_uri, MANIFEST)
    storage.atomic_write(uri, json.dumps(manifest, indent=1).encode(), storage_options)
    return uri
