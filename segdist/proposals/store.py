"""The reading API: open a proposals location (any fsspec URI) and read images or chunks.

``open_proposals(uri)`` detects what ``uri`` holds, in this order:

1. a segdist output with ``parquet/chunk-*.parquet`` (or a folder of ``*.parquet`` files, or one
   ``.parquet`` file): :class:`ParquetStore`, the fast path. Opening reads every file's footer
   (a few KB each) into an index ``image id -> (file, row groups)``; ``get`` then reads only the row
   groups whose ``image_id`` statistics contain the id.
2. a segdist output with ``coco-json/chunk-*.{segm,bbox}.json[.gz]`` (or a folder of them);
3. the original DeepMask/SharpMask layout ``props-<start>-<end>.json[.gz]`` (in the folder, in
   ``jsons/``, or as ``segm/`` + ``bbox/`` pairs as ``segdist export original`` writes them);
4. one COCO results file ``*.json[.gz]``.

Cases 2-4 are :class:`CocoResultsStore`: the JSON has no index, so the first ``get`` (or
``image_ids``) parses every chunk once to learn which holds which id (only the ids are kept).
COCO results cannot hold an image without proposals, nor the model name: the model comes from the
``model`` argument, else ``OUT/manifest.json`` (``"model"`` string or ``{"name": ...}``), else
``"unknown"``. Box-only results (bbox files) give ``counts=None`` and height = width = 0 (unknown).

File names: ``file_names()`` maps ids to the images' file names (paths relative to the dataset)
where the location records them: Parquet's per-image metadata, or the ``images.json`` beside
segdist's COCO-JSON chunks; ``get_by_file_name(name)`` reads one image by its file name.

``store.manifest`` is the run's manifest as opening read it (in the location, or one level up from
its ``parquet/`` or ``coco-json/`` folder; None for COCO results from elsewhere). ``store.shards()``
splits a location into independently readable parts (one per chunk file) for parallel readers such
as the evaluation. Folder and file names come from :mod:`segdist.proposals.layout`.

Stores and shards are picklable and fork-safe (filesystems and open files are per process), so
they can be handed to DataLoader workers or Ray tasks.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import posixpath
import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from segdist import storage
from segdist.errors import SegdistError, StorageError
from segdist.proposals import cocojson, layout
from segdist.proposals import parquet as parquet_format
from segdist.proposals.types import ImageProposals

log = logging.getLogger(__name__)

# The original DeepMask/SharpMask release's names (an external format, not segdist's layout).
_PROPS_RE = re.compile(r"props-(\d+)-(\d+)\.json(\.gz)?$")


class MissingImageError(SegdistError, KeyError):
    """The requested image id is not in the proposals location."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Shard:
    """One independently readable part of a proposals location: a chunk file (or one results file).

    Picklable: hand it to another process (a Ray task) and call :meth:`read` there; it reads only
    its own file(s).

    Attributes:
        name: the part's file name (e.g. ``chunk-000012.parquet``).
        num_images: images in it when known without reading (Parquet metadata), else None.
    """

    name: str
    num_images: int | None
    _store: "ProposalStore"

    def read(self, masks: bool = True) -> list[ImageProposals]:
        """The part's images, ascending id (``masks=False``: counts None where the format allows
        skipping them)."""
        return [p for chunk in self._store.iter_chunks(masks=masks) for p in chunk]


class ProposalStore:
    """Read access to the proposals of one location. Subclasses fill in the storage details.

    Attributes:
        uri: the location as given.
        kind: ``"parquet"``, ``"coco-json"``, ``"original"`` or ``"coco-results"``.
        manifest: the run's ``manifest.json`` as read when opening (None when there is none).
    """

    kind = "?"

    def __init__(self, uri: str, storage_options: Mapping[str, Any] | None,
                 manifest: dict[str, Any] | None = None):
        self.uri = uri
        self.storage_options = dict(storage_options or {})
        self.manifest = manifest
        self._pid = -1
        self._fs_obj = None
        self._ids_by_name: dict[str, int] | None = None  # built on the first by-name lookup

    # Filesystems and file handles must not cross a fork (s3fs sessions are tied to an event loop).
    def _fs(self):
        if self._fs_obj is None or self._pid != os.getpid():
            self._fs_obj, _ = storage.url_to_fs(self.uri, self.storage_options)
            self._pid = os.getpid()
            self._reset_caches()
        return self._fs_obj

    def _reset_caches(self) -> None:
        pass

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fs_obj"] = None
        state["_pid"] = -1
        return state

    def image_ids(self) -> list[int]:
        """All image ids, ascending."""
        raise NotImplementedError

    @property
    def num_images(self) -> int:
        return len(self.image_ids())

    def __len__(self) -> int:
        return self.num_images

    def __contains__(self, image_id: object) -> bool:
        raise NotImplementedError

    def get(self, image_id: int) -> ImageProposals:
        """The proposals of one image (raises MissingImageError if the id is not here)."""
        raise NotImplementedError

    def iter_chunks(self, masks: bool = True) -> Iterator[list[ImageProposals]]:
        """Each chunk file's images (ascending id), one chunk in memory at a time.

        ``masks=False`` skips reading the masks where the format allows it (Parquet ``counts``
        column; the bbox file of COCO-JSON chunks): counts come back None.
        """
        raise NotImplementedError

    def shards(self) -> list[Shard]:
        """The location's independently readable parts, one per chunk file, in chunk order."""
        raise NotImplementedError

    def iter_images(self, masks: bool = True) -> Iterator[ImageProposals]:
        """Every image in ascending id order (streams chunk by chunk when chunks are in id order)."""
        ranges = self._chunk_id_ranges()
        ordered = all(a[1] < b[0] for a, b in zip(ranges, ranges[1:]))
        if ordered:
            for chunk in self.iter_chunks(masks=masks):
                yield from chunk
        else:
            for image_id in self.image_ids():
                yield self.get(image_id)

    def _chunk_id_ranges(self) -> list[tuple[int, int]]:
        raise NotImplementedError

    def file_names(self) -> dict[int, str]:
        """Image id -> file name (relative path) for the images whose name the location records
        (empty when it records none: files written without names, the original layout)."""
        return {}

    def image_id_of(self, file_name: str) -> int:
        """The id of the image with this file name (raises MissingImageError if none)."""
        if self._ids_by_name is None:
            self._ids_by_name = {name: i for i, name in self.file_names().items()}
        by_name = self._ids_by_name
        if file_name not in by_name:
            raise MissingImageError(f"no image named {file_name!r} in {self.uri} "
                                    f"({len(by_name)} named images there)")
        return by_name[file_name]

    def get_by_file_name(self, file_name: str) -> ImageProposals:
        """The proposals of the image with this file name (e.g. ``"2024/day1/IMG_0001.jpg"``)."""
        return self.get(self.image_id_of(file_name))

    def _missing(self, image_id: int) -> MissingImageError:
        return MissingImageError(f"image {image_id} is not in {self.uri} "
                                 f"({self.num_images} images there)")


class ParquetStore(ProposalStore):
    """Parquet chunk files; random access by id through the footer index (row-group pruning)."""

    kind = "parquet"
    _CACHE_FILES = 4

    def __init__(self, uri: str, paths: Sequence[str], storage_options: Mapping[str, Any] | None,
                 manifest: dict[str, Any] | None = None):
        super().__init__(uri, storage_options, manifest)
        self.paths = list(paths)
        self._files: OrderedDict[int, Any] = OrderedDict()
        footers = self._read_footers()
        # Per image: (file index, metadata entry). Per file: row-group [min, max] id ranges.
        self._entries: dict[int, tuple[int, dict[str, Any]]] = {}
        self._file_entries: list[list[dict[str, Any]]] = []
        self._row_groups: list[np.ndarray] = []
        for k, (path, md) in enumerate(zip(self.paths, footers)):
            entries = parquet_format.images_from_metadata(md.metadata, path)
            for e in entries:
                if e["id"] in self._entries:
                    other = self.paths[self._entries[e["id"]][0]]
                    raise SegdistError(f"image {e['id']} is in two files: {other} and {path}")
                self._entries[e["id"]] = (k, e)
            self._file_entries.append(sorted(entries, key=lambda e: e["id"]))
            self._row_groups.append(_row_group_ranges(md))
        self._ids = sorted(self._entries)

    def shards(self) -> list[Shard]:
        return [Shard(posixpath.basename(self.paths[k]), len(self._file_entries[k]), self._part(k))
                for k in sorted(range(len(self.paths)), key=self._first_id)]

    def _part(self, k: int) -> "ParquetStore":
        """A store over file ``k`` alone, from the index already read (no footer is read again)."""
        part = copy.copy(self)
        part.paths = [self.paths[k]]
        part._file_entries = [self._file_entries[k]]
        part._row_groups = [self._row_groups[k]]
        part._entries = {e["id"]: (0, e) for e in self._file_entries[k]}
        part._ids = sorted(part._entries)
        part._files = OrderedDict()
        part._fs_obj, part._pid = None, -1
        part.manifest = None  # the location's, not the part's (and not worth pickling per shard)
        return part

    def _read_footers(self):
        import pyarrow.parquet as pq

        fs = self._fs()

        def footer(path: str):
            try:
                with fs.open(path, "rb") as f:
                    return pq.ParquetFile(f).metadata
            except FileNotFoundError as exc:
                raise StorageError(f"{path} disappeared while opening {self.uri}") from exc
            except Exception as exc:  # pyarrow raises ArrowInvalid for a non-Parquet file
                raise SegdistError(f"{path} is not a readable Parquet file ({exc})") from exc

        if len(self.paths) <= 1:
            return [footer(p) for p in self.paths]
        # Footers are tiny: on object stores the time is latency, so fetch a few at once.
        with ThreadPoolExecutor(max_workers=8) as pool:
            return list(pool.map(footer, self.paths))

    def _reset_caches(self) -> None:
        self._files = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_files"] = OrderedDict()
        return state

    def _parquet_file(self, k: int):
        import pyarrow.parquet as pq

        fs = self._fs()
        if k in self._files:
            self._files.move_to_end(k)
            return self._files[k][1]
        handle = fs.open(self.paths[k], "rb")
        pf = pq.ParquetFile(handle)
        self._files[k] = (handle, pf)
        while len(self._files) > self._CACHE_FILES:
            _, (old, _) = self._files.popitem(last=False)
            old.close()
        return pf

    def image_ids(self) -> list[int]:
        return list(self._ids)

    @property
    def num_images(self) -> int:
        return len(self._ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._entries

    def row_groups_for(self, image_id: int) -> tuple[str, list[int]]:
        """(file path, row-group indices) that ``get(image_id)`` reads: those whose image_id
        statistics contain the id."""
        if image_id not in self._entries:
            raise self._missing(image_id)
        k, _ = self._entries[image_id]
        ranges = self._row_groups[k]
        hit = np.nonzero((ranges[:, 0] <= image_id) & (image_id <= ranges[:, 1]))[0]
        return self.paths[k], hit.tolist()

    def get(self, image_id: int) -> ImageProposals:
        import pyarrow.compute as pc

        image_id = int(image_id)
        if image_id not in self._entries:
            raise self._missing(image_id)
        k, entry = self._entries[image_id]
        if entry["n"] == 0:
            return parquet_format.from_table(parquet_format.SCHEMA.empty_table(), [entry])[0]
        _, groups = self.row_groups_for(image_id)
        table = self._parquet_file(k).read_row_groups(groups)
        table = table.filter(pc.equal(table.column("image_id"), image_id))
        return parquet_format.from_table(table, [entry])[0]

    def iter_chunks(self, masks: bool = True) -> Iterator[list[ImageProposals]]:
        fs = self._fs()
        import pyarrow.parquet as pq

        columns = None if masks else [n for n in parquet_format.SCHEMA.names if n != "counts"]
        for k in sorted(range(len(self.paths)), key=self._first_id):
            with fs.open(self.paths[k], "rb") as f:
                # ParquetFile.read, not pq.read_table: the latter goes through pyarrow.dataset,
                # whose first import (pandas with it) costs ~0.25 s: a small evaluation's budget.
                # One thread: readers run one per core (evaluation shards, DataLoader workers);
                # Arrow's pool only contended with them (measured 0.05 s vs 0.14-0.38 s busy).
                table = pq.ParquetFile(f).read(columns=columns, use_threads=False)
            entries = self._file_entries[k]
            if not masks:
                entries = [dict(e, masks=False) for e in entries]
            yield parquet_format.from_table(table, entries)
            del table

    def file_names(self) -> dict[int, str]:
        return {i: e["file_name"] for i, (_, e) in self._entries.items() if "file_name" in e}

    def _first_id(self, k: int) -> int:
        entries = self._file_entries[k]
        return entries[0]["id"] if entries else -1

    def _chunk_id_ranges(self) -> list[tuple[int, int]]:
        spans = [(e[0]["id"], e[-1]["id"]) for e in self._file_entries if e]
        return sorted(spans)


def _row_group_ranges(md) -> np.ndarray:
    """int64[R, 2] of (min, max) image_id per row group; unknown statistics cover everything."""
    col = md.schema.names.index("image_id") if "image_id" in md.schema.names else 0
    out = np.empty((md.num_row_groups, 2), dtype=np.int64)
    for r in range(md.num_row_groups):
        stats = md.row_group(r).column(col).statistics
        if stats is not None and stats.has_min_max:
            out[r] = (stats.min, stats.max)
        else:
            out[r] = (np.iinfo(np.int64).min, np.iinfo(np.int64).max)
    return out


class CocoResultsStore(ProposalStore):
    """COCO results JSON chunks: segdist's coco-json layout, the original layout, or one file.

    Each chunk is ``(segm_path or None, bbox_path or None)``. The id index is built on first use by
    parsing every chunk once; one decoded chunk is kept for consecutive reads.
    """

    def __init__(self, uri: str, kind: str, chunks: Sequence[tuple[str | None, str | None]],
                 storage_options: Mapping[str, Any] | None, model: str,
                 manifest: dict[str, Any] | None = None):
        super().__init__(uri, storage_options, manifest)
        self.kind = kind
        self.chunks = list(chunks)
        self.model = model
        self._index: dict[int, int] | None = None
        self._spans: list[tuple[int, int]] = []
        self._cached: tuple[int, dict[int, ImageProposals]] | None = None
        self._images: tuple[int, list[dict[str, Any]]] | None = None  # (pid, images.json's images)

    def _reset_caches(self) -> None:
        self._cached = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_cached"] = state["_images"] = None
        return state

    def shards(self) -> list[Shard]:
        return [Shard(posixpath.basename(segm or bbox or ""), None,
                      CocoResultsStore(self.uri, self.kind, [(segm, bbox)], self.storage_options,
                                       self.model))
                for segm, bbox in self.chunks]

    def _load(self, k: int, masks: bool = True) -> list[ImageProposals]:
        fs = self._fs()
        segm_path, bbox_path = self.chunks[k]
        box_only = segm_path is None  # the chunk has no masks (not merely left unread)
        if not masks and bbox_path is not None:
            segm_path = None

        def read(path: str | None):
            if path is None:
                return None
            try:
                data = fs.cat_file(path)
            except FileNotFoundError as exc:
                raise StorageError(f"{path} does not exist (listed in {self.uri})") from exc
            return cocojson.load_results(data, path)

        segm, bbox = read(segm_path), read(bbox_path)
        if segm is not None and bbox is None and segm and all("bbox" in r for r in segm):
            bbox = segm  # a single results file carrying both (e.g. a detector's output)
        if segm is not None and segm and "segmentation" not in segm[0]:
            segm, bbox = None, segm  # a single box-only results file
            box_only = True
        if segm is None and bbox is None:
            return []
        images = cocojson.decode(segm, bbox, model=self.model, source=segm_path or bbox_path or "")
        if box_only and any(not (p.height and p.width) for p in images):
            # box-only results carry no size: segdist's images.json has the one the job decoded
            # (a chunk with masks read without them is left as asked: no extra read)
            sizes = {int(im["id"]): (int(im.get("height") or 0), int(im.get("width") or 0))
                     for im in self._images_index()}
            for p in images:
                if not (p.height and p.width) and p.image_id in sizes:
                    p.height, p.width = sizes[p.image_id]
        return images

    def _chunk(self, k: int) -> dict[int, ImageProposals]:
        if self._pid == os.getpid() and self._cached is not None and self._cached[0] == k:
            return self._cached[1]
        images = {p.image_id: p for p in self._load(k)}
        self._cached = (k, images)
        return images

    def _ensure_index(self) -> dict[int, int]:
        if self._index is None:
            index: dict[int, int] = {}
            spans = []
            for k in range(len(self.chunks)):
                ids = list(self._chunk(k))
                for image_id in ids:
                    if image_id in index:
                        raise SegdistError(f"image {image_id} is in two chunks of {self.uri}: "
                                           f"{self.chunks[index[image_id]]} and {self.chunks[k]}")
                    index[image_id] = k
                if ids:
                    spans.append((min(ids), max(ids)))
            self._index, self._spans = index, sorted(spans)
        return self._index

    def image_ids(self) -> list[int]:
        return sorted(self._ensure_index())

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._ensure_index()

    def get(self, image_id: int) -> ImageProposals:
        index = self._ensure_index()
        image_id = int(image_id)
        if image_id not in index:
            raise self._missing(image_id)
        return self._chunk(index[image_id])[image_id]

    def iter_chunks(self, masks: bool = True) -> Iterator[list[ImageProposals]]:
        for k in range(len(self.chunks)):
            images = list(self._chunk(k).values()) if masks else self._load(k, masks=False)
            yield sorted(images, key=lambda p: p.image_id)

    def _chunk_id_ranges(self) -> list[tuple[int, int]]:
        self._ensure_index()
        return self._spans

    def file_names(self) -> dict[int, str]:
        """From ``images.json`` beside segdist's COCO-JSON chunks (written by the job)."""
        return {int(im["id"]): im["file_name"] for im in self._images_index()
                if "file_name" in im}

    def _images_index(self) -> list[dict[str, Any]]:
        """The ``images`` of ``images.json`` beside segdist's COCO-JSON chunks (id, file_name,
        height, width; written by the job at its end); empty where there is none. Read once per
        process."""
        if self._images is not None and self._images[0] == os.getpid():
            return self._images[1]
        images: list[dict[str, Any]] = []
        if self.kind == "coco-json" and self.chunks:
            first = next(p for p in self.chunks[0] if p is not None)
            path = first.rsplit("/", 1)[0] + "/" + layout.IMAGES_INDEX
            try:
                images = json.loads(self._fs().cat_file(path)).get("images", [])
            except FileNotFoundError:
                pass
            except ValueError as exc:
                raise SegdistError(f"{path} is not valid JSON ({exc})") from None
        self._images = (os.getpid(), images)
        return images


def _read_manifest(uri: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The manifest of the run holding ``uri`` (see :func:`layout.manifest_candidates`), or None.

    A manifest that is not readable JSON is reported and ignored: the proposals are still readable.
    """
    for target in layout.manifest_candidates(uri):
        try:
            data = storage.read_bytes(target, storage_options)
        except StorageError:
            continue
        try:
            manifest = json.loads(data)
        except ValueError:
            log.warning("%s is not readable JSON; the run's manifest is ignored", target)
            return None
        return manifest if isinstance(manifest, dict) else None
    return None


def _manifest_model(manifest: Mapping[str, Any] | None) -> str | None:
    model = manifest.get("model") if manifest else None
    if isinstance(model, Mapping):
        model = model.get("name")
    return model if isinstance(model, str) else None


def _coco_chunks(fs, folder: str) -> list[tuple[str | None, str | None]]:
    found: dict[int, dict[str, str]] = {}
    for path in fs.glob(folder.rstrip("/") + f"/{layout.CHUNK_PREFIX}*.json*"):
        m = layout.COCO_CHUNK_RE.search(path)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = path
    return [(v.get("segm"), v.get("bbox")) for _, v in sorted(found.items())]


def _props_files(fs, folder: str) -> dict[int, str]:
    out = {}
    for path in fs.glob(folder.rstrip("/") + "/props-*.json*"):
        m = _PROPS_RE.search(path)
        if m:
            out[int(m.group(1))] = path
    return out


def open_proposals(uri: str, storage_options: Mapping[str, Any] | None = None, *,
                   model: str | None = None) -> ProposalStore:
    """Open a proposals location (segdist output, chunk folder, original layout or one file).

    Args:
        uri: local path or fsspec URI (``s3://bucket/run``, ``.../parquet``, ``.../x.json.gz``).
        storage_options: fsspec options (e.g. ``{"client_kwargs": {"endpoint_url": ...}}``).
        model: model name reported for COCO-JSON inputs (they do not store it).
    Raises:
        StorageError if nothing is there; SegdistError if no known layout is found.
    """
    fs, path = storage.url_to_fs(uri, storage_options)
    path = path.rstrip("/") or path
    if fs.isfile(path):
        if path.endswith(".parquet"):
            return ParquetStore(uri, [path], storage_options)
        if path.endswith((".json", ".json.gz")):
            return CocoResultsStore(uri, "coco-results", [(path, None)], storage_options,
                                    model or "unknown")
        raise SegdistError(f"{uri}: expected a .parquet or .json[.gz] proposals file")
    if not fs.isdir(path):
        raise StorageError(f"{uri} does not exist (expected a proposals folder or file)")

    # The job's manifest (OUT/manifest.json, "model": {"name": ...}); the folder given may be OUT
    # or one of its format folders. Read once here, for the store's users (the evaluation report).
    manifest = _read_manifest(uri, storage_options)
    for folder in (f"{path}/{layout.PARQUET_DIR}", path):
        files = sorted(fs.glob(folder + "/*.parquet"))
        if files:
            return ParquetStore(uri, files, storage_options, manifest)

    manifest_model = model or _manifest_model(manifest) or "unknown"
    for folder in (f"{path}/{layout.COCO_DIR}", path):
        chunks = _coco_chunks(fs, folder)
        if chunks:
            return CocoResultsStore(uri, "coco-json", chunks, storage_options, manifest_model,
                                    manifest)

    segm, bbox = _props_files(fs, path + "/segm"), _props_files(fs, path + "/bbox")
    if segm or bbox:
        starts = sorted(set(segm) | set(bbox))
        return CocoResultsStore(uri, "original", [(segm.get(s), bbox.get(s)) for s in starts],
                                storage_options, manifest_model, manifest)
    for folder in (path, path + "/jsons"):
        props = _props_files(fs, folder)
        if props:
            return CocoResultsStore(uri, "original", [(props[s], None) for s in sorted(props)],
                                    storage_options, manifest_model, manifest)
    raise SegdistError(
        f"no proposals found at {uri}: expected "
        f"{layout.PARQUET_DIR}/{layout.CHUNK_PREFIX}*.parquet, "
        f"{layout.COCO_DIR}/{layout.CHUNK_PREFIX}*.segm.json[.gz], props-<start>-<end>.json or a "
        "COCO results .json file")
