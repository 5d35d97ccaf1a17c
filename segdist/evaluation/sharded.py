"""The evaluation job: one Ray task per proposal chunk returns integer counts; the driver adds them.

Each task reads its own chunk from storage (the driver never holds all proposals), matches it
against the ground truth of its images (prepared once by the driver and shared through the object
store) and returns :class:`~segdist.evaluation.recall.RecallCounts`, a few hundred KB of integers.
The driver checks that no image comes twice, counts the evaluated images that have no proposals
(their GT are misses, as in COCOeval) and adds everything up; AR is computed once from the sums,
which is why the result equals a single COCOeval run (see ``recall``'s module docstring).

A location that is a single file (one COCO results JSON, one Parquet file) has no chunks to hand
out: the driver reads it and hands out pieces of ``shard_images`` images instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from segdist.errors import SegdistError
from segdist.evaluation.groundtruth import ImageGT, coco_index, eval_image_ids, prepare_ground_truth
from segdist.evaluation.protocol import IOU_TYPES
from segdist.evaluation.recall import RecallCounts, count_images
from segdist.proposals.types import ImageProposals
from segdist.ray_connect import connect_ray

log = logging.getLogger(__name__)


@dataclass
class EvalRun:
    """What evaluating one proposals location produced.

    Attributes:
        proposals_uri: the location evaluated.
        kind: its layout (``parquet``, ``coco-json``, ``original``, ``coco-results``).
        model: model name the store reports.
        counts: merged counts per IoU type (``segm`` absent for box-only proposals).
        images: evaluated image ids per IoU type.
        shards: number of Ray tasks.
        images_outside: proposals' images that are in the GT but not in the evaluated selection.
        seconds: wall time of the sharded evaluation (GT preparation included).
    """

    proposals_uri: str
    kind: str
    model: str
    counts: dict[str, RecallCounts]
    images: dict[str, int]
    shards: int
    images_outside: int = 0
    seconds: float = 0.0
    manifest: dict[str, Any] | None = field(default=None)


# -- chunk readers: module-level functions, so that a task gets (function, arguments) by value ----

def _read_parquet_file(uri: str, path: str, storage_options: dict[str, Any]) -> list[ImageProposals]:
    from segdist.proposals.store import ParquetStore

    return [p for chunk in ParquetStore(uri, [path], storage_options).iter_chunks() for p in chunk]


def _read_coco_chunk(uri: str, kind: str, files: tuple[str | None, str | None],
                     storage_options: dict[str, Any], model: str) -> list[ImageProposals]:
    from segdist.proposals.store import CocoResultsStore

    store = CocoResultsStore(uri, kind, [files], storage_options, model)
    return [p for chunk in store.iter_chunks() for p in chunk]


def _chunk_readers(store) -> list[tuple[Callable[..., list[ImageProposals]], tuple]]:
    """(reader, args) per chunk file of ``store``; empty when it is one file (the driver splits)."""
    from segdist.proposals.store import CocoResultsStore, ParquetStore

    if isinstance(store, ParquetStore) and len(store.paths) > 1:
        return [(_read_parquet_file, (store.uri, p, store.storage_options)) for p in store.paths]
    if isinstance(store, CocoResultsStore) and len(store.chunks) > 1:
        return [(_read_coco_chunk, (store.uri, store.kind, tuple(c), store.storage_options,
                                    store.model)) for c in store.chunks]
    return []


# -- the per-shard work (runs in a Ray task; plain function, usable without Ray) -----------------

def evaluate_shard(proposals: Sequence[ImageProposals], gt: Mapping[str, Any],
                   iou_types: Sequence[str], max_dets: int) -> dict[str, Any]:
    """Counts of one shard of proposals.

    Args:
        proposals: the shard's images (each image once).
        gt: ``{"all_ids": set of every GT image id, iou_type: {image_id: ImageGT}}`` (the
            evaluated images per type).
        iou_types: subset of ``("segm", "bbox")``.
        max_dets: proposals kept per image.
    Returns:
        ``{"image_ids": [...], "has_masks": bool, "unknown": [ids not in the GT], "model": name,
        "counts": {iou_type: RecallCounts or None (segm of box-only proposals)}}``.
    """
    by_id = {p.image_id: p for p in proposals}
    ids = [p.image_id for p in proposals]
    has_masks = all(p.counts is not None for p in proposals if len(p))
    out: dict[str, Any] = {"image_ids": ids, "has_masks": has_masks, "counts": {},
                           "unknown": [i for i in ids if i not in gt["all_ids"]],
                           "model": proposals[0].model if proposals else None}
    if out["unknown"]:
        return out
    for iou_type in iou_types:
        if iou_type == "segm" and not has_masks:
            out["counts"][iou_type] = None
            continue
        gt_t: Mapping[int, ImageGT] = gt[iou_type]
        out["counts"][iou_type] = count_images(gt_t, by_id, [i for i in ids if i in gt_t],
                                               iou_type, max_dets=max_dets)
    return out


def _task_read_and_evaluate(reader, reader_args, gt, iou_types, max_dets):
    return evaluate_shard(reader(*reader_args), gt, iou_types, max_dets)


def _task_evaluate(proposals, gt, iou_types, max_dets):
    return evaluate_shard(proposals, gt, iou_types, max_dets)


def _pieces(store, shard_images: int) -> Iterable[list[ImageProposals]]:
    piece: list[ImageProposals] = []
    for chunk in store.iter_chunks():
        for p in chunk:
            piece.append(p)
            if len(piece) == shard_images:
                yield piece
                piece = []
    if piece:
        yield piece


def _read_manifest(uri: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The run's ``manifest.json``: in the location, or one level up from its ``parquet/`` or
    ``coco-json/`` folder; None when there is none (COCO results from elsewhere)."""
    import json
    import posixpath

    from segdist import storage

    root = uri.rstrip("/")
    candidates = [storage.join(root, "manifest.json")]
    if posixpath.basename(root) in ("parquet", "coco-json"):
        candidates.append(storage.join(posixpath.dirname(root), "manifest.json"))
    for target in candidates:
        try:
            if not storage.exists(target, storage_options):
                continue
            data = json.loads(storage.read_bytes(target, storage_options))
        except (ValueError, SegdistError, OSError):
            log.warning("%s is not readable JSON; the report will not carry the run's manifest",
                        target)
            return None
        return data if isinstance(data, dict) else None
    return None


def evaluate_proposals(proposals_uri: str, coco_gt: Mapping[str, Any], *,
                       image_ids: Iterable[int] | None = None,
                       iou_types: Sequence[str] | None = None, max_dets: int = 1000,
                       storage_options: Mapping[str, Any] | None = None,
                       address: str | None = None, num_cpus: int | None = None,
                       shard_images: int = 500, progress: bool = True) -> EvalRun:
    """Average-recall counts of the proposals at ``proposals_uri`` against ``coco_gt``, on Ray.

    Args:
        proposals_uri: any layout ``segdist.proposals.store.open_proposals`` reads.
        coco_gt: COCO instances dict (``Dataset.coco_gt``).
        image_ids: evaluate only these GT images (default: all of ``coco_gt``); images without
            proposals count as misses.
        iou_types: ``("segm", "bbox")`` by default (``segm`` dropped for box-only proposals);
            asking for ``segm`` on box-only proposals is an error.
        max_dets: proposals per image (COCOeval's ``maxDets[-1]``).
        storage_options: fsspec options for the proposals location.
        address, num_cpus: Ray cluster to join / CPUs of a local one (see :func:`connect_ray`).
        shard_images: images per task when the location is a single file.
        progress: show a progress bar over shards.
    Raises:
        SegdistError: proposals for images that are not in the GT, an image in two chunks, or
        segment evaluation of box-only proposals.
    """
    import ray
    from tqdm import tqdm

    from segdist.proposals.store import open_proposals

    explicit = iou_types is not None
    iou_types = tuple(iou_types or IOU_TYPES)
    bad = [t for t in iou_types if t not in IOU_TYPES]
    if bad or not iou_types:
        raise SegdistError(f"iou types must be a non-empty subset of {IOU_TYPES}, "
                           f"got {list(iou_types)}")
    if max_dets < 1:
        raise SegdistError(f"max_dets must be >= 1, got {max_dets}")
    t0 = time.perf_counter()
    store = open_proposals(proposals_uri, storage_options)

    coco = coco_index(coco_gt)
    ids = {t: eval_image_ids(coco_gt, t, image_ids) for t in iou_types}
    payload: dict[str, Any] = {"all_ids": set(coco.imgs)}
    for t in iou_types:
        payload[t] = prepare_ground_truth(coco_gt, ids[t], segments=(t == "segm"),
                                          boxes=(t == "bbox"), coco=coco)
    del coco

    started = connect_ray(address, num_cpus, num_gpus=0)
    try:
        gt_ref = ray.put(payload)
        task_read = ray.remote(num_cpus=1)(_task_read_and_evaluate)
        task_eval = ray.remote(num_cpus=1)(_task_evaluate)
        readers = _chunk_readers(store)
        if readers:
            pending = [task_read.remote(fn, args, gt_ref, iou_types, max_dets) for fn, args in readers]
        else:
            pending = [task_eval.remote(ray.put(piece), gt_ref, iou_types, max_dets)
                       for piece in _pieces(store, shard_images)]
        results = _gather(ray, pending, progress, proposals_uri, tqdm)
    finally:
        if started:
            ray.shutdown()

    seen: set[int] = set()
    has_masks = True
    for r in results:
        dup = seen.intersection(r["image_ids"])
        if dup:
            raise SegdistError(f"{proposals_uri}: image {min(dup)} appears in two chunks; "
                               "each image must be in exactly one chunk")
        seen.update(r["image_ids"])
        has_masks = has_masks and r["has_masks"]
    if not has_masks and "segm" in iou_types:
        if explicit:
            raise SegdistError(f"{proposals_uri} holds box-only proposals (no masks): evaluate "
                               "them with --iou-types bbox")
        iou_types = tuple(t for t in iou_types if t != "segm")

    counts: dict[str, RecallCounts] = {}
    for t in iou_types:
        missing = [i for i in ids[t] if i not in seen]  # no proposals: every GT a miss
        total = count_images(payload[t], {}, missing, t, max_dets=max_dets)
        for r in results:
            total = total + r["counts"][t]
        counts[t] = total
    evaluated = set().union(*ids.values())
    outside = sum(1 for i in seen if i not in evaluated)
    if outside:
        log.info("%s: %d images with proposals are outside the evaluated selection (ignored)",
                 proposals_uri, outside)
    manifest = _read_manifest(proposals_uri, storage_options)
    return EvalRun(proposals_uri=proposals_uri, kind=store.kind,
                   model=_model_name(manifest, results, store),
                   counts=counts, images={t: len(ids[t]) for t in iou_types},
                   shards=len(results), images_outside=outside,
                   seconds=time.perf_counter() - t0, manifest=manifest)


def _model_name(manifest: Mapping[str, Any] | None, results: list[dict[str, Any]], store) -> str:
    """The run's manifest says what ran; else the name stored with the proposals."""
    model = (manifest or {}).get("model")
    if isinstance(model, Mapping) and isinstance(model.get("name"), str):
        return model["name"]
    if isinstance(model, str):
        return model
    names = [r["model"] for r in results if r["model"] not in (None, "unknown")]
    return names[0] if names else getattr(store, "model", None) or "unknown"


def _gather(ray, pending: list, progress: bool, label: str, tqdm) -> list[dict[str, Any]]:
    """Wait for every task, failing fast (and cancelling the rest) on proposals of unknown images."""
    results = []
    bar = tqdm(total=len(pending), desc=f"evaluate {label}", unit="shard", disable=not progress)
    remaining = list(pending)
    try:
        while remaining:
            done, remaining = ray.wait(remaining, num_returns=1)
            try:
                r = ray.get(done[0])
            except ray.exceptions.RayTaskError as exc:
                for ref in remaining:
                    ray.cancel(ref)
                if isinstance(exc.cause, SegdistError):
                    raise exc.cause from None  # a user error: its own message, no remote traceback
                raise
            if r["unknown"]:
                for ref in remaining:
                    ray.cancel(ref)
                raise SegdistError(
                    f"{label} has proposals for {len(r['unknown'])}+ images that are not in the "
                    f"ground truth (e.g. ids {r['unknown'][:5]}); the proposals were made for "
                    "another dataset: check --dataset")
            results.append(r)
            bar.update(1)
    finally:
        bar.close()
    return results
