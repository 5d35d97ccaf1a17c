"""The evaluation driver: shards of a proposals location to integer counts, in-process or on Ray.

The store splits the location into shards (``ProposalStore.shards()``: one per chunk file). Each
shard is evaluated by :func:`~segdist.evaluation.shard.evaluate_shard` and returns integer counts;
the driver checks that no image comes twice, counts the evaluated images that have no proposals
(their GT are misses, as in COCOeval) and adds everything up. AR is computed once from the sums,
which is why the result equals a single COCOeval run (see ``recall``'s module docstring).

Where the shards run:

- **in this process**, without Ray (and without importing it) for small runs: ``num_cpus == 1``, or
  at most :data:`IN_PROCESS_MAX_IMAGES` images when no cluster address is given. Starting a local
  Ray costs seconds; a 100-image run evaluates in a fraction of one.
- **as Ray tasks** otherwise (``num_cpus=1`` each): a task reads its own chunk from storage (the
  driver never holds all proposals) and gets the ground truth, prepared once by the driver, from
  the object store **once per worker process**: the task receives a reference, and a worker keeps
  the last ground truth it fetched (tasks of one evaluation reuse it instead of unpickling it
  again). A location that is a single file has one shard: the driver reads it and hands out pieces
  of ``shard_images`` images instead.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from segdist.errors import SegdistError
from segdist.evaluation.groundtruth import eval_image_ids
from segdist.evaluation.protocol import IOU_TYPES
from segdist.evaluation.recall import RecallCounts, count_images
from segdist.evaluation.shard import GroundTruth, ShardResult, evaluate_shard
from segdist.proposals.store import open_proposals
from segdist.proposals.types import ImageProposals

log = logging.getLogger(__name__)

#: Runs of at most this many images are evaluated in-process (no cluster address given): two
#: chunks of the job's default size; ~0.5 s each on one core, less than a local Ray's start-up.
IN_PROCESS_MAX_IMAGES = 1000


@dataclass
class EvalRun:
    """What evaluating one proposals location produced.

    Attributes:
        proposals_uri: the location evaluated.
        kind: its layout (``parquet``, ``coco-json``, ``original``, ``coco-results``).
        model: model name (the run's manifest, else the name stored with the proposals).
        counts: merged counts per IoU type (``segm`` absent for box-only proposals).
        images: evaluated image ids per IoU type.
        shards: number of shards evaluated.
        images_outside: proposals' images that are in the GT but not in the evaluated selection.
        seconds: wall time of the evaluation (GT preparation included).
        manifest: the run's manifest (``store.manifest``), None without one.
        mode: ``"in-process"`` or ``"ray"``.
        shard_results: each shard's result (its counts dropped once merged): names, images,
            seconds per part, worker process.
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
    mode: str = "in-process"
    shard_results: list[ShardResult] = field(default_factory=list)


@dataclass(frozen=True)
class _Piece:
    """Images the driver already read, handed to a task as a shard (``read`` as the store's)."""

    name: str
    proposals: list[ImageProposals]

    def read(self, masks: bool = True) -> list[ImageProposals]:
        return self.proposals


# -- Ray side: module-level functions, so that a task gets them by reference ----------------------

#: (object id, ground truth) of the last ground truth this worker process fetched.
_WORKER_GT: tuple[str, GroundTruth] | None = None


def _worker_ground_truth(gt_box: list) -> tuple[GroundTruth, bool]:
    """The ground truth behind ``gt_box[0]`` (an ObjectRef, boxed so that Ray does not resolve it
    per task), fetched at most once per worker process; returns it and whether it was fetched."""
    global _WORKER_GT
    import ray

    ref = gt_box[0]
    if _WORKER_GT is not None and _WORKER_GT[0] == ref.hex():
        return _WORKER_GT[1], False
    _WORKER_GT = None  # drop an older evaluation's before fetching
    _WORKER_GT = (ref.hex(), ray.get(ref))
    return _WORKER_GT[1], True


def _task(shard, gt_box: list, iou_types: tuple[str, ...], max_dets: int,
          masks: bool) -> ShardResult:
    t0 = time.perf_counter()
    gt, fetched = _worker_ground_truth(gt_box)
    t1 = time.perf_counter()
    proposals = shard.read(masks=masks)
    t2 = time.perf_counter()
    result = evaluate_shard(proposals, gt, iou_types, max_dets, shard.name)
    result.seconds.update(gt=t1 - t0, read=t2 - t1)
    result.gt_fetched = fetched
    return result


# -- the driver -----------------------------------------------------------------------------------

def evaluate_proposals(proposals_uri: str, coco_gt: Mapping[str, Any], *,
                       image_ids: Iterable[int] | None = None,
                       iou_types: Sequence[str] | None = None, max_dets: int = 1000,
                       storage_options: Mapping[str, Any] | None = None,
                       address: str | None = None, num_cpus: int | None = None,
                       in_process: bool | None = None, shard_images: int = 500,
                       progress: bool = True) -> EvalRun:
    """Average-recall counts of the proposals at ``proposals_uri`` against ``coco_gt``.

    Args:
        proposals_uri: any layout ``segdist.proposals.store.open_proposals`` reads.
        coco_gt: COCO instances dict (``Dataset.coco_gt``).
        image_ids: evaluate only these GT images (default: all of ``coco_gt``); images without
            proposals count as misses.
        iou_types: ``("segm", "bbox")`` by default (``segm`` dropped for box-only proposals);
            asking for ``segm`` on box-only proposals is an error.
        max_dets: proposals per image (COCOeval's ``maxDets[-1]``).
        storage_options: fsspec options for the proposals location.
        address, num_cpus: Ray cluster to join / CPUs of a local one (see
            :func:`segdist.ray_connect.connect_ray`); ``num_cpus=1`` evaluates in-process.
        in_process: True / False forces in-process / Ray; None decides by size (module docstring).
        shard_images: images per Ray task when the location is a single file.
        progress: show a progress bar over shards (Ray path).
    Raises:
        SegdistError: proposals for images that are not in the GT, an image in two chunks, or
        segment evaluation of box-only proposals.
    """
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
    shards = store.shards()
    ids = {t: eval_image_ids(coco_gt, t, image_ids) for t in iou_types}
    gt = GroundTruth.prepare(coco_gt, ids)
    masks = "segm" in iou_types  # box-only evaluation does not read the masks at all

    if in_process is None:
        address = address or os.environ.get("RAY_ADDRESS") or None
        known = sum(s.num_images if s.num_images is not None else shard_images for s in shards)
        in_process = num_cpus == 1 or (not address and known <= IN_PROCESS_MAX_IMAGES)
    if in_process:
        results = []
        for shard in shards:
            t1 = time.perf_counter()
            proposals = shard.read(masks=masks)
            read = time.perf_counter() - t1
            result = evaluate_shard(proposals, gt, iou_types, max_dets, shard.name)
            result.seconds["read"] = read
            del proposals
            _check_known(result, proposals_uri)
            results.append(result)
    else:
        results = _evaluate_on_ray(shards, gt, iou_types, max_dets, masks, address, num_cpus,
                                   shard_images, progress, proposals_uri)

    seen: set[int] = set()
    has_masks = True
    for r in results:
        dup = seen.intersection(r.image_ids)
        if dup:
            raise SegdistError(f"{proposals_uri}: image {min(dup)} appears in two chunks; "
                               "each image must be in exactly one chunk")
        seen.update(r.image_ids)
        has_masks = has_masks and r.has_masks
    if not has_masks and "segm" in iou_types:
        if explicit:
            raise SegdistError(f"{proposals_uri} holds box-only proposals (no masks): evaluate "
                               "them with --iou-types bbox")
        iou_types = tuple(t for t in iou_types if t != "segm")

    counts: dict[str, RecallCounts] = {}
    for t in iou_types:
        missing = [i for i in ids[t] if i not in seen]  # no proposals: every GT a miss
        total = count_images(gt.images[t], {}, missing, t, max_dets=max_dets)
        for r in results:
            total = total + r.counts[t]
        counts[t] = total
    evaluated = set().union(*ids.values())
    outside = sum(1 for i in seen if i not in evaluated)
    if outside:
        log.info("%s: %d images with proposals are outside the evaluated selection (ignored)",
                 proposals_uri, outside)
    return EvalRun(proposals_uri=proposals_uri, kind=store.kind,
                   model=_model_name(store.manifest, results),
                   counts=counts, images={t: len(ids[t]) for t in iou_types},
                   shards=len(results), images_outside=outside,
                   seconds=time.perf_counter() - t0, manifest=store.manifest,
                   mode="in-process" if in_process else "ray",
                   shard_results=[dataclasses.replace(r, counts={}) for r in results])


def _evaluate_on_ray(shards: list, gt: GroundTruth, iou_types: tuple[str, ...], max_dets: int,
                     masks: bool, address: str | None, num_cpus: int | None, shard_images: int,
                     progress: bool, label: str) -> list[ShardResult]:
    import ray

    from segdist.ray_connect import connect_ray, shutdown_ray

    started = connect_ray(address, num_cpus, num_gpus=0, quiet=True)
    try:
        gt_box = [ray.put(gt)]
        task = ray.remote(num_cpus=1)(_task)
        if len(shards) == 1:  # one file: the driver reads it and hands out pieces
            shards = list(_pieces(shards[0].read(masks=masks), shard_images))
        pending = [task.remote(s, gt_box, iou_types, max_dets, masks) for s in shards]
        return _gather(ray, pending, progress, label)
    finally:
        if started:
            shutdown_ray()


def _pieces(proposals: list[ImageProposals], shard_images: int) -> Iterable[_Piece]:
    for k, start in enumerate(range(0, len(proposals), shard_images)):
        yield _Piece(f"piece-{k}", proposals[start:start + shard_images])


def _check_known(r: ShardResult, label: str) -> None:
    if r.unknown:
        raise SegdistError(
            f"{label} has proposals for {len(r.unknown)}+ images that are not in the ground "
            f"truth (e.g. ids {r.unknown[:5]}); the proposals were made for another dataset: "
            "check --dataset")


def _model_name(manifest: Mapping[str, Any] | None, results: list[ShardResult]) -> str:
    """The run's manifest says what ran; else the name stored with the proposals."""
    model = (manifest or {}).get("model")
    if isinstance(model, Mapping) and isinstance(model.get("name"), str):
        return model["name"]
    if isinstance(model, str):
        return model
    names = [r.model for r in results if r.model not in (None, "unknown")]
    return names[0] if names else "unknown"


def _gather(ray, pending: list, progress: bool, label: str) -> list[ShardResult]:
    """Wait for every task; fail fast (cancelling the rest) on proposals of unknown images."""
    from tqdm import tqdm

    results = []
    bar = tqdm(total=len(pending), desc=f"evaluate {label}", unit="shard", disable=not progress)
    remaining = list(pending)
    try:
        while remaining:
            done, remaining = ray.wait(remaining, num_returns=1)
            try:
                r = ray.get(done[0])
                _check_known(r, label)
            except ray.exceptions.RayTaskError as exc:
                for ref in remaining:
                    ray.cancel(ref)
                if isinstance(exc.cause, SegdistError):
                    raise exc.cause from None  # a user error: its own message, no remote traceback
                raise
            except SegdistError:
                for ref in remaining:
                    ray.cancel(ref)
                raise
            results.append(r)
            bar.update(1)
    finally:
        bar.close()
    return results
