"""Parquet chunk files of proposals: one row per proposal, sorted by (image_id, rank).

Schema (``SCHEMA``; documented in docs/formats.md):

| column   | type                          | meaning                                            |
|----------|-------------------------------|----------------------------------------------------|
| image_id | int64, not null               | the dataset's image id                             |
| rank     | int32, not null               | 0-based position in the image's score order        |
| score    | float32, not null             | probability in [0, 1], descending within an image  |
| bbox     | fixed_size_list<float32>[4]   | COCO [x, y, w, h] in image pixels                  |
| counts   | string, nullable              | COCO compressed RLE (column-major); null = box only|
| height   | int32, not null               | image height (mask size)                           |
| width    | int32, not null               | image width                                        |
| model    | dictionary<int32, string>     | model preset name                                  |
| label    | int32, nullable               | predicted class (Mask R-CNN) or null               |

Files are zstd-compressed with column statistics and a page index, in row groups of at most
``row_group_rows`` rows, so a ``pyarrow.dataset`` filter ``image_id == k`` reads one row group.
Because COCO results cannot represent an image without proposals, the file's key-value metadata
(key ``segdist.images``) lists every image of the chunk: ``[{"id", "height", "width", "n", "model",
"masks", "labels"}]`` plus ``"file_name"`` (the image's path relative to its dataset) when the
writer knows it — readers know an image with ``n = 0`` was processed, ``masks``/``labels`` say
whether ``counts``/``labels`` were None, and the reading API finds an image by file name. Key
``segdist.failed`` lists the chunk's images that could not be processed (a bad file),
``[{"id", "file_name", "reason"}]`` ascending by id, so the file alone tells which of its images
have no proposals and why (files written before the key existed lack it:
:func:`failed_from_metadata` returns ``[]`` for them).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from segdist.proposals.types import ImageProposals

IMAGES_KEY = b"segdist.images"
FAILED_KEY = b"segdist.failed"
VERSION_KEY = b"segdist.format_version"
FORMAT_VERSION = "1"
ROW_GROUP_ROWS = 4096  # ~4 images of 1000 proposals: random reads 1.5x faster than 8192, files ~6% larger

SCHEMA = pa.schema([
    pa.field("image_id", pa.int64(), nullable=False),
    pa.field("rank", pa.int32(), nullable=False),
    pa.field("score", pa.float32(), nullable=False),
    pa.field("bbox", pa.list_(pa.field("item", pa.float32(), nullable=False), 4), nullable=False),
    pa.field("counts", pa.string(), nullable=True),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("model", pa.dictionary(pa.int32(), pa.string()), nullable=False),
    pa.field("label", pa.int32(), nullable=True),
])


def image_entries(proposals: Sequence[ImageProposals],
                  file_names: Mapping[int, str] | None = None) -> list[dict[str, Any]]:
    """The ``segdist.images`` metadata entries of a chunk (one per image, in the given order);
    ``file_name`` for the images ``file_names`` (id -> name) has."""
    entries = []
    for p in proposals:
        e = {"id": int(p.image_id), "height": int(p.height), "width": int(p.width), "n": len(p),
             "model": p.model, "masks": p.counts is not None, "labels": p.labels is not None}
        if file_names is not None and int(p.image_id) in file_names:
            e["file_name"] = str(file_names[int(p.image_id)])
        entries.append(e)
    return entries


def failed_entries(failed: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The ``segdist.failed`` metadata entries from the job's failure records (``image_id``,
    ``file_name``, ``reason``; other keys such as the URI are left out), ascending by id."""
    return sorted(({"id": int(f["image_id"]), "file_name": str(f["file_name"]),
                    "reason": str(f["reason"])} for f in failed), key=lambda e: e["id"])


def to_table(proposals: Sequence[ImageProposals],
             file_names: Mapping[int, str] | None = None,
             failed: Sequence[Mapping[str, Any]] = ()) -> pa.Table:
    """Arrow table of the proposals (rows in the given image order, ranks 0..N-1), with metadata
    (``file_names``: id -> file name for the per-image entries; ``failed``: the chunk's images that
    could not be processed, see :func:`failed_entries`)."""
    ns = np.asarray([len(p) for p in proposals], dtype=np.int64)
    total = int(ns.sum())
    image_id = np.repeat(np.asarray([p.image_id for p in proposals], dtype=np.int64), ns)
    rank = (np.concatenate([np.arange(n, dtype=np.int32) for n in ns]) if total
            else np.zeros(0, np.int32))
    score = (np.concatenate([p.scores for p in proposals]) if total else np.zeros(0, np.float32))
    boxes = (np.concatenate([p.boxes for p in proposals]) if total
             else np.zeros((0, 4), np.float32)).astype(np.float32)
    height = np.repeat(np.asarray([p.height for p in proposals], dtype=np.int32), ns)
    width = np.repeat(np.asarray([p.width for p in proposals], dtype=np.int32), ns)
    models = sorted({p.model for p in proposals})
    model_idx = np.repeat(np.asarray([models.index(p.model) for p in proposals], dtype=np.int32), ns)

    counts: list[str | None] = []
    labels: list[int | None] = []
    for p in proposals:
        counts.extend([c.decode("ascii") for c in p.counts] if p.counts is not None else [None] * len(p))
        labels.extend(p.labels.tolist() if p.labels is not None else [None] * len(p))

    columns = [
        pa.array(image_id, pa.int64()),
        pa.array(rank, pa.int32()),
        pa.array(score, pa.float32()),
        pa.FixedSizeListArray.from_arrays(pa.array(boxes.reshape(-1), pa.float32()), 4),
        pa.array(counts, pa.string()),
        pa.array(height, pa.int32()),
        pa.array(width, pa.int32()),
        pa.DictionaryArray.from_arrays(pa.array(model_idx, pa.int32()), pa.array(models, pa.string())),
        pa.array(labels, pa.int32()),
    ]
    table = pa.Table.from_arrays(columns, schema=SCHEMA)
    meta = {IMAGES_KEY: json.dumps(image_entries(proposals, file_names), separators=(",", ":"),
                                   ensure_ascii=False).encode(),
            FAILED_KEY: json.dumps(failed_entries(failed), separators=(",", ":"),
                                   ensure_ascii=False).encode(),
            VERSION_KEY: FORMAT_VERSION.encode()}
    return table.replace_schema_metadata(meta)


def encode(proposals: Sequence[ImageProposals], *, row_group_rows: int = ROW_GROUP_ROWS,
           file_names: Mapping[int, str] | None = None,
           failed: Sequence[Mapping[str, Any]] = ()) -> bytes:
    """The Parquet file's bytes for one chunk; images are written in ascending id order.

    Args:
        proposals: the chunk's images (unique ids; any order), each sorted by descending score.
        row_group_rows: maximum rows per row group (smaller: finer skipping, larger footer).
        file_names: image id -> file name, kept in the per-image metadata.
        failed: the chunk's images that could not be processed, ``{"image_id", "file_name",
            "reason"}`` each (the job's failure records); listed in the metadata.
    """
    ordered = sorted(proposals, key=lambda p: p.image_id)
    table = to_table(ordered, file_names, failed)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=max(1, row_group_rows),
                   write_statistics=True, write_page_index=True, use_dictionary=["model"])
    return buf.getvalue()


def images_from_metadata(metadata: dict[bytes, bytes] | None, source: str) -> list[dict[str, Any]]:
    """The ``segdist.images`` entries of a file's key-value metadata (raises if absent)."""
    from segdist.errors import SegdistError

    if not metadata or IMAGES_KEY not in metadata:
        raise SegdistError(f"{source} has no '{IMAGES_KEY.decode()}' metadata: not a segdist "
                           "proposals Parquet file (see docs/formats.md)")
    return json.loads(metadata[IMAGES_KEY])


def failed_from_metadata(metadata: dict[bytes, bytes] | None) -> list[dict[str, Any]]:
    """The ``segdist.failed`` entries of a file's key-value metadata (``[]`` when absent: a file
    written before the key existed, or not by a job)."""
    if not metadata or FAILED_KEY not in metadata:
        return []
    return json.loads(metadata[FAILED_KEY])


_NUMPY_TYPES = {pa.int64(): np.int64, pa.int32(): np.int32, pa.float32(): np.float32}


def _numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """NumPy copy of a fixed-width column, read from its buffers when it has no nulls.

    Arrow's own ``to_numpy`` goes through its pandas converter, whose first use imports pandas
    (~0.2 s): that alone was a third of a small evaluation's whole run.
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    dtype = _NUMPY_TYPES.get(column.type)
    if dtype is None or any(c.null_count for c in chunks):
        return column.to_numpy()
    size = np.dtype(dtype).itemsize
    parts = [np.frombuffer(c.buffers()[1], dtype=dtype, count=len(c), offset=c.offset * size)
             for c in chunks if len(c)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def from_table(table: pa.Table, entries: Sequence[dict[str, Any]]) -> list[ImageProposals]:
    """Proposals of the images in ``entries`` (in that order) from rows of ``table``.

    ``table`` must hold all rows of those images (any order: rows are sorted by (image_id, rank)
    here); images with no rows come back with zero proposals. Without a ``counts`` column the
    masks come back None.
    """
    ids = _numpy(table.column("image_id"))
    if table.num_rows:
        rank = _numpy(table.column("rank"))
        step, rank_step = np.diff(ids), np.diff(rank)
        # Files are written in this order: sort (a copy of every column) only when they are not.
        if not ((step > 0) | ((step == 0) & (rank_step > 0))).all():
            table = table.sort_by([("image_id", "ascending"), ("rank", "ascending")])
            ids = _numpy(table.column("image_id"))
    scores = _numpy(table.column("score"))
    # The list's child values sliced by hand, and the strings viewed (not cast) as binary:
    # combine_chunks/flatten/cast import pyarrow.compute (~0.05 s) on first use.
    boxes = np.concatenate([_numpy(c.values)[4 * c.offset:4 * (c.offset + len(c))]
                            for c in table.column("bbox").chunks]
                           + [np.zeros(0, np.float32)]).reshape(-1, 4)
    # Readers that do not need masks leave the (largest) counts column out.
    counts_col = ([b for c in table.column("counts").chunks
                   for b in c.view(pa.binary()).to_pylist()]
                  if "counts" in table.column_names else None)
    labels_col = table.column("label")
    starts = np.searchsorted(ids, [e["id"] for e in entries], side="left")
    ends = np.searchsorted(ids, [e["id"] for e in entries], side="right")
    out = []
    for e, a, b in zip(entries, starts.tolist(), ends.tolist()):
        counts = list(counts_col[a:b]) if e["masks"] and counts_col is not None else None
        labels = (labels_col.slice(a, b - a).to_numpy(zero_copy_only=False).astype(np.int32)
                  if e["labels"] else None)
        out.append(ImageProposals(e["id"], e["height"], e["width"], scores[a:b].copy(),
                                  boxes[a:b].copy(), counts, e["model"], labels))
    return out
