"""Exports (Detectron2, MMDetection 3.x, original layout), read back following each tool's
documented contract, streamed with bounded memory, and through the CLI (also on s3)."""

from __future__ import annotations

import gc
import json
import os
import pickle
import tracemalloc

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from segdist.cli import main
from segdist.data.records import Dataset, ImageRecord
from segdist.errors import SegdistError
from segdist.export.boxes import logit, xywh_to_xyxy
from segdist.export.detectron2 import export_detectron2
from segdist.export.mmdet import export_mmdet, mmdet_key
from segdist.export.original import export_original
from segdist.proposals import layout
from segdist.proposals.store import open_proposals
from segdist.proposals.types import ImageProposals


def make_proposals(rng, image_id, h, w, n, masks=True):
    m = np.zeros((h, w, n), np.uint8, order="F")
    for k in range(n):
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        m[y0:rng.integers(y0 + 1, h + 1), x0:rng.integers(x0 + 1, w + 1), k] = 1
    rles = mask_utils.encode(m) if n else []
    scores = np.sort(rng.random(n).astype(np.float32))[::-1]
    return ImageProposals(image_id, h, w, scores, mask_utils.toBbox(rles) if n else np.zeros((0, 4)),
                          [r["counts"] for r in rles] if masks else None, "sharpmask")


@pytest.fixture
def run(tmp_path):
    """A run of 3 Parquet + COCO-JSON chunks (7 images, one without proposals, one with extreme
    scores 1.0 / 0.0 and a float32 neighbour of 1.0)."""
    rng = np.random.default_rng(20)
    extreme = make_proposals(rng, 30, 20, 20, 4)
    extreme.scores = np.asarray([1.0, np.nextafter(np.float32(1), np.float32(0)), 0.5, 0.0],
                                np.float32)
    chunks = [
        [make_proposals(rng, 3, 30, 40, 25), make_proposals(rng, 5, 12, 50, 8)],
        [ImageProposals(8, 10, 10, [], np.zeros((0, 4)), [], "sharpmask"),
         make_proposals(rng, 12, 64, 48, 300)],
        [make_proposals(rng, 20, 9, 9, 3), extreme, make_proposals(rng, 31, 40, 30, 40)],
    ]
    out = str(tmp_path / "run")
    for i, c in enumerate(chunks):
        layout.write_chunk(out, i, c, ["coco-json", "parquet"])
    return out, [p for c in chunks for p in c]


def dataset_for(ids, root="/data/coco"):
    images = [ImageRecord(i, f"{i:012d}.jpg", f"{root}/val2017/{i:012d}.jpg", 10, 10) for i in ids]
    gt = {"images": [{"id": i, "file_name": f"{i:012d}.jpg", "height": 10, "width": 10}
                     for i in ids], "annotations": [], "categories": [{"id": 1, "name": "x"}]}
    return Dataset("val2017", images, gt)


def test_logit_is_finite_and_order_preserving():
    s = np.asarray([1.0, np.nextafter(np.float32(1), np.float32(0)), 0.75, 0.5, 1e-30, 2 ** -149,
                    0.0], np.float32)
    z = logit(s)
    assert z.dtype == np.float32 and np.isfinite(z).all()
    assert (np.diff(z) < 0).all()  # strictly decreasing, like the scores
    np.testing.assert_allclose(1 / (1 + np.exp(-z[2:4].astype(np.float64))), s[2:4], rtol=1e-6)


def test_logit_keeps_distinct_scores_distinct_and_ties_tied():
    # Below 0.25, neighbouring float32 scores can round to the same float32 logit (e.g. 0.24999511
    # and the next float32 below it); Detectron2's re-sort would then be free to swap them.
    s = np.unique(np.random.default_rng(0).random(200_000).astype(np.float32) / 4)[::-1]
    s = np.concatenate([s, [s[-1]], np.nextafter(s[-1:], np.float32(0))]).astype(np.float32)
    collide = [np.float32(0.24999511), np.nextafter(np.float32(0.24999511), np.float32(0))]
    s = np.sort(np.concatenate([collide, s]).astype(np.float32))[::-1]
    z = logit(s)
    assert z.dtype == np.float32
    strict = s[1:] < s[:-1]
    assert (~strict).sum() == 1  # one tie
    assert (z[1:][strict] < z[:-1][strict]).all()
    assert (z[1:][~strict] == z[:-1][~strict]).all()  # equal scores, equal logits
    np.testing.assert_allclose(1 / (1 + np.exp(-z.astype(np.float64))), s, rtol=1e-6)
    assert logit(np.zeros(0, np.float32)).shape == (0,)


def test_detectron2_round_trip(run, tmp_path):
    out, props = run
    store = open_proposals(out)
    dest = str(tmp_path / "d2" / "proposals.pkl")
    info = export_detectron2(store, dest, dataset_ids=[3, 5, 8, 99])
    assert info["images"] == 8 and info["proposals"] == sum(len(p) for p in props)
    with open(dest, "rb") as f:
        d = pickle.load(f)
    # The contract of detectron2.data.build.load_proposals_into_dataset:
    assert set(d) == {"ids", "boxes", "objectness_logits", "bbox_mode"}
    assert d["bbox_mode"] == 0  # BoxMode.XYXY_ABS
    assert d["ids"] == [3, 5, 8, 12, 20, 30, 31, 99]
    assert len(d["boxes"]) == len(d["objectness_logits"]) == len(d["ids"])
    by_id = {p.image_id: p for p in props}
    for image_id, boxes, logits in zip(d["ids"], d["boxes"], d["objectness_logits"]):
        assert isinstance(boxes, np.ndarray) and boxes.dtype == np.float32
        assert isinstance(logits, np.ndarray) and logits.dtype == np.float32
        p = by_id.get(image_id)
        n = len(p) if p is not None else 0
        assert boxes.shape == (n, 4) and logits.shape == (n,)
        if not n:
            continue
        np.testing.assert_array_equal(boxes[:, :2], p.boxes[:, :2])
        np.testing.assert_array_equal(boxes[:, 2:], p.boxes[:, :2] + p.boxes[:, 2:])  # x2 = x + w
        assert np.isfinite(logits).all()
        # Detectron2 re-sorts each image: inds = objectness_logits.argsort()[::-1].
        np.testing.assert_array_equal(logits.argsort(kind="stable")[::-1], np.arange(n))
        inner = (p.scores > 0) & (p.scores < 1)
        np.testing.assert_allclose(1 / (1 + np.exp(-logits[inner].astype(np.float64))),
                                   p.scores[inner], rtol=1e-6)


def test_detectron2_top_k_and_coco_json_source(run, tmp_path):
    out, props = run
    dest = str(tmp_path / "top.pkl")
    export_detectron2(open_proposals(os.path.join(out, "coco-json")), dest, top_k=10)
    d = pickle.load(open(dest, "rb"))
    assert d["ids"] == [p.image_id for p in props if len(p)]  # COCO-JSON has no empty images
    want = {p.image_id: xywh_to_xyxy(p.boxes[:10]) for p in props}
    for i, b in zip(d["ids"], d["boxes"]):
        np.testing.assert_array_equal(b, want[i])


def test_mmdet_round_trip(run, tmp_path):
    out, props = run
    ds = dataset_for([3, 5, 8, 12, 20, 30, 31, 40])
    dest = str(tmp_path / "mm" / "proposals.pkl")
    info = export_mmdet(open_proposals(out), dest, ds, top_k=100)
    assert info["images"] == 8
    d = pickle.load(open(dest, "rb"))
    # BaseDetDataset.load_proposals: len(data_list) == len(proposals), key from img_path.
    assert len(d) == len(ds)
    assert set(d) == {f"val2017/{i:012d}.jpg" for i in [3, 5, 8, 12, 20, 30, 31, 40]}
    by_id = {p.image_id: p for p in props}
    for r in ds.images:
        v = d[mmdet_key(r)]
        assert set(v) == {"bboxes", "scores"}
        assert v["bboxes"].dtype == np.float32 and v["scores"].dtype == np.float32
        p = by_id.get(r.image_id)
        if p is None:
            assert v["bboxes"].shape == (0, 4) and v["scores"].shape == (0,)
            continue
        p = p.top(100)
        np.testing.assert_array_equal(v["bboxes"], xywh_to_xyxy(p.boxes))
        np.testing.assert_array_equal(v["scores"], p.scores)
        assert (np.diff(v["scores"]) <= 0).all()


def test_mmdet_key_and_wrong_dataset(run, tmp_path):
    r = ImageRecord(1, "a.jpg", "s3://bucket/coco/train2017/a.jpg", 1, 1)
    assert mmdet_key(r) == "train2017/a.jpg"
    out, _ = run
    with pytest.raises(SegdistError, match="not in dataset"):
        export_mmdet(open_proposals(out), str(tmp_path / "x.pkl"), dataset_for([3, 5]))
    assert not os.path.exists(tmp_path / "x.pkl")


def test_original_layout_round_trip(run, tmp_path):
    out, props = run
    dest = str(tmp_path / "orig")
    info = export_original(open_proposals(out), dest, dataset_ids=[1], per_file=3)
    # Positions count dataset image 1 (no proposals) and image 8 (none either): 8 images.
    assert info["images"] == 8
    assert sorted(os.listdir(os.path.join(dest, "segm"))) == sorted(
        ["props-1-3.json", "props-4-6.json", "props-7-8.json"])
    assert sorted(os.listdir(os.path.join(dest, "bbox"))) == sorted(os.listdir(
        os.path.join(dest, "segm")))
    first = json.load(open(os.path.join(dest, "segm", "props-1-3.json")))
    assert {r["image_id"] for r in first} == {3, 5}  # positions 1..3 = ids 1, 3, 5
    assert all("bbox" not in r and r["category_id"] == 1 for r in first)
    back = open_proposals(dest, model="sharpmask")
    assert back.kind == "original"
    for p in props:
        if len(p):
            assert p.equals(back.get(p.image_id))


def test_box_only_original_export(tmp_path):
    rng = np.random.default_rng(21)
    props = [make_proposals(rng, i, 16, 16, 5, masks=False) for i in (1, 2, 3)]
    layout.write_chunk(str(tmp_path / "run"), 0, props, ["parquet"])
    info = export_original(open_proposals(str(tmp_path / "run")), str(tmp_path / "o"), per_file=2)
    assert [os.path.relpath(f, tmp_path / "o") for f in info["files"]] == [
        "bbox/props-1-2.json", "bbox/props-3-3.json"]
    back = open_proposals(str(tmp_path / "o"))
    assert np.array_equal(back.get(3).boxes, props[2].boxes) and back.get(3).counts is None


def _peak_export_memory(tmp_path, n_chunks, fmt):
    rng = np.random.default_rng(22)
    out = str(tmp_path / f"run{n_chunks}")
    ids = []
    for i in range(n_chunks):
        chunk = []
        for j in range(20):
            image_id = i * 20 + j
            ids.append(image_id)
            scores = np.sort(rng.random(1000).astype(np.float32))[::-1]
            chunk.append(ImageProposals(image_id, 100, 100, scores, rng.random((1000, 4)) * 50,
                                        None, "maskrcnn-rpn"))
        layout.write_chunk(out, i, chunk, ["parquet"])
        del chunk
    store = open_proposals(out)
    ds = dataset_for(ids)
    gc.collect()
    tracemalloc.start()
    try:
        if fmt == "detectron2":
            export_detectron2(store, str(tmp_path / f"d{n_chunks}.pkl"))
        else:
            export_mmdet(store, str(tmp_path / f"m{n_chunks}.pkl"), ds)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("fmt", ["detectron2", "mmdet"])
def test_exports_stream_with_bounded_memory(tmp_path, fmt):
    """4x the images must not mean 4x the peak memory: the export holds one chunk, not the run."""
    small = _peak_export_memory(tmp_path, 2, fmt)
    large = _peak_export_memory(tmp_path, 8, fmt)
    run_bytes = 8 * 20 * 1000 * 20  # boxes (16 B) + logits/scores (4 B) of the large run
    assert large < small + run_bytes / 4, (small, large)


def test_cli_export_on_s3(run, s3_bucket, tmp_path, capsys):
    bucket, so = s3_bucket
    out, props = run
    # Copy the run to s3 through the writer, then export from s3 to s3.
    src = f"s3://{bucket}/run"
    store = open_proposals(out)
    for i, chunk in enumerate(store.iter_chunks()):
        layout.write_chunk(src, i, chunk, ["parquet"], storage_options=so)
    opts = json.dumps(so)
    dest = f"s3://{bucket}/exports/d2.pkl"
    assert main(["export", "detectron2", "--proposals", src, "--out", dest,
                 "--storage-options", opts, "--top-k", "5"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["images"] == 7 and printed["proposals"] == sum(min(len(p), 5) for p in props)
    from segdist.storage import read_bytes

    d = pickle.loads(read_bytes(dest, so))
    assert d["ids"] == [p.image_id for p in props] and max(len(b) for b in d["boxes"]) == 5

    ann = tmp_path / "instances_val2017.json"
    ann.write_text(json.dumps(dataset_for([p.image_id for p in props]).coco_gt))
    dest_mm = str(tmp_path / "mm.pkl")
    assert main(["export", "mmdet", "--proposals", src, "--out", dest_mm, "--storage-options", opts,
                 "--annotations", str(ann), "--images", "/data/coco/val2017"]) == 0
    assert len(pickle.load(open(dest_mm, "rb"))) == 7

    assert main(["export", "mmdet", "--proposals", src, "--out", dest_mm,
                 "--storage-options", opts]) == 2
    assert "needs the dataset" in capsys.readouterr().err
    assert main(["export", "original", "--proposals", str(tmp_path / "none"), "--out",
                 str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_original_with_dataset_config(run, tmp_path, capsys):
    out, props = run
    ann = tmp_path / "instances_val2017.json"
    ids = [1] + [p.image_id for p in props]
    ann.write_text(json.dumps(dataset_for(ids).coco_gt))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"dataset:\n  annotations: {ann}\n  images: /data/coco/val2017\n"
                   "output:\n  uri: /unused\n")
    dest = str(tmp_path / "orig")
    assert main(["export", "original", "--proposals", out, "--out", dest, "--dataset", str(cfg),
                 "--set", "limit=4", "--per-file", "2", "--gzip"]) == 0
    # limit=4 keeps dataset ids 1, 3, 5, 8; proposals of 12.. are still exported after them.
    assert sorted(os.listdir(os.path.join(dest, "segm"))) == [
        "props-1-2.json.gz", "props-3-4.json.gz", "props-5-6.json.gz", "props-7-8.json.gz"]
    back = open_proposals(dest, model="sharpmask")
    assert all(p.equals(back.get(p.image_id)) for p in props if len(p))
    assert main(["export", "original", "--proposals", out, "--out", dest, "--dataset",
                 str(cfg), "--set", "limit=0"]) == 2
    assert "limit" in capsys.readouterr().err
