"""Bad images in a run: ``dataset.max_pixels`` sets the decoder's limit on every worker, and a
refused image is named in the run summary, the manifest and its chunk's Parquet metadata.

Real Ray (the session's local cluster) and the real generator, as tests/test_job.py."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from segdist.imageio import DEFAULT_MAX_PIXELS
from segdist.job.driver import JobResult, run_job
from segdist.proposals import parquet
from segdist.proposals.store import open_proposals
from test_job import CHUNK, job_config, make_data


def _with_limit(cfg, max_pixels: int | None):
    update = {} if max_pixels is None else {"max_pixels": max_pixels}
    return cfg.model_copy(update={"dataset": cfg.dataset.model_copy(update=update)})


def test_dataset_max_pixels_is_the_decoders_limit_in_a_run(ray_cluster, tmp_path):
    data = make_data(str(tmp_path / "data"), 6)
    gt = json.loads(Path(data["annotations"]).read_text())
    images = sorted(gt["images"], key=lambda im: im["id"])
    big = max(images, key=lambda im: im["width"] * im["height"])
    pixels = big["width"] * big["height"]
    refused = [im for im in images if im["width"] * im["height"] > pixels - 1]
    assert refused == [big]  # the synthetic sizes make the largest one unique
    cfg = job_config(data, str(tmp_path / "low"), num_workers=1)

    # A limit one pixel under the largest image: that image is refused, on the worker, naming
    # the field; the rest of the run goes on.
    low = run_job(_with_limit(cfg, pixels - 1), progress=False)
    assert low.complete and low.images_failed == 1 and low.images_written == len(images) - 1
    (bad,) = low.failed_images
    assert bad["image_id"] == big["id"] and bad["file_name"] == big["file_name"]
    assert bad["reason"] == (f"{big['width']} x {big['height']} = {pixels} pixels is over the limit "
                             f"of {pixels - 1} (decompression-bomb guard); raise dataset.max_pixels "
                             "for trusted large images")
    assert f"bad image {big['id']} ({big['file_name']}): {bad['reason']}" in low.summary()
    # The chunk's Parquet file alone says which of its images have no proposals and why.
    index = images.index(big) // CHUNK
    meta = pq.read_metadata(tmp_path / "low" / "parquet" / f"chunk-{index:06d}.parquet").metadata
    assert parquet.failed_from_metadata(meta) == [
        {"id": big["id"], "file_name": big["file_name"], "reason": bad["reason"]}]
    listed = [e["id"] for e in parquet.images_from_metadata(meta, "chunk")]
    assert big["id"] not in listed and len(listed) == len(images[index * CHUNK:(index + 1) * CHUNK]) - 1
    assert big["id"] not in open_proposals(str(tmp_path / "low"))

    # The limit raised to the image's size: it is decoded and gets proposals.
    cfg = job_config(data, str(tmp_path / "high"), num_workers=1)
    high = run_job(_with_limit(cfg, pixels), progress=False)
    assert high.complete and high.images_failed == 0 and high.images_written == len(images)
    assert len(open_proposals(str(tmp_path / "high")).get(big["id"])) > 0
    assert not any(line.startswith("bad image") for line in high.summary().splitlines())


def test_default_limit_keeps_old_run_records_valid():
    """The default limit is left out of the run's settings (records written before the field
    existed still resume); a raised one is part of them (it changes which images get proposals)."""
    from segdist.config import JobConfig, validate
    from segdist.job import state

    raw = {"dataset": {"format": "coco", "annotations": "/a.json", "images": "/img"},
           "output": {"uri": "/out"}}
    default = validate(JobConfig, raw)
    assert default.dataset.max_pixels == DEFAULT_MAX_PIXELS
    assert "max_pixels" not in state.output_settings(default)["dataset"]
    raised = _with_limit(default, 4 * DEFAULT_MAX_PIXELS)
    assert state.output_settings(raised)["dataset"]["max_pixels"] == 4 * DEFAULT_MAX_PIXELS
    assert state.fingerprint(state.output_settings(raised)) != \
        state.fingerprint(state.output_settings(default))


def test_summary_names_the_first_bad_images_and_points_to_the_manifest():
    bad = [{"image_id": i, "file_name": f"img{i}.jpg", "reason": "file not found"} for i in range(5)]
    result = JobResult(complete=True, output_uri="/out", manifest_uri="/out/manifest.json",
                       chunks_total=1, chunks_skipped=0, chunks_written=1, images_total=20,
                       images_written=13, images_failed=7, failed_images=bad)
    lines = result.summary().splitlines()
    assert lines[3:] == [f"bad image {i} (img{i}.jpg): file not found" for i in range(5)] + [
        "... and 2 more bad images: all are listed in the manifest's failed_images"]
