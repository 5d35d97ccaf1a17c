"""The proposal job on a real local Ray cluster, writing to a real S3-compatible server (moto).

Every test runs the real proposer (a tiny random-weight DeepMask: resnet18 trunk, two scales) on
a small synthetic dataset, and checks the output against a single-process run of the same
proposer on the same images, byte for byte.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import fsspec
import pytest
import yaml

from segdist.config import JobConfig, validate
from segdist.errors import SegdistError
from segdist.job import state
from segdist.job.driver import run_job
from segdist.proposals import layout
from segdist.proposals.store import open_proposals

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 4
TINY_MODEL = {"name": "deepmask", "trunk": "resnet18", "proposals": 12,
              "scales": {"min": -1.0, "max": 0.0, "step": 1.0}, "batch_size": 2, "device": "cpu"}


def make_data(uri: str, n: int, storage_options: dict | None = None, seed: int = 5) -> dict[str, str]:
    """A synthetic COCO dataset of ``n`` small images; returns the dataset config section."""
    from segdist.data.synthetic import make_synthetic

    make_synthetic(uri, n, seed=seed, min_side=48, max_side=96, max_objects=3,
                   storage_options=storage_options)
    return {"format": "coco", "annotations": f"{uri}/annotations/instances_all.json",
            "images": f"{uri}/images", "storage_options": dict(storage_options or {})}


def job_config(dataset: dict, out: str, out_options: dict | None = None, model: dict | None = None,
               **resources: Any) -> JobConfig:
    return validate(JobConfig, {
        "dataset": dataset, "model": TINY_MODEL if model is None else model,
        "output": {"uri": out, "chunk_size": CHUNK, "formats": ["coco-json", "parquet"],
                   "storage_options": dict(out_options or {})},
        "resources": {"num_workers": 2, "cpus_per_worker": 1, "decode_threads": 2,
                      "max_chunk_attempts": 3, "max_actor_restarts": 3, **resources},
    })


def config_file(cfg: JobConfig, folder: Path) -> Path:
    """``cfg`` written as ``folder/job.yaml``, the file a user passes to ``segdist generate``."""
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def reference_files(cfg: JobConfig, out: str) -> dict[str, bytes]:
    """A single-process run: the same proposer, batching and chunking, no Ray; {relpath: bytes}."""
    import torch

    from segdist.data import load_dataset
    from segdist.errors import ImageDecodeError
    from segdist.imageio import read_image
    from segdist.job.plan import plan_chunks
    from segdist.proposers import build_proposer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a 1-CPU Ray worker: same kernels, same float results
    try:
        gen = build_proposer(cfg.model)
        ds = load_dataset(cfg.dataset)
        index = []
        for chunk in plan_chunks(ds.images, cfg.output.chunk_size):
            images, ids, failed = [], [], []
            for rec in chunk.records:
                try:
                    images.append(read_image(rec.uri, ds.storage_options, cfg.dataset.max_pixels))
                    ids.append(rec.image_id)
                except ImageDecodeError as exc:
                    failed.append({"image_id": rec.image_id, "file_name": rec.file_name,
                                   "reason": exc.reason})
            props = []
            for s in range(0, len(images), cfg.model.batch_size):
                props += gen(images[s:s + cfg.model.batch_size], ids[s:s + cfg.model.batch_size])
            names = {r.image_id: r.file_name for r in chunk.records}
            layout.write_chunk(out, chunk.index, props, cfg.output.formats, cfg.output.gzip,
                               file_names=names, failed=failed)
            index += [{"id": p.image_id, "file_name": names[p.image_id], "height": p.height,
                       "width": p.width} for p in props]
        if "coco-json" in cfg.output.formats:
            layout.write_images_index(out, index)
    finally:
        torch.set_num_threads(threads)
    return read_tree(out)


def pycocotools_segm_stats(annotations: str, props) -> list[float]:
    """pycocotools' class-agnostic segm COCOeval (maxDets 10, 100, 1000) over proposals, as one
    results list: the numbers ``segdist evaluate`` must reproduce (stats[6:9] = AR@10/100/1000)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(annotations)
    results = [{"image_id": p.image_id, "category_id": 1, "score": float(p.scores[k]),
                "segmentation": {"size": [p.height, p.width], "counts": p.counts[k].decode()}}
               for p in props for k in range(len(p))]
    e = COCOeval(gt, gt.loadRes(results), "segm")
    e.params.useCats, e.params.maxDets = 0, [10, 100, 1000]
    e.evaluate()
    e.accumulate()
    e.summarize()
    return list(e.stats)


def read_tree(uri: str, storage_options: dict | None = None, dirs=("parquet", "coco-json")
              ) -> dict[str, bytes]:
    """{path relative to uri: bytes} of every file under the given sub-folders."""
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    fs.invalidate_cache()
    out = {}
    for d in dirs:
        base = f"{root.rstrip('/')}/{d}"
        if fs.exists(base):
            for p in fs.find(base):
                out[p[len(root.rstrip('/')) + 1:]] = fs.cat_file(p)
    return out


def mtimes(out: str) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in Path(out).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def ray_s3(s3_server, ray_cluster):
    """The session's Ray, started (if this module is first) after the S3 server's env is set."""
    return ray_cluster


def test_job_to_s3_exactly_once_and_equal_to_single_process(ray_s3, s3_bucket, tmp_path):
    bucket, opts = s3_bucket
    # Explicit credentials (the Ray workers must not depend on inherited env) that must be redacted.
    out_opts = {**opts, "key": "testing", "secret": "testing"}
    data = make_data(f"s3://{bucket}/data", 14, out_opts)
    out = f"s3://{bucket}/proposals/run1"
    cfg = job_config(data, out, out_opts)

    result = run_job(cfg, progress=False)

    assert result.complete and result.chunks_total == 4 and result.chunks_written == 4
    assert result.chunks_skipped == 0 and not result.chunks_failed
    fs = fsspec.filesystem("s3", **out_opts)
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[1] for p in fs.find(f"{bucket}/proposals/run1"))
    expected = sorted(
        [f"chunk-{i:06d}.{k}.json" for i in range(4) for k in ("segm", "bbox")]
        + [f"chunk-{i:06d}.parquet" for i in range(4)]
        + [f"chunk-{i:06d}.json" for i in range(4)] + ["run.json", "manifest.json", "images.json"])
    assert names == expected  # deterministic names, no temporary or duplicate files

    # Every image exactly once, each chunk holding images [i*4, (i+1)*4) of the sorted ids.
    gt = json.loads(fs.cat_file(f"{bucket}/data/annotations/instances_all.json"))
    ids = sorted(im["id"] for im in gt["images"])
    store = open_proposals(out, out_opts)
    seen = [p.image_id for chunk in store.iter_chunks() for p in chunk]
    assert seen == ids
    assert [[p.image_id for p in c] for c in store.iter_chunks()] == [ids[i:i + CHUNK] for i in range(0, 14, CHUNK)]

    # The manifest's counts match the files.
    manifest = json.loads(fs.cat_file(f"{bucket}/proposals/run1/manifest.json"))
    assert manifest["complete"] is True
    assert manifest["totals"] == {"chunks": 4, "chunks_committed": 4, "chunks_failed": 0,
                                  "images": 14, "images_failed": 0,
                                  "proposals": sum(len(store.get(i)) for i in ids)}
    for entry, chunk in zip(manifest["chunks"], store.iter_chunks()):
        assert entry["images"] == len(chunk)
        assert entry["proposals"] == sum(len(p) for p in chunk) > 0
        uris = layout.chunk_uris(out, entry["index"], cfg.output.formats)
        assert entry["files"] == {k: u[len(out) + 1:] for k, u in uris.items()}
    assert manifest["model"]["name"] == "deepmask" and manifest["model"]["weights_sha256"] is None
    assert manifest["packages"]["ray"] and manifest["packages"]["torch"]
    assert manifest["config"]["output"]["storage_options"]["secret"] == "***"
    assert manifest["timings"]["images_processed_now"] == 14

    # Byte-identical to one process running the same proposer on the same images.
    ref = reference_files(cfg, str(tmp_path / "ref"))
    assert read_tree(out, out_opts) == ref


def test_rerun_skips_committed_chunks_and_refuses_a_different_config(ray_s3, tmp_path):
    data = make_data(str(tmp_path / "data"), 10)
    gt = json.loads(Path(data["annotations"]).read_text())
    victim = sorted(gt["images"], key=lambda im: im["id"])[5]
    path = Path(data["images"]) / victim["file_name"]
    path.write_bytes(path.read_bytes()[:40])  # a truncated image
    out = str(tmp_path / "out")
    cfg = job_config(data, out, num_workers=1)

    first = run_job(cfg, progress=False)

    # The bad image is recorded with id, file and reason, and skipped; its chunk commits.
    assert first.complete and first.chunks_written == 3
    assert first.images_failed == 1 and first.images_written == 9
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    (bad,) = manifest["failed_images"]
    assert bad["image_id"] == victim["id"] and bad["file_name"] == victim["file_name"]
    assert bad["chunk"] == 1 and bad["reason"] and bad["uri"].endswith(victim["file_name"])
    assert manifest["chunks"][1]["images"] == 3 and manifest["chunks"][1]["failed_images"] == 1
    store = open_proposals(out)
    assert victim["id"] not in store and len(store.image_ids()) == 9
    reference = reference_files(cfg, str(tmp_path / "ref"))
    assert read_tree(out) == reference
    before = mtimes(out)

    # Re-run: every chunk is committed, nothing is rewritten.
    again = run_job(cfg, progress=False)
    assert again.complete and again.chunks_written == 0 and again.chunks_skipped == 3
    assert again.images_failed == 1
    after = mtimes(out)
    written_last = ("manifest.json", "coco-json/images.json")  # rewritten by every run
    assert {k: v for k, v in after.items() if k not in written_last} == \
        {k: v for k, v in before.items() if k not in written_last}

    # A committed file damaged since (truncated to 100 bytes): the resume checks every file's size
    # against its record, redoes just that chunk, and says so.
    damaged = Path(out, "parquet", "chunk-000002.parquet")
    size = damaged.stat().st_size
    with open(damaged, "r+b") as f:
        f.truncate(100)
    redo = run_job(cfg, progress=False)
    why = f"parquet/chunk-000002.parquet has 100 bytes, its record says {size}"
    assert redo.complete and redo.written_chunks == [2] and redo.chunks_skipped == 2
    assert redo.chunks_redone == {2: why} and f"redone chunk 2: {why}" in redo.summary()
    assert read_tree(out) == reference
    redone = mtimes(out)
    assert all(redone[k] == v for k, v in after.items()
               if "chunk-000002" not in k and k not in written_last)
    # The manifest keeps the timings of each run that wrote chunks (the no-op re-run wrote none).
    runs = json.loads((tmp_path / "out" / "manifest.json").read_text())["runs"]
    assert [r["chunks_written"] for r in runs] == [3, 1]
    assert runs[0]["started"] == manifest["timings"]["started"]
    after = redone

    # A run with other settings into the same output is refused, naming what differs.
    other = job_config(data, out, num_workers=1)
    other = other.model_copy(update={"model": other.model.model_copy(update={"proposals": 5})})
    with pytest.raises(SegdistError) as err:
        run_job(other, progress=False)
    assert "different config" in str(err.value) and "model.proposals: 12 -> 5" in str(err.value)
    assert "--overwrite" in str(err.value)
    assert mtimes(out) == after

    # --overwrite replaces it.
    replaced = run_job(other, overwrite=True, progress=False)
    assert replaced.complete and replaced.chunks_written == 3
    store = open_proposals(out)
    assert max(len(store.get(i)) for i in store.image_ids()) == 5


def test_failed_model_load_claims_nothing_and_other_weights_behind_the_same_uri_are_refused(
        ray_s3, tmp_path):
    import torch

    from segdist.models.checkpoint import save_checkpoint
    from segdist.models.deepmask import deepmask

    weights = str(tmp_path / "model.safetensors")

    def save(seed: int) -> None:
        torch.manual_seed(seed)
        save_checkpoint(deepmask(trunk="resnet18"), weights)

    save(1)
    data = make_data(str(tmp_path / "data"), 8)
    out = str(tmp_path / "out")
    model = {k: v for k, v in TINY_MODEL.items() if k != "trunk"}
    # First, a weights file the model cannot load (it exists, so preflight lets it through): the
    # run stops at model load and claims nothing, so the corrected config below may proceed.
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(SegdistError, match="could not be loaded"):
        run_job(job_config(data, out, num_workers=1, model={**model, "weights": str(junk)}),
                progress=False)
    assert not Path(out, "_segdist", "run.json").exists()
    cfg = job_config(data, out, num_workers=1, model={**model, "weights": weights})
    assert run_job(cfg, progress=False).complete
    sha = json.loads(Path(out, "manifest.json").read_text())["model"]["weights_sha256"]
    assert sha and json.loads(Path(out, "_segdist", "run.json").read_text())["weights_sha256"] == sha
    assert read_tree(out) == reference_files(cfg, str(tmp_path / "ref"))

    # As if the run had been interrupted before chunk 1 committed, and the weights file then
    # replaced (same URI, same config): the resumed run is refused once its worker reports the
    # sha256, before any chunk is written.
    Path(state.chunk_record_uri(out, 1)).unlink()
    save(2)
    before = mtimes(out)
    with pytest.raises(SegdistError) as err:
        run_job(cfg, progress=False)
    assert f"weights sha256 {sha}" in str(err.value) and "--overwrite" in str(err.value)
    assert mtimes(out) == before


def _generate_cli(config: Path, *extra: str) -> subprocess.CompletedProcess:
    # --address of a port where nothing listens: if the job tried to reach Ray before its checks,
    # the error would be a connection error, not the check's message.
    return subprocess.run(
        [sys.executable, "-m", "segdist", "generate", str(config), "--address", "127.0.0.1:9",
         "--no-progress", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_unwritable_output_or_unreadable_dataset_fails_before_any_worker(s3_server, tmp_path):
    data = make_data(str(tmp_path / "data"), 2)
    cases = {
        "no-such-bucket": ({**data}, "s3://segdist-no-such-bucket/out",
                           "output location s3://segdist-no-such-bucket/out is not writable"),
        "no-annotations": ({**data, "annotations": str(tmp_path / "nope.json")}, str(tmp_path / "o1"),
                           "nope.json"),
        "wrong-image-folder": ({**data, "images": str(tmp_path / "elsewhere")}, str(tmp_path / "o2"),
                               "does not exist; check dataset.images"),
        # Everything checks out, but nothing listens at --address: bounded, one line naming it
        # (Ray's own connect retried for more than ten minutes).
        "no-cluster": ({**data}, str(tmp_path / "o3"),
                       "cannot reach the Ray cluster at 127.0.0.1:9 within 1 s (connection refused)"),
    }
    for name, (dataset, out, message) in cases.items():
        config = tmp_path / f"{name}.yaml"
        config.write_text(json.dumps({
            "dataset": dataset, "model": TINY_MODEL,
            "output": {"uri": out, "storage_options": {"client_kwargs": {"endpoint_url": s3_server}}},
            "resources": {"connect_timeout_s": 1}}))
        proc = _generate_cli(config)
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("segdist generate: error:") and message in last, (name, last)
        assert "Traceback" not in proc.stderr and "rpc_client" not in proc.stderr
        if "://" not in out and name != "no-cluster":
            assert not Path(out, state.STATE_DIR).exists()  # nothing written


def test_worker_resources_follow_the_cluster_and_the_config(ray_cluster, tmp_path):
    from segdist.errors import ConfigError
    from segdist.job.driver import _worker_resources

    data = {"annotations": "a.json", "images": "imgs"}
    cpu = job_config(data, str(tmp_path), num_workers=None, cpus_per_worker=2)
    # The session cluster has no GPU: CPU workers, one by default.
    assert _worker_resources(cpu, 10, embedded=True) == (1, {"num_gpus": 0, "num_cpus": 2.0})
    assert _worker_resources(job_config(data, str(tmp_path), num_workers=3), 2, embedded=True)[0] == 2
    gpu = job_config(data, str(tmp_path), num_workers=4, use_gpus=True, gpus_per_worker=0.5)
    gpu = gpu.model_copy(update={"model": gpu.model.model_copy(update={"device": "auto"})})
    # Joined to a cluster whose GPU nodes are not up yet: GPU workers, left for the autoscaler.
    assert _worker_resources(gpu, 10, embedded=False) == (4, {"num_gpus": 0.5, "num_cpus": 1.0})
    # An embedded cluster never gets a GPU: say so instead of waiting forever.
    with pytest.raises(ConfigError, match="no GPU"):
        _worker_resources(gpu, 10, embedded=True)


def _fake_commit(out: str, index: int, image_ids: list[int], failed: list[int] = ()) -> None:
    name = layout.chunk_name(index)
    Path(out, "parquet").mkdir(parents=True, exist_ok=True)
    Path(out, "parquet", name + ".parquet").write_bytes(b"x")
    rec = state.ChunkRecord(index=index, name=name, image_ids=image_ids, proposals=0,
                            files={"parquet": {"path": f"parquet/{name}.parquet", "bytes": 1}},
                            failed=[{"image_id": i, "file_name": "f", "uri": "u", "reason": "r"}
                                    for i in failed])
    Path(state.chunk_record_uri(out, index)).parent.mkdir(parents=True, exist_ok=True)
    Path(state.chunk_record_uri(out, index)).write_bytes(rec.to_json())


def test_resume_redoes_a_chunk_whose_record_covers_other_images(tmp_path):
    # The dataset behind the same URI changed since the first run: chunk 0 used to hold images
    # [1, 2, 3] (its last chunk was short); the plan now puts [1, 2, 3, 4] in it.
    out = str(tmp_path / "out")
    _fake_commit(out, 0, [1, 2], failed=[3])
    _fake_commit(out, 1, [5, 6, 7, 8])
    plan = [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert sorted(state.scan_committed(out, 2, None).committed) == [0, 1]  # without the plan: by name only
    assert sorted(state.scan_committed(out, 2, None, plan).committed) == [1]
    assert sorted(state.scan_committed(out, 2, None, [[1, 2, 3], [5, 6, 7, 8]]).committed) == [0, 1]
    # The records an image folder's plan read are taken as they are, not read again.
    records = state.read_chunk_records(out, None)
    assert {i: r.covered_ids for i, r in records.items()} == {0: [1, 2, 3], 1: [5, 6, 7, 8]}
    Path(state.chunk_record_uri(out, 1)).unlink()  # the scan would now miss it if it read again
    assert sorted(state.scan_committed(out, 2, None, plan, records=records).committed) == [1]
    assert sorted(state.scan_committed(out, 2, None, plan).committed) == []


def test_resume_refuses_chunks_beyond_the_plan(tmp_path):
    # The dataset shrank: chunk 2's files would stay in the output beside the new plan's chunks.
    out = str(tmp_path / "out")
    for i in range(3):
        _fake_commit(out, i, [4 * i + k for k in range(4)])
    for records in (None, state.read_chunk_records(out, None)):
        with pytest.raises(SegdistError, match="chunk-000002.json.*fewer images.*--overwrite"):
            state.scan_committed(out, 2, None, [[0, 1, 2, 3], [4, 5, 6, 7]], records=records)


def test_overwrite_clears_only_the_jobs_own_files(tmp_path):
    out = tmp_path / "out"
    _fake_commit(str(out), 0, [1, 2])
    (out / "coco-json").mkdir()
    (out / "coco-json" / "chunk-000000.bbox.json").write_text("[]")
    (out / "parquet" / ".tmp-chunk-000001.parquet.abc123").write_bytes(b"x")  # a killed writer's
    (out / "manifest.json").write_text("{}")
    (out / "parquet" / "notes.txt").write_text("mine")  # not the job's
    (out / "coco-json" / "val2017.json").write_text("{}")
    (out / "eval").mkdir()
    (out / "eval" / "eval.json").write_text("{}")

    state.clear_output(str(out), None)

    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert left == ["coco-json/val2017.json", "eval/eval.json", "parquet/notes.txt"]


def test_run_record_settings_hold_no_credentials(tmp_path):
    secret = "wJalrXUtnFEMI-K7MDENG-SECRET"
    cfg = validate(JobConfig, {
        "dataset": {"format": "coco", "annotations": "s3://b/a.json", "images": "s3://b/img",
                    "storage_options": {"secret": secret}},
        "model": {**TINY_MODEL, "weights": "s3://b/w.safetensors",
                  "storage_options": {"key": "AKIA", "secret": secret}},
        "output": {"uri": str(tmp_path / "out"), "storage_options": {"secret": secret}},
    })
    settings = state.output_settings(cfg)
    assert secret not in json.dumps(settings)
    record = state.RunRecord(fingerprint=state.fingerprint(settings), settings=settings)
    state.write_run_record(str(tmp_path / "out"), record, None)
    assert secret not in Path(tmp_path, "out", "_segdist", "run.json").read_text()


def test_embedded_ray_refuses_workers_bigger_than_the_machine(ray_cluster, tmp_path, monkeypatch):
    import ray

    from segdist.errors import ConfigError
    from segdist.job.driver import _worker_resources

    data = {"annotations": "a.json", "images": "imgs"}
    # The session cluster has 4 CPUs: an 8-CPU worker could never be scheduled on it.
    big = job_config(data, str(tmp_path), num_workers=1, cpus_per_worker=8)
    with pytest.raises(ConfigError, match="8 CPUs.*cpus_per_worker.*has 4"):
        _worker_resources(big, 10, embedded=True)
    assert _worker_resources(big, 10, embedded=False)[1]["num_cpus"] == 8  # a cluster may grow
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0, "GPU": 1.0})
    gpu = job_config(data, str(tmp_path), num_workers=None, gpus_per_worker=2)
    gpu = gpu.model_copy(update={"model": gpu.model.model_copy(update={"device": "auto"})})
    with pytest.raises(ConfigError, match="2 GPUs.*gpus_per_worker.*has 1"):
        _worker_resources(gpu, 10, embedded=True)
    half = job_config(data, str(tmp_path), num_workers=None, gpus_per_worker=0.5)
    half = half.model_copy(update={"model": half.model.model_copy(update={"device": "auto"})})
    assert _worker_resources(half, 10, embedded=True) == (2, {"num_gpus": 0.5, "num_cpus": 1.0})
