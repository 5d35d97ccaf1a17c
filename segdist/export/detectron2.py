"""Export for Detectron2's precomputed proposals (``MODEL.LOAD_PROPOSALS``).

The file is a pickle of ``{"ids": [image_id, ...], "boxes": [float32[N, 4] XYXY_ABS, ...],
"objectness_logits": [float32[N], ...], "bbox_mode": 0}`` (BoxMode.XYXY_ABS = 0), images in
ascending id order, each image's proposals in our rank order. Detectron2's
``load_proposals_into_dataset`` matches ``str(id)`` against the dataset's ``image_id`` and re-sorts
each image by logit (descending); ``logit`` is strictly monotonic, so that sort gives back our
order (ties in score stay ties). Config snippet: docs/downstream.md.

With ``file_names`` (an image folder's run) the ``ids`` are the images' file names (paths relative
to the folder) instead: a Detectron2 dataset of one's own photos registers them as ``image_id``,
and ``load_proposals_into_dataset`` compares ``str(image_id)`` with ``str(id)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from segdist import storage
from segdist.errors import SegdistError
from segdist.export.boxes import logit, xywh_to_xyxy
from segdist.export.streaming import StreamedList, dump_streaming, union_images
from segdist.proposals.store import ProposalStore

BBOX_MODE_XYXY_ABS = 0


def export_detectron2(store: ProposalStore, out_uri: str, *, dataset_ids: Sequence[int] = (),
                      top_k: int | None = None,
                      storage_options: Mapping[str, Any] | None = None,
                      file_names: Mapping[int, str] | None = None) -> dict[str, Any]:
    """Write the Detectron2 proposals pickle to ``out_uri`` (atomically, streamed).

    Args:
        store: the proposals.
        out_uri: the ``.pkl`` file to write (any fsspec URI).
        dataset_ids: image ids of the dataset Detectron2 will load; ids without proposals get empty
            entries (Detectron2 raises KeyError for a dataset image missing from the file).
        top_k: keep at most this many proposals per image (None: all).
        file_names: image id -> file name; when given, the pickle's ``ids`` are these names
            (every image needs one), still in ascending id order.
    Returns:
        ``{"uri", "images", "proposals"}``.
    Raises SegdistError when ``file_names`` lacks an image or gives two images one name.
    """
    ids = sorted(set(store.image_ids()) | {int(i) for i in dataset_ids})
    keys: list[Any] = ids
    if file_names is not None:
        unnamed = [i for i in ids if i not in file_names]
        if unnamed:
            raise SegdistError(f"{len(unnamed)} images have no file name (e.g. {unnamed[:5]}): "
                               "give the dataset the proposals were made for, or export ids")
        keys = [file_names[i] for i in ids]
        if len(set(keys)) != len(keys):
            raise SegdistError("two images share a file name; Detectron2 could not tell them "
                               "apart: export ids instead")
    counted = {"proposals": 0}

    def boxes():
        for p in union_images(store, dataset_ids, masks=False, top_k=top_k):
            counted["proposals"] += len(p)
            yield xywh_to_xyxy(p.boxes)

    def logits():
        for p in union_images(store, dataset_ids, masks=False, top_k=top_k):
            yield logit(p.scores)

    payload = {
        "ids": keys,
        "boxes": StreamedList(boxes),
        "objectness_logits": StreamedList(logits),
        "bbox_mode": BBOX_MODE_XYXY_ABS,
    }
    with storage.atomic_open(out_uri, storage_options) as f:
        dump_streaming(payload, f)
    return {"uri": out_uri, "images": len(ids), "proposals": counted["proposals"]}
