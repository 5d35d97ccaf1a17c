"""What a job leaves under its output besides the proposal files, and how a re-run reads it back.

Layout (beside the chunk files of :mod:`segdist.proposals.layout`)::

    OUT/_segdist/lease.json                  the driver writing the output now (segdist.job.lease)
    OUT/_segdist/run.json                    written before any chunk, once a worker has loaded
                                             the model: the settings that shape the output
    OUT/_segdist/chunks/chunk-000012.json    written by a worker AFTER the chunk's files: its record
    OUT/manifest.json                        written LAST by the driver

``run.json`` lets a re-run, even of a run that was interrupted before any manifest existed, tell
whether the output was made with the same dataset, model and format settings; a mismatch is refused
unless the user asks to overwrite. A chunk record is the chunk's commit marker: it is written (atomically)
only after all of the chunk's files exist, and it carries what the manifest needs (image and proposal
counts, file names, failed images) so that a resumed run does not have to re-read skipped chunks.
It also holds each file's size and, where the store returned one with the write (S3), its ETag: a
resumed run counts a chunk as committed only if its files still have them (:func:`scan_committed`).

Every read and write here takes ``retry_s``: transient storage errors are retried for that long
(:func:`segdist.storage_errors.retry`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import posixpath
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from segdist import storage
from segdist.config import JobConfig, execution_only_fields
from segdist.errors import SegdistError, StorageError
from segdist.imageio import DEFAULT_MAX_PIXELS
from segdist.proposals import layout
from segdist.proposals.layout import CHUNK_PREFIX, CHUNKS_DIR, MANIFEST, RUN_FILE, STATE_DIR
from segdist.storage_errors import is_missing, retry, translated

log = logging.getLogger(__name__)
_RECORD_FILE = re.compile("^" + re.escape(CHUNK_PREFIX) + r"(\d{6,})\.json$")

def state_uri(out_uri: str, *parts: str) -> str:
    return storage.join(out_uri, STATE_DIR, *parts)


def chunk_record_uri(out_uri: str, index: int) -> str:
    return state_uri(out_uri, CHUNKS_DIR, layout.chunk_name(index) + ".json")


def relative_to(out_uri: str, uri: str) -> str:
    """``uri`` relative to the output location (records stay valid if the output is moved)."""
    base = out_uri.rstrip("/") + "/"
    return uri[len(base):] if uri.startswith(base) else uri


# Dataset fields added after outputs already existed: at their defaults they are left out of the
# settings, so that a run record fingerprinted before them still matches and the run resumes.
# (A raised max_pixels decodes other images: a different run.)
_LATER_DATASET_DEFAULTS = {"image_list": None, "extensions": None, "glob": None,
                           "coco_url_layout": "split-folder", "max_pixels": DEFAULT_MAX_PIXELS}


# Model fields every preset had before the model section was per family: Mask R-CNN run records
# made then hold them at these values (unused by it), so they are recorded so for those presets
# and such outputs still resume.
_FORMER_MODEL_DEFAULTS = {"trunk": None, "scales": None, "nms": None, "threshold": 0.2}
_FORMER_PRESETS = ("maskrcnn", "maskrcnn-v2", "maskrcnn-rpn")


def output_settings(cfg: JobConfig) -> dict[str, Any]:
    """The parts of a config that determine the bytes of the output (no credentials, no resources).

    Model fields declared execution-only in the schema (:data:`segdist.config.EXECUTION_ONLY`:
    device, batch size, memory budget, ...) are left out: a resumed run may change them.
    """
    dataset = cfg.dataset.model_dump(mode="json", exclude={"storage_options"})
    for key, default in _LATER_DATASET_DEFAULTS.items():
        if key in dataset and dataset[key] == default:
            del dataset[key]
    # storage_options: credentials for the weights file; they never go into the run record.
    model = cfg.model.model_dump(mode="json",
                                 exclude={*execution_only_fields(cfg.model), "storage_options"})
    if cfg.model.name in _FORMER_PRESETS:
        model = {**_FORMER_MODEL_DEFAULTS, **model}
    output = cfg.output.model_dump(mode="json", include={"formats", "chunk_size", "gzip"})
    return {"dataset": dataset, "model": model, "output": output}


def fingerprint(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def settings_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Human-readable ``field: old -> new`` lines for settings that differ."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


@dataclass
class RunRecord:
    """Contents of ``OUT/_segdist/run.json``."""

    fingerprint: str
    settings: dict[str, Any]
    model_name: str | None = None
    weights_sha256: str | None = None
    segdist_version: str = ""
    created: str = ""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()


def read_json(uri: str, storage_options: Mapping[str, Any] | None = None,
              retry_s: float = 0.0) -> dict[str, Any] | None:
    """The JSON object at ``uri``, or None when there is none."""
    try:
        data = retry(lambda: storage.read_bytes(uri, storage_options), retry_s, f"read {uri}")
    except StorageError as exc:
        if is_missing(exc):
            return None
        raise
    try:
        return json.loads(data)
    except ValueError as exc:
        raise StorageError(f"{uri} is not valid JSON ({exc}); it was not written by segdist, "
                           "or was damaged: remove it or use --overwrite") from None


def read_run_record(out_uri: str, storage_options: Mapping[str, Any] | None,
                    retry_s: float = 0.0) -> RunRecord | None:
    raw = read_json(state_uri(out_uri, RUN_FILE), storage_options, retry_s)
    if raw is None:
        return None
    known = set(RunRecord.__dataclass_fields__)
    return RunRecord(**{k: v for k, v in raw.items() if k in known})


def write_run_record(out_uri: str, record: RunRecord, storage_options: Mapping[str, Any] | None,
                     retry_s: float = 0.0) -> None:
    uri = state_uri(out_uri, RUN_FILE)
    retry(lambda: storage.atomic_write(uri, record.to_json(), storage_options), retry_s,
          f"write {uri}")


def _list(uri: str, storage_options: Mapping[str, Any] | None, retry_s: float = 0.0
          ) -> dict[str, dict[str, Any]]:
    """The files directly under the folder ``uri``: name -> {"size", "etag"} (one listing)."""
    return retry(lambda: storage.list_dir(uri, storage_options), retry_s, f"list {uri}")


def _list_names(uri: str, storage_options: Mapping[str, Any] | None, retry_s: float = 0.0
                ) -> set[str]:
    """Base names of the files directly under the folder ``uri`` (empty when it does not exist)."""
    return set(_list(uri, storage_options, retry_s))


@dataclass
class ChunkRecord:
    """Contents of ``OUT/_segdist/chunks/chunk-NNNNNN.json``: one committed chunk.

    ``files`` are relative to the output URI; ``failed`` lists images that were skipped
    (``{"image_id", "file_name", "uri", "reason"}``); ``image_ids`` are the images written, and
    ``image_info`` says what each of them is (``{"id", "file_name", "height", "width"}``, the size
    the worker decoded: what ``coco-json/images.json`` lists).
    """

    index: int
    name: str
    image_ids: list[int]
    proposals: int
    files: dict[str, dict[str, Any]]
    failed: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    worker: str = ""
    attempt: int = 1
    image_info: list[dict[str, Any]] = field(default_factory=list)

    @property
    def covered_ids(self) -> list[int]:
        """Every image the chunk accounts for: written or recorded as failed."""
        return [*self.image_ids, *(f["image_id"] for f in self.failed)]

    @property
    def images(self) -> int:
        return len(self.image_ids)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "ChunkRecord":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in known})


def _read_records(out_uri: str, indices: Sequence[int], storage_options: Mapping[str, Any] | None,
                  retry_s: float = 0.0) -> dict[int, ChunkRecord]:
    with ThreadPoolExecutor(8) as pool:
        raws = list(pool.map(
            lambda i: read_json(chunk_record_uri(out_uri, i), storage_options, retry_s), indices))
    return {i: ChunkRecord.from_dict(raw) for i, raw in zip(indices, raws) if raw is not None}


def read_chunk_records(out_uri: str, storage_options: Mapping[str, Any] | None,
                       retry_s: float = 0.0) -> dict[int, ChunkRecord]:
    """Chunk index -> record, for every chunk record under the output (whether or not its files
    are all there). Their ``covered_ids`` are what :func:`segdist.job.plan.plan_incremental`
    keeps in place; :func:`scan_committed` takes them instead of reading them again."""
    names = _list_names(state_uri(out_uri, CHUNKS_DIR), storage_options, retry_s)
    indices = sorted(int(m.group(1)) for m in map(_RECORD_FILE.match, names) if m)
    return _read_records(out_uri, indices, storage_options, retry_s)


@dataclass
class ResumeScan:
    """What :func:`scan_committed` found: the committed chunks, and the chunks whose record
    exists but whose files no longer match it (``index -> why``: missing, another size, another
    ETag), which are redone."""

    committed: dict[int, ChunkRecord] = field(default_factory=dict)
    damaged: dict[int, str] = field(default_factory=dict)


def _file_mismatch(path: str, recorded: Mapping[str, Any], listed: Mapping[str, Any] | None
                   ) -> str | None:
    """Why the file ``path`` of a chunk record does not match the record, or None if it does.

    Sizes are compared always (records list every file's bytes); ETags where both the record and
    the listing have one (S3: the ETag of the PUT, recorded by the worker; local files have none,
    and the size is the check).
    """
    if listed is None:
        return f"{path} is missing"
    size, want = listed.get("size"), recorded.get("bytes")
    if want is not None and size is not None and int(size) != int(want):
        return f"{path} has {size} bytes, its record says {want}"
    etag, want_etag = listed.get("etag"), recorded.get("etag")
    if want_etag and etag and etag != want_etag:
        return f"{path} changed since it was written (ETag {etag}, its record says {want_etag})"
    return None


def scan_committed(out_uri: str, n_chunks: int, storage_options: Mapping[str, Any] | None,
                   plan_ids: Sequence[Sequence[int]] | None = None, retry_s: float = 0.0,
                   records: Mapping[int, ChunkRecord] | None = None) -> ResumeScan:
    """Chunks of this plan that a previous run committed: a record exists, and each file it lists
    exists with the recorded size (and ETag, where recorded); the chunks whose files do not match
    their record are returned as damaged (and are redone).

    With ``plan_ids`` (the image ids of each chunk of the plan), a record also has to cover exactly
    its chunk's images (written or recorded as failed): the dataset behind the same URI may have
    changed since, and a chunk of other images is redone rather than skipped. A record of a chunk
    beyond the plan (the dataset shrank) is refused: its files would stay in the output.

    Lists each folder once (with sizes and ETags) instead of probing every file (thousands of
    HEAD requests on S3). ``records``: every chunk record of the output as
    :func:`read_chunk_records` returned them (the plan of an image folder needed them), not read
    again.
    """
    if records is None:
        names = _list_names(state_uri(out_uri, CHUNKS_DIR), storage_options, retry_s)
    else:
        names = [layout.chunk_name(i) + ".json" for i in records]
    if plan_ids is not None:
        wanted_names = {layout.chunk_name(i) + ".json" for i in range(n_chunks)}
        beyond = sorted(n for n in names if n.startswith(CHUNK_PREFIX) and n.endswith(".json")
                        and n not in wanted_names)
        if beyond:
            raise SegdistError(
                f"{out_uri} holds chunks beyond this run's {n_chunks} chunks ({', '.join(beyond[:3])}"
                f"{', ...' if len(beyond) > 3 else ''}): the dataset has fewer images than when the "
                "output was started. Use a new output.uri, or pass --overwrite to replace them.")
    wanted = [i for i in range(n_chunks) if layout.chunk_name(i) + ".json" in names]
    scan = ResumeScan()
    if not wanted:
        return scan
    listings: dict[str, dict[str, dict[str, Any]]] = {}
    found = (_read_records(out_uri, wanted, storage_options, retry_s) if records is None
             else {i: records[i] for i in wanted})
    for i, rec in found.items():
        if plan_ids is not None and sorted(rec.covered_ids) != sorted(plan_ids[i]):
            log.warning("%s: its record lists other images than this run's plan (the dataset "
                        "changed since); redoing it", rec.name)
            continue
        problems = []
        for info in rec.files.values():
            folder, base = posixpath.split(info["path"])
            if folder not in listings:
                listings[folder] = _list(storage.join(out_uri, folder), storage_options, retry_s)
            problem = _file_mismatch(info["path"], info, listings[folder].get(base))
            if problem:
                problems.append(problem)
        if problems:
            scan.damaged[i] = "; ".join(problems)
            log.warning("%s is redone: %s", rec.name, scan.damaged[i])
        else:
            scan.committed[i] = rec
    return scan


def has_proposal_files(out_uri: str, storage_options: Mapping[str, Any] | None,
                       retry_s: float = 0.0) -> bool:
    """Whether the output already holds chunk files or a manifest (of any run)."""
    if MANIFEST in _list_names(out_uri, storage_options, retry_s):
        return True
    return any(_list_names(storage.join(out_uri, d), storage_options, retry_s)
               for d in (layout.PARQUET_DIR, layout.COCO_DIR))


def clear_output(out_uri: str, storage_options: Mapping[str, Any] | None) -> None:
    """Remove what a job writes (chunk files, records, manifest, the COCO-JSON images index) and
    nothing else under ``out_uri``.

    In the format folders only chunk files (and temporary files a killed writer left) go: other
    files there are not the job's. The lease stays (the driver clearing the output holds it).
    """
    with translated(out_uri, "clear"):
        _clear(out_uri, storage_options)


def _clear(out_uri: str, storage_options: Mapping[str, Any] | None) -> None:
    fs, _ = storage.url_to_fs(out_uri, storage_options)
    for part in (MANIFEST, f"{STATE_DIR}/{RUN_FILE}", f"{STATE_DIR}/{CHUNKS_DIR}",
                 f"{layout.COCO_DIR}/{layout.IMAGES_INDEX}"):
        _, path = storage.url_to_fs(storage.join(out_uri, part), storage_options)
        with contextlib.suppress(FileNotFoundError):
            if fs.exists(path):
                fs.rm(path, recursive=True)
    for folder in (layout.PARQUET_DIR, layout.COCO_DIR):
        uri = storage.join(out_uri, folder)
        paths = [storage.url_to_fs(storage.join(uri, name), storage_options)[1]
                 for name in sorted(_list_names(uri, storage_options)) if layout.CHUNK_FILE_RE.match(name)]
        if paths:
            with contextlib.suppress(FileNotFoundError):
                fs.rm(paths)  # one bulk delete per request batch on object stores
    fs.invalidate_cache()
