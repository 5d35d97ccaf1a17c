"""``run_job``: the dataset-scale proposal job, from a validated JobConfig to a manifest.

Order of work (each step can stop the run before anything expensive happens):

1. preflight: the output is writable, the weights file exists, the dataset's index loads and its
   first image exists;
2. the plan: sorted image ids in chunks of ``output.chunk_size`` (an image folder's plan comes
   after step 3: it keeps the chunks the output already holds, :func:`plan_incremental`);
3. the output's run record (``_segdist/run.json``): a different config is refused unless
   ``overwrite``; the record is written before any chunk;
4. committed chunks (a record and all files present) are skipped;
5. Ray: an embedded local cluster, or the cluster at ``address`` / RAY_ADDRESS; one worker actor per
   GPU (``resources.gpus_per_worker`` each, fractional allowed), or CPU workers on a cluster
   without GPUs; the first worker's model identity (name, weights sha256) is checked against the
   run record before any chunk is sent;
6. the dispatcher runs the remaining chunks (retries, worker replacement);
7. ``coco-json/images.json`` (with COCO-JSON output), then ``manifest.json`` last; the result says
   whether every chunk is committed.
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
from segdist.errors import ConfigError, SegdistError
from segdist.job import faults, manifest, preflight, state
from segdist.job.dispatch import ChunkFailure, Dispatcher
from segdist.job.plan import plan_chunks, plan_incremental
from segdist.job.progress import JobProgress
from segdist.job.worker import WorkerInfo, WorkerSettings
from segdist.proposals import layout
from segdist.proposals.layout import chunk_name
from segdist.ray_connect import connect_ray

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

    def summary(self) -> str:
        lines = [
            f"{'complete' if self.complete else 'INCOMPLETE'}: {self.chunks_total - len(self.chunks_failed)}"
            f"/{self.chunks_total} chunks committed ({self.chunks_written} written now, "
            f"{self.chunks_skipped} already committed), {self.images_written} images, "
            f"{self.proposals} proposals, {self.images_failed} bad images skipped",
            f"this run: {self.seconds:.1f} s, {self.images_per_second:.2f} images/s",
            f"output: {self.output_uri}  manifest: {self.manifest_uri}",
        ]
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
    fault = os.environ.get(faults.ENV_VAR)
    if fault:
        faults.parse(fault)  # fail here, in the driver, if malformed
        options["runtime_env"] = {"env_vars": {faults.ENV_VAR: fault}}
    return min(count, max(n_chunks, 1)), options


def _absolute(uri: str | None, *, weights: bool = False) -> str | None:
    if uri is None or "://" in uri or "::" in uri:
        return uri
    if weights and "/" not in uri and "." not in uri:
        return uri  # a torchvision weights enum name such as DEFAULT
    return os.path.abspath(os.path.expanduser(uri))


def absolute_local_paths(cfg: JobConfig) -> JobConfig:
    """``cfg`` with relative local paths made absolute: workers do not share the driver's cwd."""
    d, m, o = cfg.dataset, cfg.model, cfg.output
    return cfg.model_copy(update={
        "dataset": d.model_copy(update={"annotations": _absolute(d.annotations),
                                        "images": _absolute(d.images), "root": _absolute(d.root),
                                        "image_list": _absolute(d.image_list)}),
        "model": m.model_copy(update={"weights": _absolute(m.weights, weights=True)}),
        "output": o.model_copy(update={"uri": _absolute(o.uri)}),
    })


def run_job(cfg: JobConfig, *, address: str | None = None, overwrite: bool = False,
            progress: bool = True) -> JobResult:
    """Run the proposal job for ``cfg`` (see the module docstring); returns what it did.

    Raises SegdistError before any worker starts when the output is not writable, the dataset is
    not readable, or the output holds a different run's proposals (and ``overwrite`` is false).
    """
    started = manifest.utc_now()
    t_start = time.perf_counter()
    cfg = absolute_local_paths(cfg)
    out = cfg.output.uri.rstrip("/") or cfg.output.uri
    opts = cfg.output.storage_options

    preflight.check_output(cfg.output)
    preflight.check_weights(cfg.model)
    dataset = preflight.load_checked_dataset(cfg.dataset)
    # An image folder grows: its plan keeps the chunks the output holds (plan_incremental), so it
    # is made once the output's records are known to be this config's.
    incremental = cfg.dataset.format == "images"
    plan = None if incremental else plan_chunks(dataset.images, cfg.output.chunk_size)
    n_images = len(dataset)

    settings = state.output_settings(cfg)
    fp = state.fingerprint(settings)
    record = state.read_run_record(out, opts)
    if overwrite:
        if record is not None or state.has_proposal_files(out, opts):
            log.warning("--overwrite: removing the previous run's files under %s", out)
            state.clear_output(out, opts)
        record = None
    elif record is not None and record.fingerprint != fp:
        diff = state.settings_diff(record.settings, settings)
        raise SegdistError(
            f"{out} holds proposals made with a different config ({'; '.join(diff[:6])}). "
            "Use a new output.uri, or pass --overwrite to replace them.")
    elif record is None and state.has_proposal_files(out, opts):
        raise SegdistError(
            f"{out} already holds proposal files that no segdist run record describes; "
            "use a new output.uri, or pass --overwrite to replace them.")
    if record is None:
        record = state.RunRecord(fingerprint=fp, settings=settings, segdist_version=__version__,
                                 created=started)
        state.write_run_record(out, record, opts)

    if plan is None:
        plan = plan_incremental(dataset.images, cfg.output.chunk_size,
                                state.recorded_chunk_ids(out, opts))
    log.info("dataset %s: %d images in %d chunks of %d; proposals go to %s (%s)", dataset.name,
             n_images, len(plan), cfg.output.chunk_size, out, ", ".join(cfg.output.formats))
    committed = state.committed_chunks(out, len(plan), opts, [c.image_ids for c in plan])
    todo = [c for c in plan if c.index not in committed]
    skipped_images = sum(r.images + len(r.failed) for r in committed.values())
    if committed:
        log.info("resuming: %d of %d chunks already committed, %d to do", len(committed), len(plan),
                 len(todo))

    worker_info: dict[str, WorkerInfo] = {}
    done: dict[int, state.ChunkRecord] = {}
    failures: dict[int, ChunkFailure] = {}
    t_run = time.perf_counter()
    first_ready_s: float | None = None
    dispatch_stats = None
    if todo:
        started_ray = connect_ray(address)
        bar = JobProgress(n_images, len(plan), skipped_images, len(committed), enabled=progress)
        try:
            n_workers, options = _worker_resources(cfg, len(todo), embedded=started_ray)
            log.info("starting %d worker(s) with %s", n_workers,
                     {k: v for k, v in options.items() if k != "runtime_env"})

            def check_model(info: WorkerInfo) -> None:
                nonlocal first_ready_s
                first_ready_s = time.perf_counter() - t_run
                if record.model_name is not None and (
                        record.model_name != info.model_name or record.weights_sha256 != info.weights_sha256):
                    raise SegdistError(
                        f"{out} holds proposals of model {record.model_name} (weights sha256 "
                        f"{record.weights_sha256}), but this run loads {info.model_name} (weights "
                        f"sha256 {info.weights_sha256}). Use a new output.uri, or --overwrite.")
                if record.model_name is None:
                    record.model_name, record.weights_sha256 = info.model_name, info.weights_sha256
                    state.write_run_record(out, record, opts)
                worker_info["first"] = info

            def chunk_done(rec: state.ChunkRecord) -> None:
                bar.chunk_done(rec.images, len(rec.failed))

            def attempt_failed(index: int, error: str, final: bool) -> None:
                bar.attempt_failed(final)
                log.warning("chunk %d attempt failed%s: %s", index,
                            " (giving up)" if final else ", will retry", error)

            wsettings = WorkerSettings(
                model=cfg.model, out_uri=out, formats=tuple(cfg.output.formats), gzip=cfg.output.gzip,
                out_storage_options=dict(opts), data_storage_options=dict(dataset.storage_options),
                decode_threads=cfg.resources.decode_threads, max_pixels=cfg.dataset.max_pixels)
            dispatcher = Dispatcher(
                wsettings, n_workers, options, max_chunk_attempts=cfg.resources.max_chunk_attempts,
                max_replacements=cfg.resources.max_actor_restarts, on_first_worker=check_model,
                on_done=chunk_done, on_failed_attempt=attempt_failed, on_tick=bar.tick,
                chunk_timeout_s=cfg.resources.chunk_timeout_s)
            done, failures = dispatcher.run(todo)
            dispatch_stats = dispatcher.stats
        finally:
            bar.close()
            if started_ray:
                import ray

                ray.shutdown()
    run_seconds = time.perf_counter() - t_run

    records = {**committed, **done}
    model_info = {"name": record.model_name or cfg.model.name, "weights": cfg.model.weights,
                  "weights_sha256": record.weights_sha256}
    if "first" in worker_info:
        model_info["device"] = worker_info["first"].device
    images_now = sum(r.images + len(r.failed) for r in done.values())
    timings: dict[str, Any] = {
        "started": started, "finished": manifest.utc_now(),
        "wall_seconds": round(time.perf_counter() - t_start, 3),
        "run_seconds": round(run_seconds, 3),
        "images_processed_now": images_now,
        "images_per_second": round(images_now / run_seconds, 4) if done and run_seconds > 0 else None,
        "first_worker_ready_seconds": None if first_ready_s is None else round(first_ready_s, 3),
        "chunk_seconds": {k: round(sum(r.seconds.get(k, 0.0) for r in done.values()), 3)
                          for k in ("decode_wait", "model", "write", "total")},
    }
    if dispatch_stats is not None:
        timings["workers_started"] = dispatch_stats.workers_started
        timings["workers_replaced"] = dispatch_stats.workers_replaced
        timings["failed_attempts"] = dispatch_stats.attempts_failed
    failed_list = [{"index": f.index, "name": chunk_name(f.index), "attempts": f.attempts,
                    "errors": f.errors} for f in sorted(failures.values(), key=lambda f: f.index)]
    images = manifest.image_index(records, dataset.by_id())
    if "coco-json" in cfg.output.formats:
        layout.write_images_index(out, images, opts)
    dataset_info = {"name": dataset.name, "format": cfg.dataset.format, "images": n_images}
    if dataset.skipped:
        dataset_info["skipped_files"] = dict(sorted(dataset.skipped.items()))
    doc = manifest.build_manifest(
        config=public_dict(cfg), model=model_info, dataset=dataset_info,
        chunk_size=cfg.output.chunk_size, n_chunks=len(plan), records=records,
        failed_chunks=failed_list, timings=timings, images=images)
    manifest_uri = manifest.write_manifest(out, doc, opts)
    result = JobResult(
        complete=doc["complete"], output_uri=out, manifest_uri=manifest_uri, chunks_total=len(plan),
        chunks_skipped=len(committed), chunks_written=len(done),
        chunks_failed=sorted(failures.values(), key=lambda f: f.index), images_total=n_images,
        images_written=doc["totals"]["images"], images_failed=doc["totals"]["images_failed"],
        proposals=doc["totals"]["proposals"], seconds=run_seconds,
        images_per_second=images_now / run_seconds if done and run_seconds > 0 else 0.0,
        written_chunks=sorted(done), failed_images=doc["failed_images"][:SUMMARY_BAD_IMAGES])
    log.debug("%s", result.summary())
    return result
