"""The PyTorch loader over proposals (local and s3 with DataLoader workers).
``python tests/test_loader.py --bench`` runs the random-access vs sequential reading benchmark
(not part of the suite). The Fast R-CNN example that uses it: tests/test_examples.py."""

from __future__ import annotations

import json
import pickle
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from segdist.data.records import Dataset, ImageRecord
from segdist.errors import SegdistError
from segdist.export.boxes import xywh_to_xyxy
from segdist.export.loader import LazyMasks, ProposalDataset, ProposalFilter, collate
from segdist.proposals import layout
from segdist.proposals.store import open_proposals
from segdist.proposals.types import ImageProposals

COLOURS = {1: (220, 40, 40), 2: (40, 60, 220)}  # category 1: red rectangles, 2: blue ellipses


def synthetic_set(root, n_images=8, seed=0, n_props=60):
    """Images with red rectangles (class 1) and blue ellipses (class 2) on noise, their COCO GT
    (one crowd region), and proposals: jittered GT boxes scored high, random boxes scored low,
    each with the box's rectangle as its mask."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    records, images, anns, props = [], [], [], []
    for image_id in range(1, n_images + 1):
        h, w = int(rng.integers(56, 80)), int(rng.integers(56, 96))
        img = rng.integers(90, 140, (h, w, 3)).astype(np.uint8)
        objs = []
        for _ in range(int(rng.integers(1, 4))):
            cat = int(rng.integers(1, 3))
            bh, bw = int(rng.integers(12, h // 2)), int(rng.integers(12, w // 2))
            y, x = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
            m = np.zeros((h, w), np.uint8)
            if cat == 1:
                m[y:y + bh, x:x + bw] = 1
            else:
                yy, xx = np.mgrid[:h, :w]
                m[((yy - y - bh / 2) / (bh / 2)) ** 2 + ((xx - x - bw / 2) / (bw / 2)) ** 2 <= 1] = 1
            img[m.astype(bool)] = COLOURS[cat]
            objs.append((cat, m))
        name = f"{image_id:06d}.png"
        Image.fromarray(img).save(root / name)
        records.append(ImageRecord(image_id, name, str(root / name), h, w))
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        for k, (cat, m) in enumerate(objs):
            rle = mask_utils.encode(np.asfortranarray(m))
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat,
                         "iscrowd": int(image_id == 2 and k == 0),
                         "bbox": mask_utils.toBbox(rle).tolist(), "area": float(mask_utils.area(rle)),
                         "segmentation": {"size": [h, w], "counts": rle["counts"].decode()}})
        boxes = []
        for cat, m in objs:
            x, y, bw, bh = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(m)))
            for _ in range(4):
                j = rng.normal(0, 0.08, 4) * [bw, bh, bw, bh]
                boxes.append([x + j[0], y + j[1], bw + j[2], bh + j[3]])
        while len(boxes) < n_props:
            bw, bh = rng.uniform(4, w / 2), rng.uniform(4, h / 2)
            boxes.append([rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh])
        boxes = np.clip(np.asarray(boxes), 0, None)
        boxes[:, 2] = np.minimum(boxes[:, 2], w - boxes[:, 0])
        boxes[:, 3] = np.minimum(boxes[:, 3], h - boxes[:, 1])
        n_true = 4 * len(objs)
        scores = np.concatenate([rng.uniform(0.6, 1.0, n_true), rng.uniform(0, 0.6, n_props - n_true)])
        order = np.argsort(-scores, kind="stable")
        masks = np.zeros((h, w, n_props), np.uint8, order="F")
        for k, (x, y, bw, bh) in enumerate(boxes[order]):
            masks[int(y):int(np.ceil(y + bh)), int(x):int(np.ceil(x + bw)), k] = 1
        rles = mask_utils.encode(masks)
        props.append(ImageProposals(image_id, h, w, scores[order], mask_utils.toBbox(rles),
                                    [r["counts"] for r in rles], "sharpmask"))
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": 1, "name": "rectangle"}, {"id": 2, "name": "ellipse"}]}
    return Dataset("synthetic", records, gt), props


def reference_filter(p, top_k, min_size, thr):
    """The filter as a plain loop over proposals (rank order)."""
    kept = [i for i in range(len(p))
            if p.scores[i] >= thr and p.boxes[i, 2] >= min_size and p.boxes[i, 3] >= min_size]
    return kept if top_k is None else kept[:top_k]


def test_samples_local(tmp_path):
    dataset, props = synthetic_set(tmp_path / "images", n_images=4)
    out = str(tmp_path / "run")
    layout.write_chunk(out, 0, props[:2], ["parquet"])
    layout.write_chunk(out, 1, props[2:], ["parquet"])
    data = ProposalDataset(out, dataset, top_k=20, min_size=5)
    assert len(data) == 4 and data.image_ids == [1, 2, 3, 4]
    s = data[data.index_of(3)]
    rec = dataset.by_id()[3]
    assert s["image_id"] == 3 and s["uri"] == rec.uri
    assert s["image"].dtype == torch.uint8 and tuple(s["image"].shape) == (3, rec.height, rec.width)
    np.testing.assert_array_equal(s["image"].permute(1, 2, 0).numpy(),
                                  np.asarray(Image.open(rec.uri).convert("RGB")))
    p = props[2]
    keep = reference_filter(p, 20, 5, 0.0)
    pr = s["proposals"]
    assert pr["boxes"].dtype == torch.float32 and tuple(pr["boxes"].shape) == (len(keep), 4)
    np.testing.assert_array_equal(pr["boxes"].numpy(), xywh_to_xyxy(p.boxes[keep]))
    np.testing.assert_array_equal(pr["scores"].numpy(), p.scores[keep])
    masks = pr["masks"].decode()
    assert masks.dtype == torch.bool and tuple(masks.shape) == (len(keep), rec.height, rec.width)
    ref = mask_utils.decode([{"size": [p.height, p.width], "counts": p.counts[i]} for i in keep])
    np.testing.assert_array_equal(masks.numpy(), ref.transpose(2, 0, 1).astype(bool))
    assert torch.equal(pr["masks"][1], masks[1])
    # GT: xyxy boxes, category ids, crowd flags, masks decoded on request.
    anns = [a for a in dataset.coco_gt["annotations"] if a["image_id"] == 3]
    gt = s["gt"]
    np.testing.assert_array_equal(gt["boxes"].numpy(), xywh_to_xyxy([a["bbox"] for a in anns]))
    assert gt["labels"].tolist() == [a["category_id"] for a in anns]
    gm = gt["masks"].decode()
    assert tuple(gm.shape) == (len(anns), rec.height, rec.width)
    assert [int(m.sum()) for m in gm] == [int(a["area"]) for a in anns]
    assert data[data.index_of(2)]["gt"]["iscrowd"].tolist()[0] is True


def test_filters_match_a_plain_loop():
    rng = np.random.default_rng(1)
    p = ImageProposals(1, 50, 50, np.sort(rng.random(200).astype(np.float32))[::-1],
                       rng.uniform(0, 20, (200, 4)), None, "m")
    for top_k, min_size, thr in [(None, 0, 0), (10, 0, 0), (50, 6.0, 0.3), (0, 0, 0), (500, 19, 0.9)]:
        got = ProposalFilter(top_k, min_size, thr).apply(p)
        keep = reference_filter(p, top_k, min_size, thr)
        np.testing.assert_array_equal(got.scores, p.scores[keep])
        np.testing.assert_array_equal(got.boxes, p.boxes[keep])
    with pytest.raises(SegdistError, match="min_size"):
        ProposalFilter(min_size=-1)


def test_lazy_masks_from_polygons_and_rle():
    poly = [[2.0, 2.0, 8.0, 2.0, 8.0, 6.0, 2.0, 6.0]]
    full = np.ones((10, 12, 1), np.uint8, order="F")
    lm = LazyMasks([poly, mask_utils.encode(full)[0]["counts"], []], 10, 12)
    m = lm.decode()
    assert tuple(m.shape) == (3, 10, 12)
    assert m[0, 3, 4] and not m[0, 8, 10]
    assert m[1].all() and not m[2].any()
    assert LazyMasks([], 4, 5).decode().shape == (0, 4, 5)
    assert pickle.loads(pickle.dumps(lm)).decode().equal(m)


def test_missing_images_policy(tmp_path):
    dataset, props = synthetic_set(tmp_path / "images", n_images=3, n_props=12)
    out = str(tmp_path / "run")
    layout.write_chunk(out, 0, props[:2], ["parquet"])
    with pytest.raises(SegdistError, match="1 of 3 images"):
        ProposalDataset(out, dataset)
    assert ProposalDataset(out, dataset, missing="skip").image_ids == [1, 2]
    data = ProposalDataset(out, dataset, missing="empty", load_images=False)
    s = data[2]
    assert s["image_id"] == 3 and s["proposals"]["boxes"].shape == (0, 4) and "image" not in s


def test_folder_dataset_items_have_the_true_image_size(tmp_path):
    """An image folder lists no sizes (records say 0 x 0): each item's height/width are the sizes
    the written proposals carry (Parquet metadata, COCO-JSON RLE size), or, where the proposals
    carry none (box-only COCO results), the decoded image's; GT masks take the same size."""
    from segdist.data.images import load_images
    from segdist.data.ids import hashed_id

    root = tmp_path / "photos"
    root.mkdir()
    sizes = {"a.png": (20, 36), "sub/b.png": (44, 18), "sub/c.png": (31, 31)}
    rng = np.random.default_rng(5)
    for name, (h, w) in sizes.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    dataset = load_images(str(root))
    assert {r.file_name: (r.height, r.width) for r in dataset.images} == {n: (0, 0) for n in sizes}
    truth = {hashed_id(n): s for n, s in sizes.items()}

    def written(masks):  # what a worker writes: the decoded size, two proposals per image
        out = []
        for image_id, (h, w) in truth.items():
            m = np.zeros((h, w, 2), np.uint8, order="F")
            m[2:9, 3:12, 0], m[:, :5, 1] = 1, 1
            rles = mask_utils.encode(m)
            out.append(ImageProposals(image_id, h, w, np.float32([0.9, 0.4]),
                                      mask_utils.toBbox(rles),
                                      [r["counts"] for r in rles] if masks else None, "test"))
        return out

    layout.write_chunk(str(tmp_path / "masks"), 0, written(True), ["parquet", "coco-json"])
    layout.write_chunk(str(tmp_path / "boxes"), 0, written(False), ["coco-json"])
    for uri in (str(tmp_path / "masks"), str(tmp_path / "masks" / "coco-json")):
        data = ProposalDataset(uri, dataset, load_images=False)
        for s in map(data.__getitem__, range(len(data))):
            assert (s["height"], s["width"]) == truth[s["image_id"]], uri
            m = s["proposals"]["masks"].decode()
            assert tuple(m.shape) == (2, *truth[s["image_id"]]) and m[1, :, :5].all()
            assert tuple(s["gt"]["masks"].decode().shape) == (0, *truth[s["image_id"]])
    # Box-only COCO results carry no size: the decoded image gives it (0 x 0 without images).
    boxes = str(tmp_path / "boxes" / "coco-json")
    assert open_proposals(boxes).get(hashed_id("a.png")).height == 0
    data = ProposalDataset(boxes, dataset, load_images=True)
    for s in map(data.__getitem__, range(len(data))):
        assert (s["height"], s["width"]) == truth[s["image_id"]] == tuple(s["image"].shape[1:])
    data = ProposalDataset(boxes, dataset, load_images=False)
    assert {(data[i]["height"], data[i]["width"]) for i in range(len(data))} == {(0, 0)}


def test_dataloader_workers_from_s3_match_reading_api(tmp_path, s3_bucket):
    bucket, so = s3_bucket
    dataset, props = synthetic_set(tmp_path / "images", n_images=10, n_props=40)
    out = f"s3://{bucket}/run"
    for i in range(0, 10, 4):
        layout.write_chunk(out, i // 4, props[i:i + 4], ["parquet"], storage_options=so,
                           row_group_rows=40)
    data = ProposalDataset(out, dataset, top_k=25, score_threshold=0.1, load_images=True,
                           storage_options=so)
    pickle.loads(pickle.dumps(data))  # what a spawn-started worker receives
    rng = np.random.default_rng(3)
    ids = [int(i) for i in rng.choice(data.image_ids, 7, replace=False)]
    loader = torch.utils.data.DataLoader(
        data, batch_size=3, num_workers=2, collate_fn=collate,
        sampler=[data.index_of(i) for i in ids])
    seen = []
    reference = open_proposals(out, so)  # the reading API, in this process
    for batch in loader:
        for s in batch:
            seen.append(s["image_id"])
            p = ProposalFilter(25, 0.0, 0.1).apply(reference.get(s["image_id"]))
            assert len(p) > 0
            np.testing.assert_array_equal(s["proposals"]["boxes"].numpy(), xywh_to_xyxy(p.boxes))
            np.testing.assert_array_equal(s["proposals"]["scores"].numpy(), p.scores)
            assert s["proposals"]["masks"].items == p.counts
            assert s["image"].shape[1:] == (p.height, p.width)
    assert seen == ids


def gt_jitter_proposals(dataset, rng, n_props=60):
    """Box-only proposals from a dataset's GT: 4 jittered copies of every GT box scored in
    [0.6, 1), then random boxes scored below 0.6 (a stand-in for a trained proposal model)."""
    by_image = {}
    for a in dataset.coco_gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["bbox"])
    out = []
    for r in dataset.images:
        boxes = []
        for x, y, bw, bh in by_image.get(r.image_id, []):
            for _ in range(4):
                j = rng.normal(0, 0.08, 4) * [bw, bh, bw, bh]
                boxes.append([x + j[0], y + j[1], bw + j[2], bh + j[3]])
        n_true = len(boxes)
        while len(boxes) < max(n_props, n_true):
            bw, bh = rng.uniform(4, r.width / 2), rng.uniform(4, r.height / 2)
            boxes.append([rng.uniform(0, r.width - bw), rng.uniform(0, r.height - bh), bw, bh])
        scores = np.concatenate([rng.uniform(0.6, 1, n_true), rng.uniform(0, 0.6, len(boxes) - n_true)])
        order = np.argsort(-scores, kind="stable")
        out.append(ImageProposals(r.image_id, r.height, r.width, scores[order],
                                  np.asarray(boxes)[order], None, "gt-jitter"))
    return out


def test_downstream_doc_snippet(tmp_path):
    """The loader block of docs/downstream.md runs as written."""
    import os
    import re

    dataset, props = synthetic_set(tmp_path / "images", n_images=4, n_props=30)
    out = str(tmp_path / "run")
    layout.write_chunk(out, 0, props, ["parquet", "coco-json"])
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(dataset.coco_gt))
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "downstream.md")).read()
    block = re.findall(r"```python\n(.*?)```", doc, flags=re.S)[0]
    ns = {"OUT": out, "ANNOTATIONS": str(ann), "IMAGES": str(tmp_path / "images")}
    exec(compile(block, "docs/downstream.md", "exec"), ns)
    assert ns["masks"].shape[0] == 1 and ns["boxes"].shape[1] == 4


# -------------------------------------------------------------------------------------------------
# Benchmark (python tests/test_loader.py --bench): proposals/s, random access vs sequential.


def bench_random_vs_sequential(root, n_chunks=8, per_chunk=100, n_props=1000, seed=0):
    import pathlib

    rng = np.random.default_rng(seed)
    root = pathlib.Path(root)
    # Realistic RLE strings: a pool of real mask encodings reused across proposals.
    pool = mask_utils.encode(np.asfortranarray(
        (rng.random((120, 160, 64)) < 0.002).cumsum(0).astype(bool).astype(np.uint8)))
    counts = [r["counts"] for r in pool]
    out = str(root / "bench")
    for c in range(n_chunks):
        chunk = [ImageProposals(c * per_chunk + i, 120, 160,
                                np.sort(rng.random(n_props).astype(np.float32))[::-1],
                                rng.uniform(0, 60, (n_props, 4)),
                                [counts[k % len(counts)] for k in range(n_props)], "bench")
                 for i in range(per_chunk)]
        layout.write_chunk(out, c, chunk, ["parquet"])
    results = {}
    for name, masks in (("sequential", True), ("sequential, boxes only", False)):
        store = open_proposals(out)
        t = time.perf_counter()
        n = sum(len(p) for p in store.iter_images(masks=masks))
        results[name] = n / (time.perf_counter() - t)
    store = open_proposals(out)
    ids = rng.permutation(store.image_ids())[:200]
    t = time.perf_counter()
    n = sum(len(store.get(int(i))) for i in ids)
    results["random get"] = n / (time.perf_counter() - t)
    dataset = Dataset("bench", [ImageRecord(i, f"{i}.png", f"/none/{i}.png", 120, 160)
                                for i in store.image_ids()], {"annotations": []})
    data = ProposalDataset(out, dataset, top_k=None, load_images=False)
    t = time.perf_counter()
    n = sum(len(data[data.index_of(int(i))]["proposals"]["scores"]) for i in ids)
    results["random ProposalDataset[i]"] = n / (time.perf_counter() - t)
    return {"images": n_chunks * per_chunk, "proposals_per_image": n_props,
            "proposals_per_s": {k: round(v) for k, v in results.items()}}


if __name__ == "__main__" and "--bench" in sys.argv:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(bench_random_vs_sequential(d), indent=2))
