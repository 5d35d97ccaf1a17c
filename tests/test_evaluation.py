"""Evaluation against pycocotools: the matcher decision for decision, and the sharded Ray job
number for number (to 1e-12) against ONE COCOeval run over all images."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segdist.errors import SegdistError
from segdist.evaluation.groundtruth import eval_image_ids, prepare_ground_truth
from segdist.evaluation.kernels import greedy_match
from segdist.evaluation.metrics import coco_stats, summarize
from segdist.evaluation.protocol import ALL_IOUS, AREA_RANGES, STANDARD_IOUS
from segdist.evaluation.recall import count_images
from segdist.evaluation.shard import GroundTruth, evaluate_shard
from segdist.evaluation.sharded import evaluate_proposals
from segdist.proposals.layout import write_chunk
from segdist.proposals.types import ImageProposals

# -- test data ------------------------------------------------------------------------------------


def _rect(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), np.uint8)
    m[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = 1
    return m


def _ellipse(h, w, cx, cy, rx, ry):
    yy, xx = np.mgrid[:h, :w]
    return ((((xx - cx) / max(rx, 1)) ** 2 + ((yy - cy) / max(ry, 1)) ** 2) <= 1).astype(np.uint8)


def _proposals_from_masks(image_id, masks, scores, model="test"):
    """ImageProposals of uint8 masks (list of HxW), stably sorted by descending score."""
    h, w = masks[0].shape
    rles = mask_utils.encode(np.asfortranarray(np.stack(masks, axis=2)))
    scores = np.asarray(scores, dtype=np.float32)
    order = np.argsort(-scores, kind="stable")
    rles = [rles[o] for o in order]
    return ImageProposals(image_id, h, w, scores[order], mask_utils.toBbox(rles),
                          [r["counts"] for r in rles], model)


def hard_case(seed, n_images=24):
    """GT with every COCOeval corner: crowd regions, polygons and RLE, several categories plus one
    that is not in ``categories``, all three area ranges, images without GT; proposals with score
    ties, duplicated masks, images without proposals and one image with more than 1000."""
    rng = np.random.default_rng(seed)
    images, anns, props = [], [], {}
    aid = 1
    for i in range(n_images):
        big = i % 4 == 1
        h, w = ((int(rng.integers(110, 150)), int(rng.integers(110, 160))) if big
                else (int(rng.integers(24, 70)), int(rng.integers(24, 70))))
        image_id = 5 + 3 * i
        images.append({"id": image_id, "height": h, "width": w, "file_name": f"{image_id}.jpg"})
        boxes = []
        for j in range(0 if i % 6 == 4 else int(rng.integers(1, 7))):
            x0, y0 = int(rng.integers(0, w - 4)), int(rng.integers(0, h - 4))
            x1, y1 = int(rng.integers(x0 + 2, w + 1)), int(rng.integers(y0 + 2, h + 1))
            if big and j == 0:
                x0, y0, x1, y1 = 2, 3, w - 2, h - 3  # a large object
            m = (_rect(h, w, x0, y0, x1, y1) if rng.random() < 0.5
                 else _ellipse(h, w, (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2))
            if m.sum() == 0:
                continue
            rle = mask_utils.encode(np.asfortranarray(m))
            crowd = int(rng.random() < 0.15)
            if rng.random() < 0.3 and not crowd:
                seg = [[x0, y0, x1, y0, x1, y1, x0, y1]]
                area = float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(seg, h, w))))
            else:
                seg = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
                area = float(mask_utils.area(rle))
            cat = int(rng.choice([1, 2, 3, 7])) if rng.random() > 0.05 else 99
            anns.append({"id": aid, "image_id": image_id, "category_id": cat, "iscrowd": crowd,
                         "area": area, "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                         "segmentation": seg})
            boxes.append((x0, y0, x1, y1))
            aid += 1
        if i % 5 == 2:
            continue  # no proposals for this image
        n = 1100 if i == 3 else int(rng.integers(1, 150))
        masks = []
        for _ in range(n):
            if boxes and rng.random() < 0.6:
                x0, y0, x1, y1 = boxes[int(rng.integers(len(boxes)))]
                s = rng.integers(-3, 4, 4)
                masks.append(_rect(h, w, x0 + s[0], y0 + s[1], x1 + s[2], y1 + s[3])
                             if rng.random() < 0.5 else
                             _ellipse(h, w, (x0 + x1) / 2 + s[0], (y0 + y1) / 2 + s[1],
                                      (x1 - x0) / 2 + s[2], (y1 - y0) / 2 + s[3]))
            else:
                x0, y0 = int(rng.integers(0, w - 2)), int(rng.integers(0, h - 2))
                masks.append(_rect(h, w, x0, y0, int(rng.integers(x0 + 1, w + 1)),
                                   int(rng.integers(y0 + 1, h + 1))))
        if n > 3:
            masks[2] = masks[1].copy()  # identical proposals: equal IoUs
        props[image_id] = _proposals_from_masks(image_id, masks, np.round(rng.random(n), 2))
    cats = [{"id": c, "name": f"c{c}"} for c in (1, 2, 3, 7)]
    return {"images": images, "annotations": anns, "categories": cats}, props


def coco_results(props, iou_type):
    """COCO results of proposals: segm without "bbox" (the bbox trap), bbox with boxes only."""
    out = []
    for p in props:
        for k in range(len(p)):
            r = {"image_id": p.image_id, "category_id": 1, "score": float(p.scores[k])}
            if iou_type == "segm":
                r["segmentation"] = {"size": [p.height, p.width],
                                     "counts": p.counts[k].decode("ascii")}
            else:
                r["bbox"] = [float(v) for v in p.boxes[k]]
            out.append(r)
    return out


def cocoeval(gt_dict, props, iou_type, img_ids=None, iou_thrs=None, max_dets=(10, 100, 1000)):
    """One plain pycocotools run over all images (the reference)."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(gt_dict)
        gt.createIndex()
        dt = gt.loadRes(coco_results(props, iou_type))
        E = COCOeval(gt, dt, iou_type)
        E.params.useCats = 0
        E.params.maxDets = list(max_dets)
        if img_ids is not None:
            E.params.imgIds = list(img_ids)
        if iou_thrs is not None:
            E.params.iouThrs = np.asarray(iou_thrs)
        E.evaluate()
        E.accumulate()
        if iou_thrs is None:
            E.summarize()
    return E


# -- the matcher, decision for decision -----------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_match_equals_cocoeval_dt_matches(seed):
    gt_dict, props = hard_case(seed, n_images=12)
    for iou_type in ("segm", "bbox"):
        E = cocoeval(gt_dict, list(props.values()), iou_type, iou_thrs=ALL_IOUS,
                     max_dets=(1, 10, 1000))
        n_img = len(E.params.imgIds)
        checked = 0
        for a, (lo, hi) in enumerate(AREA_RANGES):
            for k, image_id in enumerate(E.params.imgIds):
                e = E.evalImgs[a * n_img + k]
                ious = E.ious[image_id, -1]
                if e is None or len(ious) == 0:
                    continue
                gts = [g for c in E._paramsEval.catIds for g in E._gts[image_id, c]]
                crowd = np.array([bool(g["iscrowd"]) for g in gts])
                area = np.array([g["area"] for g in gts])
                ignore = crowd | (area < lo) | (area > hi)
                match = greedy_match(ious, ignore, crowd, ALL_IOUS)
                ids = np.array([g["id"] for g in gts])
                mine = np.where(match >= 0, ids[np.maximum(match, 0)], 0)
                np.testing.assert_array_equal(mine, e["dtMatches"])
                checked += 1
        assert checked > 30


def test_greedy_match_corner_cases():
    # Equal IoUs: the later GT wins; a crowd GT is matched by every detection; an ignored GT is
    # only taken when no regular one is left; IoU exactly at the threshold matches.
    ious = np.array([[0.6, 0.6, 0.9], [0.6, 0.6, 0.9], [0.7, 0.5, 0.95]])
    crowd = np.array([False, False, True])
    ignore = np.array([False, False, True])
    m = greedy_match(ious, ignore, crowd, np.array([0.5, 0.6, 0.75]))
    np.testing.assert_array_equal(m, [[1, 0, 2], [1, 0, 2], [2, 2, 2]])
    assert greedy_match(np.zeros((0, 3)), ignore, crowd, STANDARD_IOUS).shape == (10, 0)
    assert (greedy_match(np.zeros((4, 0)), np.zeros(0, bool), np.zeros(0, bool),
                         STANDARD_IOUS) == -1).all()
    # IoU 1.0 matches at threshold 1.0 (COCOeval caps the threshold at 1 - 1e-10).
    assert greedy_match(np.ones((1, 1)), np.zeros(1, bool), np.zeros(1, bool),
                        np.array([1.0]))[0, 0] == 0


# -- counts: shards add up to the single run ------------------------------------------------------

@pytest.mark.parametrize("seed", [3, 4])
def test_counts_of_shards_equal_one_cocoeval_run(seed):
    gt_dict, props = hard_case(seed)
    for iou_type in ("segm", "bbox"):
        ref = cocoeval(gt_dict, list(props.values()), iou_type)
        ref_curves = cocoeval(gt_dict, list(props.values()), iou_type, iou_thrs=ALL_IOUS,
                              max_dets=(1, 3, 10, 100, 300, 1000))
        ids = eval_image_ids(gt_dict, iou_type)
        gt = prepare_ground_truth(gt_dict, ids, segments=iou_type == "segm")
        shards = [ids[k::3] for k in range(3)]  # interleaved: order across shards is irrelevant
        counts = sum((count_images(gt, props, s, iou_type) for s in shards[1:]),
                     count_images(gt, props, shards[0], iou_type))
        assert coco_stats(counts) == pytest.approx(ref.stats[6:12].tolist(), abs=1e-12)
        assert min(ref.stats[6:12]) > 0  # every area range has GT: nothing passes as -1 == -1
        # Every recall COCOeval computes, at 21 thresholds x 4 areas x 6 proposal counts: equal.
        mine = counts.recall()[:, :, [0, 2, 9, 99, 299, 999]]
        np.testing.assert_array_equal(mine, ref_curves.eval["recall"][:, 0, :, :])


def test_voc_segments_only_for_images_with_segment_gt():
    gt_dict, props = hard_case(5, n_images=18)
    no_segm = {im["id"] for im in gt_dict["images"][::3]}
    for im in gt_dict["images"]:
        im["has_segm"] = im["id"] not in no_segm
    for a in gt_dict["annotations"]:
        if a["image_id"] in no_segm:
            del a["segmentation"]  # VOC images without SegmentationObject: boxes only
    gt_dict["segm_image_ids"] = [im["id"] for im in gt_dict["images"] if im["has_segm"]]
    segm_ids = eval_image_ids(gt_dict, "segm")
    assert set(segm_ids) == set(gt_dict["segm_image_ids"]) and len(segm_ids) == 12
    assert len(eval_image_ids(gt_dict, "bbox")) == 18
    segm_props = {i: p for i, p in props.items() if i in set(segm_ids)}
    for iou_type, ids, ps in (("segm", segm_ids, segm_props), ("bbox", None, props)):
        ids = ids if ids is not None else eval_image_ids(gt_dict, "bbox")
        ref = cocoeval(gt_dict, list(ps.values()), iou_type, img_ids=ids)
        gt = prepare_ground_truth(gt_dict, ids, segments=iou_type == "segm")
        got = coco_stats(count_images(gt, props, ids, iou_type))
        assert got == pytest.approx(ref.stats[6:12].tolist(), abs=1e-12)


# -- the sharded Ray job on the synthetic dataset -------------------------------------------------

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """make_synthetic COCO data (crowd regions, images without objects) plus two extra images
    without any annotation, and jittered-GT + random proposals with some images left out."""
    from segdist.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    info = make_synthetic(str(root / "data"), n_images=30, seed=7, min_side=48, max_side=240,
                          min_objects=0, max_objects=6, crowd_prob=0.5)
    gt_dict = json.loads(open(info["annotations"]["all"]).read())
    last = max(im["id"] for im in gt_dict["images"])
    gt_dict["images"] += [{"id": last + k, "file_name": f"x{k}.jpg", "height": 50, "width": 70}
                          for k in (1, 2)]
    rng = np.random.default_rng(11)
    by_image = {}
    for a in gt_dict["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    props = {}
    for k, im in enumerate(gt_dict["images"]):
        if k % 7 == 3:
            continue  # an image without proposals: its GT are misses
        h, w = im["height"], im["width"]
        masks = []
        for a in by_image.get(im["id"], []):
            x, y, bw, bh = (int(v) for v in a["bbox"])
            for _ in range(int(rng.integers(1, 6))):
                s = rng.integers(-4, 5, 4)
                masks.append(_rect(h, w, x + s[0], y + s[1], x + bw + s[2], y + bh + s[3]))
            masks.append(mask_utils.decode(a["segmentation"]))
        for _ in range(int(rng.integers(5, 150))):
            x0, y0 = int(rng.integers(0, w - 2)), int(rng.integers(0, h - 2))
            masks.append(_rect(h, w, x0, y0, int(rng.integers(x0 + 1, w + 1)),
                               int(rng.integers(y0 + 1, h + 1))))
        props[im["id"]] = _proposals_from_masks(im["id"], masks, rng.random(len(masks)))
    assert any(a["iscrowd"] for a in gt_dict["annotations"])
    assert any(im["id"] not in by_image for im in gt_dict["images"])
    return gt_dict, props, root


def _write_chunks(out, props, per_chunk, formats):
    ids = sorted(props)
    for i in range(0, len(ids), per_chunk):
        write_chunk(str(out), i // per_chunk, [props[j] for j in ids[i:i + per_chunk]], formats)


@pytest.mark.parametrize("in_process", [True, False], ids=["in-process", "ray"])
def test_sharded_equals_single_cocoeval(request, synthetic, in_process):
    if not in_process:
        request.getfixturevalue("ray_cluster")
    gt_dict, props, root = synthetic
    out = root / "run"
    if not out.exists():
        _write_chunks(out, props, 6, ["parquet", "coco-json"])
    for uri in (str(out), str(out / "coco-json")):  # the Parquet and the COCO-JSON readers
        run = evaluate_proposals(uri, gt_dict, in_process=in_process, progress=False)
        assert run.shards == 5 and run.images == {"segm": 32, "bbox": 32}
        assert run.mode == ("in-process" if in_process else "ray")
        if not in_process:
            # The ground truth is fetched once per worker process, not once per task.
            fetched = [r.worker for r in run.shard_results if r.gt_fetched]
            assert len(fetched) == len(set(fetched)) >= 1
            assert len({r.worker for r in run.shard_results}) == len(fetched)
        for iou_type in ("segm", "bbox"):
            ref = cocoeval(gt_dict, list(props.values()), iou_type)
            got = coco_stats(run.counts[iou_type])
            assert got == pytest.approx(ref.stats[6:12].tolist(), abs=1e-12)
            assert 0 < min(got) and max(got) < 1
            m = summarize(run.counts[iou_type])["metrics"]
            assert m["R@0.5@100"] == pytest.approx(ref.eval["recall"][0, 0, 0, 1], abs=1e-12)
            assert m["R@0.7@1000"] == pytest.approx(ref.eval["recall"][4, 0, 0, 2], abs=1e-12)


def test_single_results_file_is_split_into_shards(ray_cluster, synthetic, tmp_path):
    gt_dict, props, _ = synthetic
    path = tmp_path / "results.segm.json"
    path.write_text(json.dumps(coco_results(list(props.values()), "segm")))
    run = evaluate_proposals(str(path), gt_dict, shard_images=8, in_process=False, progress=False)
    assert run.kind == "coco-results" and run.shards == 4
    for iou_type in ("segm", "bbox"):
        # bbox of segment-only results: the masks' tight boxes, as COCO.loadRes computes them.
        ref = cocoeval(gt_dict, list(props.values()), iou_type)
        assert coco_stats(run.counts[iou_type]) == pytest.approx(ref.stats[6:12].tolist(),
                                                                 abs=1e-12)


def _gt_proposals(gt_dict, jitter_rng=None):
    by_image: dict[int, list] = {}
    for a in gt_dict["annotations"]:
        if not a["iscrowd"]:
            by_image.setdefault(a["image_id"], []).append(a)
    out = {}
    for im in gt_dict["images"]:
        anns = by_image.get(im["id"])
        if not anns:
            continue
        masks = [mask_utils.decode(a["segmentation"]) for a in anns]
        out[im["id"]] = _proposals_from_masks(im["id"], masks, np.linspace(1, 0.5, len(masks)))
    return out


def test_gt_masks_give_ar_one_and_random_boxes_low_ar(synthetic):
    gt_dict, _, _ = synthetic
    ids = eval_image_ids(gt_dict, "segm")
    perfect = _gt_proposals(gt_dict)
    rng = np.random.default_rng(3)
    random_props = {}
    for im in gt_dict["images"]:
        h, w = im["height"], im["width"]
        masks = []
        for _ in range(100):
            x0, y0 = int(rng.integers(0, w - 1)), int(rng.integers(0, h - 1))
            masks.append(_rect(h, w, x0, y0, int(rng.integers(x0 + 1, w + 1)),
                               int(rng.integers(y0 + 1, h + 1))))
        random_props[im["id"]] = _proposals_from_masks(im["id"], masks, rng.random(100))
    for iou_type in ("segm", "bbox"):
        gt = prepare_ground_truth(gt_dict, ids, segments=iou_type == "segm")
        good = coco_stats(count_images(gt, perfect, ids, iou_type))
        assert good == [1.0] * 6
        bad = coco_stats(count_images(gt, random_props, ids, iou_type))
        assert max(bad[:3]) < 0.1 and bad[2] > 0  # AR@10/100/1000: chance hits only


def test_original_props_layout_evaluates_unchanged(ray_cluster, synthetic, tmp_path):
    """The DeepMask/SharpMask release: props-<start>-<end>.json, segments only, category 1."""
    gt_dict, props, _ = synthetic
    ids = sorted(props)
    for start in range(0, len(ids), 10):
        part = [props[i] for i in ids[start:start + 10]]
        end = start + len(part)
        (tmp_path / f"props-{start}-{end}.json").write_text(json.dumps(coco_results(part, "segm")))
    run = evaluate_proposals(str(tmp_path), gt_dict, in_process=False, progress=False)
    assert run.kind == "original" and run.shards == 3
    for iou_type in ("segm", "bbox"):
        ref = cocoeval(gt_dict, list(props.values()), iou_type)
        assert coco_stats(run.counts[iou_type]) == pytest.approx(ref.stats[6:12].tolist(),
                                                                 abs=1e-12)


# -- bad input ------------------------------------------------------------------------------------

def test_clear_errors_for_proposals_that_do_not_fit(ray_cluster, synthetic, tmp_path):
    gt_dict, props, _ = synthetic
    ids = sorted(props)
    stranger = _proposals_from_masks(10**9, [_rect(20, 20, 1, 1, 9, 9)], [0.5])
    _write_chunks(tmp_path / "a", {**{i: props[i] for i in ids[:4]}, 10**9: stranger}, 3,
                  ["parquet"])
    for in_process in (True, False):
        with pytest.raises(SegdistError, match="not in the ground truth"):
            evaluate_proposals(str(tmp_path / "a"), gt_dict, in_process=in_process,
                               progress=False)
    p = props[ids[0]]
    resized = _proposals_from_masks(p.image_id, [_rect(p.height + 1, p.width, 0, 0, 5, 5)], [1.0])
    _write_chunks(tmp_path / "b", {p.image_id: resized, ids[1]: props[ids[1]]}, 1, ["parquet"])
    with pytest.raises(SegdistError, match="proposal masks are"):
        evaluate_proposals(str(tmp_path / "b"), gt_dict, in_process=False, progress=False)


def test_box_only_proposals_evaluate_boxes(ray_cluster, synthetic, tmp_path):
    gt_dict, props, _ = synthetic
    boxes_only = {i: ImageProposals(i, 0, 0, p.scores, p.boxes, None, "maskrcnn-rpn")
                  for i, p in props.items()}
    _write_chunks(tmp_path, boxes_only, 12, ["coco-json"])
    run = evaluate_proposals(str(tmp_path), gt_dict, in_process=False, progress=False)
    assert list(run.counts) == ["bbox"]
    ref = cocoeval(gt_dict, list(props.values()), "bbox")
    assert coco_stats(run.counts["bbox"]) == pytest.approx(ref.stats[6:12].tolist(), abs=1e-12)
    with pytest.raises(SegdistError, match="box-only"):
        evaluate_proposals(str(tmp_path), gt_dict, iou_types=["segm"], progress=False)


def test_evaluate_shard_reports_unknown_images_without_counting():
    gt_dict, props = hard_case(0, n_images=6)
    ids = eval_image_ids(gt_dict, "bbox")
    gt = GroundTruth.prepare(gt_dict, {"bbox": ids})
    stray = ImageProposals(424242, 10, 10, [0.5], [[0, 0, 2, 2]], None, "x")
    out = evaluate_shard([*props.values(), stray], gt, ["bbox"], 1000)
    assert out.unknown == [424242] and out.counts == {}
    out = evaluate_shard(list(props.values()), gt, ["bbox"], 100)
    assert out.counts["bbox"].n_images == len(props) and out.counts["bbox"].max_dets == 100
