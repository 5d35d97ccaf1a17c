"""``run_job``: the dataset-scale proposal job, from a validated JobConfig to a manifest.

Order of work (each step can stop the run before anything expensive happens):

1. preflight: the output is writable, the weights file exists, the dataset's index loads and its
   first image exists;
2. the output's lease (``_segdist/lease.json``, :mod:`segdist.job.lease`): a second driver into
   the same output stops here, naming the holder; released however the run ends;
3. the plan: sorted image ids in chunks of ``output.chunk_size`` (an image folder's plan comes
   after step 4: it keeps the chunks the output already holds, :func:`plan_incremental`);
4. the output's run record (``_segdist/run.json``): a different config is refused unless
   ``overwrite``; a new record is written only once a worker has loaded the model (step 6), so a
   run that fails at model load leaves nothing that refuses a corrected config;
5. committed chunks (a record, and its files there with the recorded sizes / ETags) are skipped;
   chunks whose files do not match their record are redone and reported;
6. Ray: an embedded local cluster, or the cluster at ``address`` / RAY_ADDRESS (a local output
   on more than one node is refused unless ``output.shared_filesystem``); one worker actor per
   GPU (``resources.gpus_per_worker`` each, fractional allowed), or CPU workers on a cluster
   without GPUs, each building the proposer ``PROPOSERS[model.name]`` names (the builder is
   shipped with the worker settings); the first worker's model identity (name, weights sha256) is
   checked against the run record, and the record written, before any chunk is sent;
7. the dispatcher runs the remaining chunks (retries, worker replacement);
8. ``coco-json/images.json`` (with COCO-JSON output), then ``manifest.json`` last; the result says
   whether every chunk is committed.

Storage: reads and writes of the driver retry transient errors for ``resources.storage_retry_s``.
A write that still fails (run record, manifest) does not crash the run: the result is
incomplete (exit code 1) and its summary says what could not be written.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

from segdist import __version__
from segdist.config import JobConfig, public_dict
from segdist.errors import ConfigError, SegdistError, StorageError
from segdist.data.records import Dataset
from segdist.job import lease, manifest, preflight, state
from segdist.job.dispatch import ChunkFailure, DispatchStats, Dispatcher
from segdist.job.plan import ChunkSpec, plan_chunks, plan_incremental
from segdist.job.progress import JobProgress
from segdist.job.worker import WorkerInfo, WorkerSettings
from segdist.proposals import layout
from segdist.proposals.layout import chunk_name
from segdist.ray_connect import connect_ray, shutdown_ray
from segdist.storage_errors import retry

log = logging.getLogger("segdist.job")

SUMMARY_BAD_IMAGES = 5  # bad images named in the run summary


@dataclass
class JobResult:
    """What a run did. ``complete``: every chunk of the plan is committed (exit code 0)."""

    complete: bool
    output_uri: str
    manifest_uri: str
    chunks_total: int
    chunks_skipped: int
    chunks_written: int
    chunks_failed: list[ChunkFailure] = field(default_factory=list)
    images_total: int = 0
    images_written: int = 0
    images_failed: int = 0
    proposals: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0
    written_chunks: list[int] = field(default_factory=list)  # indices processed by this run
    # the first few bad images ({"image_id", "file_name", "reason", ...}); the manifest has them all
    failed_images: list[dict[str, Any]] = field(default_factory=list)
    # chunks whose record existed but whose files did not match it (redone): index -> why
    chunks_redone: dict[int, str] = field(default_factory=dict)
    # what stopped the run or could not be written (run record, manifest), one line each
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        committed = self.chunks_skipped + self.chunks_written
        lines = [
            f"{'complete' if self.complete else 'INCOMPLETE'}: {committed}"
            f"/{self.chunks_total} chunks committed ({self.chunks_written} written now, "
            f"{self.chunks_skipped} already committed), {self.images_written} images, "
            f"{self.proposals} proposals, {self.images_failed} bad images skipped",
            f"this run: {self.seconds:.1f} s, {self.images_per_second:.2f} images/s",
            f"output: {self.output_uri}  manifest: {self.manifest_uri}",
        ]
        for problem in self.problems:
            lines.append(problem)
        for index, why in sorted(self.chunks_redone.items()):
            lines.append(f"redone chunk {index}: {why}")
        for f in self.chunks_failed:
            lines.append(f"failed chunk {f.index} after {f.attempts} attempts: "
                         f"{f.errors[-1] if f.errors else '?'}")
        for bad in self.failed_images:
            lines.append(f"bad image {bad['image_id']} ({bad['file_name']}): {bad['reason']}")
        if self.images_failed > len(self.failed_images):
            lines.append(f"... and {self.images_failed - len(self.failed_images)} more bad images: "
                         f"all are listed in the manifest's failed_images")
        return "\n".join(lines)


def _worker_resources(cfg: JobConfig, n_chunks: int, embedded: bool) -> tuple[int, dict[str, Any]]:
    """How many workers to start and their ``ray.remote`` options, from the cluster's resources.

    ``embedded``: Ray was started by this process (no autoscaler will ever add a GPU).
    """
    import ray

    res = cfg.resources
    gpus = float(ray.cluster_resources().get("GPU", 0))
    if res.use_gpus is False or cfg.model.device == "cpu":
        use_gpu = False
    elif res.use_gpus or cfg.model.device == "cuda":
        use_gpu = True
        if gpus == 0:
            if embedded:
                raise ConfigError(
                    "GPU workers were asked for (model.device=cuda or resources.use_gpus=true) but "
                    "this machine has no GPU; use model.device=auto or resources.use_gpus=false")
            log.warning("the cluster has no GPU node yet; GPU workers wait for the autoscaler")
    else:
        use_gpu = gpus > 0
    if use_gpu:
        count = res.num_workers or max(1, math.floor(gpus / res.gpus_per_worker + 1e-9))
        options = {"num_gpus": res.gpus_per_worker, "num_cpus": res.cpus_per_worker}
    else:
        count = res.num_workers or 1
        options = {"num_gpus": 0, "num_cpus": res.cpus_per_worker}
    if embedded:
        # One node that never grows: a worker bigger than it would wait forever, unschedulable.
        have = ray.cluster_resources()
        for key, need, fld in (("GPU", options["num_gpus"], "gpus_per_worker"),
                               ("CPU", options["num_cpus"], "cpus_per_worker")):
            if need and need > float(have.get(key, 0)) + 1e-9:
                raise ConfigError(
                    f"each worker asks for {need:g} {key}s (resources.{fld}) but this machine's "
                    f"embedded Ray has {float(have.get(key, 0)):g}; lower resources.{fld}")
    return min(count, max(n_chunks, 1)), options


def _absolute(uri: str | None) -> str | None:
    if uri is None or "://" in uri or "::" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def absolute_local_paths(cfg: JobConfig) -> JobConfig:
    """``cfg`` with relative local paths made absolute: workers do not share the driver's cwd."""
    d, m, o = cfg.dataset, cfg.model, cfg.output
    weights = m.weights.with_uri(_absolute(m.weights.uri)) if m.weights.is_file else m.weights
    return cfg.model_copy(update={
        "dataset": d.model_copy(update={"annotations": _absolute(d.annotations),
                                        "images": _absolute(d.images), "root": _absolute(d.root),
                                        "image_list": _absolute(d.image_list)}),
        "model": m.model_copy(update={"weights": weights}),
        "output": o.model_copy(update={"uri": _absolute(o.uri)}),
    })


@dataclass
class _Dispatched:
    """What the workers did in this run (empty when every chunk was already committed)."""

    done: dict[int, state.ChunkRecord] = field(default_factory=dict)
    failures: dict[int, ChunkFailure] = field(default_factory=dict)
    stats: DispatchStats | None = None
    first_worker: WorkerInfo | None = None
    first_ready_s: float | None = None
    seconds: float = 0.0
    stopped: str | None = None  # why the run stopped before its chunks ran (a storage failure)


def run_job(cfg: JobConfig, *, address: str | None = None, overwrite: bool = False,
            progress: bool = True) -> JobResult:
    """Run the proposal job for ``cfg`` (see the module docstring); returns what it did.

    Raises SegdistError before any worker starts when the output is not writable, the dataset is
    not readable, the output holds a different run's proposals (and ``overwrite`` is false), or
    another driver holds the output's lease.
    """
    started = manifest.utc_now()
    t_start = time.perf_counter()
    cfg = absolute_local_paths(cfg)
    out = cfg.output.uri.rstrip("/") or cfg.output.uri
    dataset, plan = _preflight(cfg)
    hold = lease.acquire(out, cfg.output.storage_options)
    try:
        return _run(cfg, out, dataset, plan, address, overwrite, progress, started, t_start)
    finally:
        hold.release()


def _run(cfg: JobConfig, out: str, dataset: Dataset, plan: list[ChunkSpec] | None,
         address: str | None, overwrite: bool, progress: bool, started: str, t_start: float
         ) -> JobResult:
    """Steps 3-8, with the output's lease held."""
    retry_s = cfg.resources.storage_retry_s
    record = _claim_output(cfg, out, overwrite, created=started)
    plan, records = _plan(cfg, out, dataset, plan)
    scan = state.scan_committed(out, len(plan), cfg.output.storage_options,
                                [c.image_ids for c in plan], retry_s, records)
    committed = scan.committed
    todo = [c for c in plan if c.index not in committed]
    if committed:
        log.info("resuming: %d of %d chunks already committed, %d to do", len(committed), len(plan),
                 len(todo))
    run = _Dispatched()
    if todo:
        run = _dispatch(cfg, out, dataset, plan, committed, todo, record, address, progress)
    doc, manifest_uri, manifest_error = _write_manifest(cfg, out, dataset, plan, committed, run,
                                                        record, started, t_start)
    problems = [p for p in (run.stopped, manifest_error) if p]
    images_now = sum(r.images + len(r.failed) for r in run.done.values())
    result = JobResult(
        complete=doc["complete"] and not problems, output_uri=out, manifest_uri=manifest_uri,
        chunks_total=len(plan), chunks_skipped=len(committed), chunks_written=len(run.done),
        chunks_failed=sorted(run.failures.values(), key=lambda f: f.index),
        images_total=len(dataset), images_written=doc["totals"]["images"],
        images_failed=doc["totals"]["images_failed"], proposals=doc["totals"]["proposals"],
        seconds=run.seconds,
        images_per_second=images_now / run.seconds if run.done and run.seconds > 0 else 0.0,
        written_chunks=sorted(run.done), failed_images=doc["failed_images"][:SUMMARY_BAD_IMAGES],
        chunks_redone=dict(scan.damaged), problems=problems)
    log.debug("%s", result.summary())
    return result


def _preflight(cfg: JobConfig) -> tuple[Dataset, list[ChunkSpec] | None]:
    """Steps 1-2: the output is writable, the weights exist, the dataset loads; its chunk plan
    (None for an image folder: its plan needs the output's records, see :func:`_plan`)."""
    preflight.check_output(cfg.output)
    preflight.check_weights(cfg.model)
    dataset = preflight.load_checked_dataset(cfg.dataset)
    if cfg.dataset.format == "images":
        return dataset, None
    return dataset, plan_chunks(dataset.images, cfg.output.chunk_size)


def _claim_output(cfg: JobConfig, out: str, overwrite: bool, created: str) -> state.RunRecord:
    """Step 4: the output's run record: this config's (a new one is written once a worker has
    loaded the model, see :func:`_dispatch`), or a refusal when the output holds another config's
    proposals (unless ``overwrite``: they are removed)."""
    opts = cfg.output.storage_options
    retry_s = cfg.resources.storage_retry_s
    settings = state.output_settings(cfg)
    fp = state.fingerprint(settings)
    record = state.read_run_record(out, opts, retry_s)
    if record is not None and record.model_name is None:
        # Provisional: a run that never got a worker to load its model wrote no chunk under it
        # (segdist before 0.x wrote the record before loading); a corrected config may proceed.
        log.info("%s: replacing the run record of a run that never loaded its model", out)
        record = None
    if overwrite:
        if record is not None or state.has_proposal_files(out, opts, retry_s):
            log.warning("--overwrite: removing the previous run's files under %s", out)
            state.clear_output(out, opts)
        record = None
    elif record is not None and record.fingerprint != fp:
        diff = state.settings_diff(record.settings, settings)
        raise SegdistError(
            f"{out} holds proposals made with a different config ({'; '.join(diff[:6])}). "
            "Use a new output.uri, or pass --overwrite to replace them.")
    elif record is None and state.has_proposal_files(out, opts, retry_s):
        raise SegdistError(
            f"{out} already holds proposal files that no segdist run record describes; "
            "use a new output.uri, or pass --overwrite to replace them.")
    if record is None:
        record = state.RunRecord(fingerprint=fp, settings=settings, segdist_version=__version__,
                                 created=created)
    return record


def _plan(cfg: JobConfig, out: str, dataset: Dataset, plan: list[ChunkSpec] | None
          ) -> tuple[list[ChunkSpec], dict[int, state.ChunkRecord] | None]:
    """The chunk plan: an image folder grows, so its plan keeps the chunks the output holds
    (:func:`plan_incremental`), made once the output's records are known to be this config's.
    Returns the plan and the chunk records read for it (None where the plan needed none)."""
    records = None
    if plan is None:
        records = state.read_chunk_records(out, cfg.output.storage_options,
                                           cfg.resources.storage_retry_s)
        plan = plan_incremental(dataset.images, cfg.output.chunk_size,
                                {i: r.covered_ids for i, r in records.items()})
    log.info("dataset %s: %d images in %d chunks of %d; proposals go to %s (%s)", dataset.name,
             len(dataset), len(plan), cfg.output.chunk_size, out, ", ".join(cfg.output.formats))
    return plan, records


def _dispatch(cfg: JobConfig, out: str, dataset: Dataset, plan: list[ChunkSpec],
              committed: dict[int, state.ChunkRecord], todo: list[ChunkSpec],
              record: state.RunRecord, address: str | None, progress: bool) -> _Dispatched:
    """Steps 6-7: Ray, the workers, and the remaining chunks through the dispatcher."""
    import ray

    from segdist.proposers import PROPOSERS

    opts = cfg.output.storage_options
    retry_s = cfg.resources.storage_retry_s
    run = _Dispatched()
    t_run = time.perf_counter()
    started_ray = connect_ray(address, connect_timeout_s=cfg.resources.connect_timeout_s,
                              quiet=True)
    skipped_images = sum(r.images + len(r.failed) for r in committed.values())
    bar = JobProgress(len(dataset), len(plan), skipped_images, len(committed), enabled=progress)
    try:
        preflight.check_output_shared(cfg.output, sum(1 for n in ray.nodes() if n.get("Alive")))
        n_workers, options = _worker_resources(cfg, len(todo), embedded=started_ray)
        log.info("starting %d worker(s) with %s", n_workers, options)

        def check_model(info: WorkerInfo) -> None:
            run.first_ready_s = time.perf_counter() - t_run
            if record.model_name is not None and (
                    record.model_name != info.model_name or record.weights_sha256 != info.weights_sha256):
                raise SegdistError(
                    f"{out} holds proposals of model {record.model_name} (weights sha256 "
                    f"{record.weights_sha256}), but this run loads {info.model_name} (weights "
                    f"sha256 {info.weights_sha256}). Use a new output.uri, or --overwrite.")
            if record.model_name is None:
                # The output is claimed now, before any chunk: a run that failed to load its
                # model left nothing behind. A StorageError here (after retries) stops the run.
                record.model_name, record.weights_sha256 = info.model_name, info.weights_sha256
                state.write_run_record(out, record, opts, retry_s)
            run.first_worker = info

        def attempt_failed(index: int, error: str, final: bool) -> None:
            bar.attempt_failed(final)
            log.warning("chunk %d attempt failed%s: %s", index,
                        " (giving up)" if final else ", will retry", error)

        wsettings = WorkerSettings(
            model=cfg.model, builder=PROPOSERS[cfg.model.name], out_uri=out,
            formats=tuple(cfg.output.formats), gzip=cfg.output.gzip,
            out_storage_options=dict(opts), data_storage_options=dict(dataset.storage_options),
            decode_threads=cfg.resources.decode_threads, max_pixels=cfg.dataset.max_pixels,
            storage_retry_s=retry_s)
        dispatcher = Dispatcher(
            wsettings, n_workers, options, max_chunk_attempts=cfg.resources.max_chunk_attempts,
            max_replacements=cfg.resources.max_actor_restarts, on_first_worker=check_model,
            on_done=lambda rec: bar.chunk_done(rec.images, len(rec.failed)),
            on_failed_attempt=attempt_failed, on_tick=bar.tick,
            chunk_timeout_s=cfg.resources.chunk_timeout_s)
        try:
            run.done, run.failures = dispatcher.run(todo)
        except StorageError as exc:  # only the run record's write raises it here
            run.stopped = f"stopped before any chunk: the run record could not be written: {exc}"
            log.error("%s", run.stopped)
        run.stats = dispatcher.stats
    finally:
        bar.close()
        if started_ray:
            shutdown_ray()
    run.seconds = time.perf_counter() - t_run
    return run


def _write_manifest(cfg: JobConfig, out: str, dataset: Dataset, plan: list[ChunkSpec],
                    committed: dict[int, state.ChunkRecord], run: _Dispatched,
                    record: state.RunRecord, started: str, t_start: float
                    ) -> tuple[dict[str, Any], str, str | None]:
    """Step 8: ``coco-json/images.json`` (with COCO-JSON output), then ``manifest.json`` from every
    committed chunk's record, written last; (the manifest, its URI, None or why it could not be
    written: a storage failure after ``resources.storage_retry_s`` does not crash the run)."""
    opts = cfg.output.storage_options
    retry_s = cfg.resources.storage_retry_s
    model_info = {"name": record.model_name or cfg.model.name, "weights": cfg.model.weights.text(),
                  "weights_sha256": record.weights_sha256}
    if run.first_worker is not None:
        model_info["device"] = run.first_worker.device
    timings = _timings(run, started, t_start)
    failed_list = [{"index": f.index, "name": chunk_name(f.index), "attempts": f.attempts,
                    "errors": f.errors} for f in sorted(run.failures.values(), key=lambda f: f.index)]
    records = {**committed, **run.done}
    images = manifest.image_index(records, dataset.by_id())
    dataset_info = {"name": dataset.name, "format": cfg.dataset.format, "images": len(dataset)}
    if dataset.skipped:
        dataset_info["skipped_files"] = dict(sorted(dataset.skipped.items()))
    runs = _previous_runs(out, opts, retry_s) + ([timings] if run.done else [])
    doc = manifest.build_manifest(
        config=public_dict(cfg), model=model_info, dataset=dataset_info,
        chunk_size=cfg.output.chunk_size, n_chunks=len(plan), records=records,
        failed_chunks=failed_list, timings=timings, images=images, runs=runs)
    uri = layout.manifest_uri(out)
    try:
        if "coco-json" in cfg.output.formats:
            retry(lambda: layout.write_images_index(out, images, opts), retry_s,
                  "write coco-json/images.json")
        retry(lambda: manifest.write_manifest(out, doc, opts), retry_s, f"write {uri}")
    except StorageError as exc:
        log.error("the manifest could not be written: %s", exc)
        return doc, uri, (f"the manifest could not be written ({exc}); re-run the same command "
                          "to write it (committed chunks are skipped)")
    return doc, uri, None


def _timings(run: _Dispatched, started: str, t_start: float) -> dict[str, Any]:
    """This run's timings, workers and counts (the manifest's ``timings``, and its entry in
    ``runs`` when it wrote chunks)."""
    images_now = sum(r.images + len(r.failed) for r in run.done.values())
    timings: dict[str, Any] = {
        "started": started, "finished": manifest.utc_now(),
        "wall_seconds": round(time.perf_counter() - t_start, 3),
        "run_seconds": round(run.seconds, 3),
        "chunks_written": len(run.done),
        "images_processed_now": images_now,
        "images_per_second": (round(images_now / run.seconds, 4)
                              if run.done and run.seconds > 0 else None),
        "first_worker_ready_seconds": (None if run.first_ready_s is None
                                       else round(run.first_ready_s, 3)),
        "chunk_seconds": {k: round(sum(r.seconds.get(k, 0.0) for r in run.done.values()), 3)
                          for k in ("decode_wait", "model", "write", "total")},
    }
    if run.stats is not None:
        timings["workers_started"] = run.stats.workers_started
        timings["workers_replaced"] = run.stats.workers_replaced
        timings["failed_attempts"] = run.stats.attempts_failed
        # Every worker that loaded the model, where: a Ray node id tells apart nodes that share
        # a host name (containers, or the test's nodes on one machine).
        timings["workers"] = [{"host": w.host, "node_id": w.node_id, "pid": w.pid,
                               "device": w.device} for w in run.stats.worker_infos]
    return timings


def _previous_runs(out: str, opts: dict[str, Any], retry_s: float) -> list[dict[str, Any]]:
    """The ``runs`` of the manifest a previous run left (its ``timings`` as one run when it is
    older than the list and wrote chunks); an unreadable manifest counts as none."""
    try:
        prev = state.read_json(layout.manifest_uri(out), opts, retry_s)
    except SegdistError as exc:
        log.warning("the previous manifest could not be read (%s); its run timings are dropped",
                    exc)
        return []
    if not isinstance(prev, dict):
        return []
    if isinstance(prev.get("runs"), list):
        return list(prev["runs"])
    timings = prev.get("timings")
    return [timings] if isinstance(timings, dict) and timings.get("images_processed_now") else []
