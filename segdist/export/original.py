"""Export in the layout of the original DeepMask/SharpMask precomputed proposals.

``evalPerImage.lua`` wrote one COCO results JSON per 500 images, named ``props-<start>-<end>.json``
with 1-based, inclusive positions in the sorted image id list (``props-1-500.json``,
``props-501-1000.json``, ...); segments and boxes were published as separate downloads. This
export writes::

    OUT/segm/props-1-500.json     segmentation results (no "bbox"), category_id 1
    OUT/bbox/props-1-500.json     bbox results [x, y, w, h], category_id 1

(the last file ends at the number of images; ``.json.gz`` with gzip). Positions count every image
of the dataset when one is given (images without proposals have no results but keep their place),
else every image of the proposals. Box-only proposals write only ``bbox/``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from segdist import storage
from segdist.export.streaming import union_images
from segdist.proposals import cocojson
from segdist.proposals.store import ProposalStore
from segdist.proposals.types import ImageProposals

PER_FILE = 500


def props_name(start: int, end: int, gzip: bool = False) -> str:
    """``props_name(1, 500) -> "props-1-500.json"`` (1-based inclusive positions)."""
    return f"props-{start}-{end}.json" + (".gz" if gzip else "")


def export_original(store: ProposalStore, out_uri: str, *, dataset_ids: Sequence[int] = (),
                    per_file: int = PER_FILE, gzip: bool = False, top_k: int | None = None,
                    storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``segm/`` and ``bbox/`` ``props-<start>-<end>.json`` files, one batch in memory at a time.

    Returns ``{"files": [uri, ...], "images", "proposals"}``.
    """
    if per_file < 1:
        raise ValueError(f"per_file must be >= 1, got {per_file}")
    files: list[str] = []
    totals = {"images": 0, "proposals": 0}
    batch: list[ImageProposals] = []

    def flush():
        start = totals["images"] + 1
        end = totals["images"] + len(batch)
        name = props_name(start, end, gzip)
        with_masks = [p for p in batch if len(p)]
        if any(p.counts is not None for p in with_masks) or not with_masks:
            uri = storage.join(out_uri, "segm", name)
            storage.atomic_write(uri, cocojson.encode_segm(with_masks, gzip_output=gzip),
                                 storage_options)
            files.append(uri)
        uri = storage.join(out_uri, "bbox", name)
        storage.atomic_write(uri, cocojson.encode_bbox(with_masks, gzip_output=gzip), storage_options)
        files.append(uri)
        totals["images"] = end
        totals["proposals"] += sum(len(p) for p in batch)
        batch.clear()

    for p in union_images(store, dataset_ids, masks=True, top_k=top_k):
        batch.append(p)
        if len(batch) == per_file:
            flush()
    if batch:
        flush()
    return {"files": files, "images": totals["images"], "proposals": totals["proposals"]}
