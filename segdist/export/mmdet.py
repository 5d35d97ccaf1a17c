"""Export for MMDetection 3.x (``proposal_file=`` of a detection dataset, ``LoadProposals``).

The file is a pickle of a dict keyed by ``"<parent_dir>/<file_name>"`` — the image file's folder
name and file name, as ``BaseDetDataset.load_proposals`` computes them from ``img_path`` (e.g.
``"val2017/000000000139.jpg"``) — each value ``{"bboxes": float32[N, 4] xyxy pixels, "scores":
float32[N]}`` sorted by score (descending). Every dataset image has an entry (MMDetection checks
that the file has as many entries as the dataset), empty arrays when it has no proposals.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from typing import Any

from segdist import storage
from segdist.storage import path_link
from segdist.data.records import Dataset, ImageRecord
from segdist.errors import SegdistError
from segdist.export.boxes import xywh_to_xyxy
from segdist.export.streaming import StreamedDict, dump_streaming, union_images
from segdist.proposals.store import ProposalStore


def mmdet_key(record: ImageRecord) -> str:
    """``"<parent_dir>/<file_name>"`` of an image (its URI's folder name and base name).

    For a chained fsspec URI the path comes from the link that holds it
    (:func:`segdist.storage.path_link`): ``simplecache::s3://b/val2017/x.jpg`` ->
    ``val2017/x.jpg``, ``zip://val2017/x.jpg::s3://b/images.zip`` -> ``val2017/x.jpg``.
    """
    path = path_link(record.uri).split("://", 1)[-1].replace("\\", "/")
    return posixpath.join(posixpath.basename(posixpath.dirname(path)), posixpath.basename(path))


def export_mmdet(store: ProposalStore, out_uri: str, dataset: Dataset, *, top_k: int | None = None,
                 storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the MMDetection 3.x proposals pickle for ``dataset`` to ``out_uri`` (streamed).

    Raises SegdistError when the proposals hold images the dataset does not have (wrong dataset)
    or two dataset images share a key.
    """
    records = dataset.by_id()
    stray = sorted(set(store.image_ids()) - set(records))
    if stray:
        raise SegdistError(
            f"{len(stray)} proposal images are not in dataset {dataset.name!r} (e.g. {stray[:5]}): "
            "give the dataset the proposals were generated for")
    keys = {i: mmdet_key(r) for i, r in records.items()}
    if len(set(keys.values())) != len(keys):
        raise SegdistError(f"dataset {dataset.name!r}: two images share a '<parent_dir>/<file_name>'"
                           " key; MMDetection cannot tell them apart")
    counted = {"proposals": 0}

    def items():
        for p in union_images(store, list(records), masks=False, top_k=top_k):
            counted["proposals"] += len(p)
            yield keys[p.image_id], {"bboxes": xywh_to_xyxy(p.boxes), "scores": p.scores.copy()}

    with storage.atomic_open(out_uri, storage_options) as f:
        dump_streaming(StreamedDict(items), f)
    return {"uri": out_uri, "images": len(records), "proposals": counted["proposals"]}
