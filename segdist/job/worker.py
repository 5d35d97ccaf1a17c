"""The worker: one model per process, whole chunks in, committed chunk files out.

A :class:`ChunkWorker` runs as a Ray actor (see :mod:`segdist.job.dispatch`), pinned to a GPU when
the cluster has them. It builds its proposer once, in its constructor, with the builder the driver
looked up in :data:`segdist.proposers.PROPOSERS` and shipped with the settings. For each chunk it

1. decodes the chunk's images in a thread pool, ahead of the model (bounded read-ahead, so a slow
   object store or a big JPEG does not leave the device waiting, and memory stays bounded);
2. hands the proposer windows of decoded images (up to :data:`WINDOW_IMAGES`, bounded in bytes by
   :func:`window_budget`) under a lock; the proposer batches them by shape itself, sized by the
   memory budget;
3. writes the chunk's files itself (:func:`segdist.proposals.layout.write_chunk`, each file atomic);
4. writes the chunk record last (:mod:`segdist.job.state`): the chunk's commit marker.

The driver runs a chunk through :meth:`ChunkWorker.run_chunk`, a streaming generator that reports
"started" before any work: a chunk sent to a worker that had already died never started, and the
driver requeues it without counting an attempt. A transient storage error (connection,
throttling, 5xx, timeout) is retried per file, with backoff, for ``resources.storage_retry_s``
(:func:`segdist.storage_errors.retry`): reads before the model, writes with the encoded file kept
in memory, so a write failure never recomputes the model.

The actor is threaded (two chunks in flight): one chunk's decoding and writing overlap the other
chunk's model time, while the lock keeps one proposer call at a time on the device.

A bad image (missing, truncated, undecodable) is recorded with its id, file and reason and skipped;
the chunk still commits. Any other error fails the attempt, and the driver retries the chunk.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from segdist import storage
from segdist.config import ModelConfig
from segdist.data.records import ImageRecord
from segdist.errors import ImageDecodeError, SegdistError
from segdist.imageio import DEFAULT_MAX_PIXELS, read_image
from segdist.job.state import ChunkRecord, chunk_record_uri, relative_to
from segdist.proposals import layout
from segdist.proposals.types import ImageProposals
from segdist.storage_errors import retry

if TYPE_CHECKING:
    from segdist.proposers import Proposer


#: What :meth:`ChunkWorker.run_chunk` yields first: the chunk reached a live worker.
STARTED = "started"

# A window of decoded images handed to the proposer at once: at most this many, and at most
# window_budget(memory_budget_mb) bytes of decoded pixels (the last image may pass it).
WINDOW_IMAGES = 64


def window_budget(memory_budget_mb: int) -> int:
    """Bytes of decoded uint8 pixels a worker holds for one proposer call: a quarter of the
    model's memory budget (at least one 640x480 image's worth)."""
    return max(640 * 480 * 3, memory_budget_mb * 2 ** 20 // 4)


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker needs, shipped once to its constructor (pickled by Ray).

    ``builder`` is ``PROPOSERS[model.name]`` as the driver found it: it travels with the settings,
    so a proposer registered only in the driver's process is built on the workers too (its module
    must be importable there, or it was defined in ``__main__`` and travels by value).
    """

    model: ModelConfig
    builder: Callable[[ModelConfig], "Proposer"]
    out_uri: str
    formats: tuple[str, ...]
    gzip: bool = False
    out_storage_options: dict[str, Any] = field(default_factory=dict)
    data_storage_options: dict[str, Any] = field(default_factory=dict)
    decode_threads: int = 4
    max_pixels: int = DEFAULT_MAX_PIXELS  # the decoder's pixel limit (dataset.max_pixels)
    storage_retry_s: float = 0.0  # how long transient storage errors are retried, per file


@dataclass(frozen=True)
class WorkerInfo:
    """What a started worker reports: its model identity, or why it could not load it."""

    model_name: str | None
    weights_sha256: str | None
    device: str | None
    host: str
    pid: int
    error: str | None = None
    user_error: bool = False  # the error is a SegdistError (bad config/weights), not a crash
    node_id: str | None = None  # the Ray node (several nodes may share a host name)


class ChunkWorker:
    """Turns chunks of image records into committed chunk files (see the module docstring)."""

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.proposer: Proposer | None = None
        self._error: str | None = None
        self._user_error = False
        try:
            self.proposer = settings.builder(settings.model)
        except SegdistError as exc:
            self._error, self._user_error = str(exc), True
        except Exception as exc:  # a crash while loading: report it instead of dying silently
            self._error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}"
        self._pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="segdist-decode")
        self._model_lock = threading.Lock()
        self._name = f"{socket.gethostname()}:{os.getpid()}"

    def info(self) -> WorkerInfo:
        g = self.proposer
        return WorkerInfo(
            model_name=getattr(g, "name", None), weights_sha256=getattr(g, "weights_sha256", None),
            device=str(getattr(g, "device", None)) if g is not None else None,
            host=socket.gethostname(), pid=os.getpid(), error=self._error, user_error=self._user_error,
            node_id=_ray_node_id(),
        )

    def run_chunk(self, index: int, records: Sequence[ImageRecord], attempt: int = 1
                  ) -> Iterator[str | ChunkRecord]:
        """:meth:`process_chunk` as a streaming generator: yields :data:`STARTED` first (the chunk
        reached a live worker), then the committed chunk's record."""
        yield STARTED
        yield self.process_chunk(index, records, attempt)

    def _decoded(self, records: Sequence[ImageRecord], ahead: int
                 ) -> Iterator[tuple[ImageRecord, np.ndarray | None, str | None, float]]:
        """Yield ``(record, image uint8 HxWx3 or None, failure reason or None, seconds waited)``
        in record order, keeping at most ``ahead`` decodes in flight."""
        opts = self.settings.data_storage_options
        todo = iter(records)
        inflight: deque[tuple[ImageRecord, Future]] = deque()

        def submit_next() -> None:
            r = next(todo, None)
            if r is not None:
                inflight.append((r, self._pool.submit(self._read, r.uri, opts)))

        for _ in range(ahead):
            submit_next()
        while inflight:
            rec, fut = inflight.popleft()
            submit_next()
            t0 = time.perf_counter()
            try:
                image, reason = fut.result(), None
            except ImageDecodeError as exc:  # a bad file: skip it, record why
                image, reason = None, exc.reason
            # Anything else (StorageError: permission, network) may be transient: it fails the
            # attempt, and the chunk is retried rather than committed without the image.
            yield rec, image, reason, time.perf_counter() - t0

    def _read(self, uri: str, opts: dict[str, Any]) -> np.ndarray:
        """:func:`read_image`, transient storage errors retried (a bad file is not retried)."""
        return retry(lambda: read_image(uri, opts, self.settings.max_pixels),
                     self.settings.storage_retry_s, f"read {uri}")

    def _run_model(self, images: list[np.ndarray], ids: list[int]) -> tuple[list[ImageProposals], float]:
        """Proposals for one batch, and the seconds the model ran (not the wait for the lock)."""
        with self._model_lock:
            t0 = time.perf_counter()
            out = self.proposer(images, ids)
            seconds = time.perf_counter() - t0
        got = [p.image_id for p in out]
        if got != ids:
            raise RuntimeError(f"proposer returned proposals for images {got}, expected {ids}")
        return out, seconds

    def process_chunk(self, index: int, records: Sequence[ImageRecord], attempt: int = 1) -> ChunkRecord:
        """Process chunk ``index`` (its images sorted by id) and commit it; returns its record.

        Raises on any failure other than a bad image; nothing is then committed for this chunk
        (files already written are rewritten byte-identically by the retry).
        """
        if self.proposer is None:
            raise RuntimeError(f"the model failed to load on {self._name}: {self._error}")
        s = self.settings
        t_start = time.perf_counter()
        waited = model_s = 0.0
        proposals: list[ImageProposals] = []
        failed: list[dict[str, Any]] = []
        batch_imgs: list[np.ndarray] = []
        batch_ids: list[int] = []
        held = 0
        window_bytes = window_budget(s.model.memory_budget_mb)
        ahead = max(2 * s.model.batch_size, s.decode_threads)
        for rec, image, reason, w in self._decoded(records, ahead=ahead):
            waited += w
            if image is None:
                failed.append({"image_id": rec.image_id, "file_name": rec.file_name,
                               "uri": rec.uri, "reason": reason})
                continue
            batch_imgs.append(image)
            batch_ids.append(rec.image_id)
            held += image.nbytes
            # The proposer gets a window of decoded images and forms its own batches by shape;
            # the window is bounded by bytes (500 photos of 4000x3000 are never all decoded).
            if held >= window_bytes or len(batch_imgs) >= WINDOW_IMAGES:
                out, seconds = self._run_model(batch_imgs, batch_ids)
                proposals.extend(out)
                model_s += seconds
                batch_imgs, batch_ids, held = [], [], 0
        if batch_imgs:
            out, seconds = self._run_model(batch_imgs, batch_ids)
            proposals.extend(out)
            model_s += seconds
        del batch_imgs
        t0 = time.perf_counter()
        names = {r.image_id: r.file_name for r in records}
        # Each file is retried on its own (transient errors, resources.storage_retry_s) with the
        # encoded bytes in memory: an outage delays the chunk, it does not recompute it.
        files = layout.write_chunk(s.out_uri, index, proposals, s.formats, s.gzip,
                                   s.out_storage_options, file_names=names, failed=failed,
                                   retry_s=s.storage_retry_s)
        record = ChunkRecord(
            index=index, name=layout.chunk_name(index),
            image_ids=[p.image_id for p in proposals],
            proposals=sum(len(p) for p in proposals),
            files={k: {"path": relative_to(s.out_uri, v["uri"]), "bytes": v["bytes"],
                       **({"etag": v["etag"]} if v.get("etag") else {})}
                   for k, v in files.items()},
            failed=failed, worker=self._name, attempt=attempt,
            # The size this worker decoded: image folders list none (the plan never reads them).
            image_info=[{"id": p.image_id, "file_name": names[p.image_id], "height": p.height,
                         "width": p.width} for p in proposals],
        )
        write_s = time.perf_counter() - t0
        record.seconds = {"decode_wait": round(waited, 4), "model": round(model_s, 4),
                          "write": round(write_s, 4), "total": round(time.perf_counter() - t_start, 4)}
        # The record is the commit marker: it goes last, after every file of the chunk exists.
        uri = chunk_record_uri(s.out_uri, index)
        retry(lambda: storage.atomic_write(uri, record.to_json(), s.out_storage_options),
              s.storage_retry_s, f"write {uri}")
        return record


def _ray_node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # an older Ray, or no runtime context
        return None
