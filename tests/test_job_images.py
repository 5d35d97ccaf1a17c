"""The job over a folder of photos (no annotations) and over an LVIS file, on a real local Ray
cluster, locally and on a real S3-compatible server (moto): coverage, file names in every output,
growing folders, evaluate's refusal and the exports."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import fsspec
import numpy as np
import pytest
from pycocotools.coco import COCO

from segdist.cli import main
from segdist.config import JobConfig, validate
from segdist.data.ids import hashed_id
from segdist.export.boxes import xywh_to_xyxy
from segdist.job.driver import run_job
from segdist.proposals.store import open_proposals
from segdist.proposers.dense import ScalesConfig
from test_image_collections import add_rotated_jpeg, make_folder, upright_size, write_image
from test_job import TINY_MODEL, make_data, mtimes, read_tree

CHUNK = 2


def folder_config(dataset: dict, out: str, out_options: dict | None = None) -> JobConfig:
    return validate(JobConfig, {
        "dataset": dataset, "model": TINY_MODEL,
        "output": {"uri": out, "chunk_size": CHUNK, "formats": ["coco-json", "parquet"],
                   "storage_options": dict(out_options or {})},
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "decode_threads": 2},
    })


@pytest.fixture(scope="module")
def folder_run(s3_server, ray_cluster, tmp_path_factory):
    """A folder run, then one more photo and the same run again (no --overwrite)."""
    tmp = tmp_path_factory.mktemp("folder")
    root = tmp / "photos"
    real = [f for f, what in make_folder(root).items() if what == "image"] + ["rotated.jpg"]
    add_rotated_jpeg(root)
    original = tmp / "original"
    shutil.copytree(root, original)  # the folder as the first run saw it (for the S3 run)
    out = str(tmp / "out")
    dataset = {"format": "images", "images": str(root)}
    cfg = folder_config(dataset, out)

    first = run_job(cfg, progress=False)
    snapshot = SimpleNamespace(
        result=first, tree=read_tree(out), mtimes=mtimes(out),
        manifest=json.loads(Path(out, "manifest.json").read_text()),
        images_json=Path(out, "coco-json", "images.json").read_text())
    write_image(root / "sub" / "new.png", "PNG", h=20, w=28, seed=11)
    second = run_job(cfg, progress=False)
    config = tmp / "photos.yaml"
    config.write_text(json.dumps({"dataset": dataset, "output": {"uri": out}}))
    return SimpleNamespace(root=root, original=original, out=out, real=real, first=snapshot,
                           second=second, config=config, tmp=tmp)


def test_folder_job_covers_every_real_image_once_and_names_it(folder_run):
    run, first = folder_run, folder_run.first
    r = first.result
    # 5 real images + the zero-byte .jpg in 3 chunks of 2; the text files and hidden files are
    # not in the plan at all.
    assert r.complete and r.chunks_total == 3 and r.images_total == 6
    assert r.images_written == 5 and r.images_failed == 1
    manifest = first.manifest
    (bad,) = manifest["failed_images"]
    assert bad["file_name"] == "empty.jpg" and bad["image_id"] == hashed_id("empty.jpg")
    assert bad["reason"] == "empty file (0 bytes)"
    assert manifest["dataset"] == {"name": "photos", "format": "images", "images": 6,
                                   "skipped_files": {"hidden": 2, "not an image extension": 2}}

    # Every real image exactly once, under the id its relative path hashes to (the store is read
    # after the fixture's second run, which added sub/new.png).
    store = open_proposals(run.out)
    seen = [p.image_id for chunk in store.iter_chunks() for p in chunk]
    names = {hashed_id(f): f for f in run.real}
    now = {**names, hashed_id("sub/new.png"): "sub/new.png"}
    assert sorted(seen) == sorted(now) and len(seen) == len(set(seen))
    # Parquet, the manifest and images.json map every id to its relative path.
    assert store.file_names() == now
    assert manifest["file_names"] == {str(i): f for i, f in sorted(
        {**names, hashed_id("empty.jpg"): "empty.jpg"}.items())}
    index = json.loads(first.images_json)["images"]
    assert [im["id"] for im in index] == sorted(names)
    for im in index:
        # Sizes come from the workers' decoding: upright (EXIF applied), never 0.
        assert (im["height"], im["width"]) == upright_size(run.root / im["file_name"])
        p = store.get_by_file_name(im["file_name"])
        assert p.image_id == im["id"] and (p.height, p.width) == (im["height"], im["width"])
        assert len(p) > 0
    rotated = next(im for im in index if im["file_name"] == "rotated.jpg")
    assert (rotated["height"], rotated["width"]) == (32, 24)
    # images.json joins the COCO results to file names with pycocotools alone.
    gt = COCO(os.path.join(run.out, "coco-json", "images.json"))
    res = gt.loadRes(os.path.join(run.out, "coco-json", "chunk-000000.segm.json"))
    for ann in res.anns.values():
        assert gt.imgs[ann["image_id"]]["file_name"] == names[ann["image_id"]]


def test_adding_a_file_computes_only_it(folder_run):
    run, first, second = folder_run, folder_run.first, folder_run.second
    new_id = hashed_id("sub/new.png")
    assert second.complete and second.chunks_total == 4
    assert second.chunks_skipped == 3 and second.chunks_written == 1
    assert second.written_chunks == [3] and second.images_written == 6
    manifest = json.loads(Path(run.out, "manifest.json").read_text())
    assert manifest["timings"]["images_processed_now"] == 1
    # The first run's chunk files and records were not touched.
    after = mtimes(run.out)
    kept = {k: v for k, v in first.mtimes.items()
            if k.startswith(("parquet/", "_segdist/chunks/")) or ".segm." in k or ".bbox." in k}
    assert {k: after[k] for k in kept} == kept
    chunk_files = {k: v for k, v in first.tree.items() if "/chunk-" in k}
    assert {k: v for k, v in read_tree(run.out).items() if k in chunk_files} == chunk_files
    store = open_proposals(run.out)
    chunks = [[p.image_id for p in c] for c in store.iter_chunks()]
    assert chunks[-1] == [new_id] and sum(map(len, chunks)) == 6
    assert store.get_by_file_name("sub/new.png").image_id == new_id
    assert manifest["file_names"][str(new_id)] == "sub/new.png"
    index = json.loads(Path(run.out, "coco-json", "images.json").read_text())["images"]
    assert {im["file_name"] for im in index} == {*run.real, "sub/new.png"}


def test_the_same_folder_on_s3(folder_run, s3_bucket):
    bucket, opts = s3_bucket
    opts = {**opts, "key": "testing", "secret": "testing"}  # the Ray worker reads S3 too
    fs = fsspec.filesystem("s3", **opts)
    for path in sorted(folder_run.original.rglob("*")):
        if path.is_file():
            rel = path.relative_to(folder_run.original).as_posix()
            fs.pipe_file(f"{bucket}/photos/{rel}", path.read_bytes())
    out = f"s3://{bucket}/out"
    result = run_job(folder_config({"format": "images", "images": f"s3://{bucket}/photos",
                                    "storage_options": opts}, out, opts), progress=False)
    assert result.complete and result.images_written == 5 and result.images_failed == 1
    # The same ids, file names, chunks and proposals as the local run: byte for byte.
    assert read_tree(out, opts) == folder_run.first.tree
    manifest = json.loads(fs.cat_file(f"{bucket}/out/manifest.json"))
    assert manifest["file_names"] == folder_run.first.manifest["file_names"]
    assert manifest["failed_images"][0]["uri"] == f"s3://{bucket}/photos/empty.jpg"


def test_evaluate_on_a_folder_run_exits_2_with_one_line(folder_run, capsys):
    for dataset in (str(folder_run.config), str(folder_run.tmp / "any-instances.json")):
        rc = main(["evaluate", "--proposals", folder_run.out, "--dataset", dataset])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err
        (line,) = err.strip().splitlines()
        assert "no ground truth to evaluate against" in line and "dataset.format 'images'" in line
    assert not Path(folder_run.out, "eval").exists()


def test_detectron2_and_mmdet_exports_of_a_folder_run(folder_run, capsys):
    run = folder_run
    store = open_proposals(run.out)
    names = store.file_names()
    d2 = str(run.tmp / "exports" / "d2.pkl")
    assert main(["export", "detectron2", "--proposals", run.out, "--out", d2]) == 0
    d = pickle.load(open(d2, "rb"))
    # Detectron2's load_proposals_into_dataset contract, keyed by the relative file names.
    assert set(d) == {"ids", "boxes", "objectness_logits", "bbox_mode"} and d["bbox_mode"] == 0
    assert d["ids"] == [names[i] for i in store.image_ids()]
    for name, boxes, logits in zip(d["ids"], d["boxes"], d["objectness_logits"]):
        p = store.get_by_file_name(name)
        assert boxes.dtype == np.float32 and logits.dtype == np.float32
        np.testing.assert_array_equal(boxes, xywh_to_xyxy(p.boxes))
        np.testing.assert_array_equal(logits.argsort(kind="stable")[::-1], np.arange(len(p)))
    assert main(["export", "detectron2", "--proposals", run.out, "--out", d2, "--ids",
                 "image-id"]) == 0
    assert pickle.load(open(d2, "rb"))["ids"] == store.image_ids()

    mm = str(run.tmp / "exports" / "mm.pkl")
    assert main(["export", "mmdet", "--proposals", run.out, "--out", mm, "--dataset",
                 str(run.config)]) == 0
    m = pickle.load(open(mm, "rb"))
    # One entry per dataset image (the zero-byte one too, empty), "<parent_dir>/<file_name>".
    assert sorted(m) == sorted(["photos/a.jpg", "sub/b.png", "deeper/c.webp", "deeper/D.JPEG",
                                "photos/empty.jpg", "photos/rotated.jpg", "sub/new.png"])
    assert m["photos/empty.jpg"]["bboxes"].shape == (0, 4)
    for key, name in (("sub/b.png", "sub/b.png"), ("deeper/D.JPEG", "sub/deeper/D.JPEG")):
        p = store.get_by_file_name(name)
        np.testing.assert_array_equal(m[key]["bboxes"], xywh_to_xyxy(p.boxes))
        np.testing.assert_array_equal(m[key]["scores"], p.scores)
    capsys.readouterr()


def test_lvis_file_generates_and_evaluates_as_the_coco_file(ray_cluster, tmp_path, capsys):
    # The synthetic set as COCO, and as LVIS: coco_url instead of file_name, no iscrowd (so no
    # crowd regions: LVIS has none), LVIS's per-image category lists.
    coco = make_data(str(tmp_path / "data"), 4)
    gt = json.loads(Path(coco["annotations"]).read_text())
    gt["annotations"] = [a for a in gt["annotations"] if not a["iscrowd"]]
    Path(coco["annotations"]).write_text(json.dumps(gt))
    lvis = {**gt, "images": [
        {"id": im["id"], "height": im["height"], "width": im["width"],
         "coco_url": f"http://images.cocodataset.org/images/{im['file_name']}",
         "neg_category_ids": [4], "not_exhaustive_category_ids": []} for im in gt["images"]],
        "annotations": [{k: v for k, v in a.items() if k != "iscrowd"}
                        for a in gt["annotations"]]}
    lvis_path = tmp_path / "data" / "annotations" / "lvis_v1_val.json"
    lvis_path.write_text(json.dumps(lvis))
    runs = {"coco": (coco, tmp_path / "coco-run"),
            "lvis": ({"format": "lvis", "annotations": str(lvis_path),
                      "images": str(tmp_path / "data")}, tmp_path / "lvis-run")}
    metrics = {}
    for name, (dataset, out) in runs.items():
        cfg = folder_config(dataset, str(out))
        # An upsampled scale and 100 proposals: random weights then recall some objects (the tiny
        # model's 12 proposals at scales <= 1 recall none, and 0 == 0 would prove nothing).
        cfg = cfg.model_copy(update={
            "output": cfg.output.model_copy(update={"chunk_size": 4}),
            "model": cfg.model.model_copy(update={"proposals": 100, "scales": ScalesConfig(
                min=-1.0, max=1.0, step=1.0)})})
        assert run_job(cfg, progress=False).complete
        config = tmp_path / f"{name}.yaml"
        config.write_text(json.dumps({"dataset": dataset, "output": {"uri": str(out)}}))
        assert main(["evaluate", "--proposals", str(out), "--dataset", str(config),
                     "--no-progress"]) == 0
        doc = json.loads((out / "eval" / "eval.json").read_text())
        assert doc["dataset"]["format"] == name and doc["dataset"]["images"] == 4
        metrics[name] = {t: doc["runs"][0][t]["metrics"] for t in ("segm", "bbox")}
    capsys.readouterr()
    assert metrics["lvis"] == metrics["coco"]
    assert 0 < metrics["coco"]["segm"]["AR@100"] < 1 and 0 < metrics["coco"]["bbox"]["AR@100"] < 1
    a, b = open_proposals(str(runs["coco"][1])), open_proposals(str(runs["lvis"][1]))
    assert a.image_ids() == b.image_ids() and all(a.get(i).equals(b.get(i)) for i in a.image_ids())
    assert b.file_names()[a.image_ids()[0]].startswith("images/")  # split-folder layout
