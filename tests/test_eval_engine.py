"""The evaluation's C kernels against pycocotools value for value, and the in-process path's
promise: a small evaluation imports neither torch nor Ray (nor matplotlib or pandas)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from test_evaluation import _ellipse, _rect, hard_case

from segdist.errors import SegdistError
from segdist.evaluation.groundtruth import eval_image_ids, prepare_ground_truth
from segdist.evaluation.kernels import add_hits, box_ious, greedy_match, segm_ious
from segdist.evaluation.protocol import ALL_IOUS
from segdist.evaluation.recall import count_images
from segdist.evaluation.shard import GroundTruth, evaluate_shard
from segdist.proposals.types import ImageProposals

ROOT = Path(__file__).resolve().parents[1]


def _masks(rng, h, w, n):
    """Rectangles, ellipses, and the corner cases: empty, full, one pixel, a column, a row."""
    out = [np.zeros((h, w), np.uint8), np.ones((h, w), np.uint8), _rect(h, w, w - 1, h - 1, w, h),
           _rect(h, w, 0, 0, 1, h), _rect(h, w, 0, h // 2, w, h // 2 + 1)]
    while len(out) < n:
        x0, y0 = int(rng.integers(0, w - 1)), int(rng.integers(0, h - 1))
        x1, y1 = int(rng.integers(x0 + 1, w + 1)), int(rng.integers(y0 + 1, h + 1))
        out.append(_rect(h, w, x0, y0, x1, y1) if rng.random() < 0.5 else
                   _ellipse(h, w, (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2))
    return out


@pytest.mark.parametrize("h, w", [(37, 53), (64, 20), (2, 9)])
def test_segm_ious_equal_pycocotools_for_every_pair(h, w):
    rng = np.random.default_rng(h * w)
    dts = mask_utils.encode(np.asfortranarray(np.stack(_masks(rng, h, w, 60), axis=2)))
    gts = mask_utils.encode(np.asfortranarray(np.stack(_masks(rng, h, w, 12), axis=2)))
    crowd = (np.arange(12) % 3 == 0).astype(np.uint8)
    order = rng.permutation(60)[:45]  # a score order, cut to maxDets
    mine = segm_ious([d["counts"] for d in dts], order, [g["counts"] for g in gts], h, w, crowd)
    ref = np.asarray(mask_utils.iou([dts[i] for i in order], gts, crowd)).reshape(45, 12)
    np.testing.assert_array_equal(mine, ref)  # bit for bit, every pair
    assert (mine > 0).sum() > 100 and (mine == 1).any()


def test_ious_of_every_hard_case_image_equal_cocoeval_inputs():
    gt_dict, props = hard_case(1, n_images=10)
    ids = eval_image_ids(gt_dict, "segm")
    gt = prepare_ground_truth(gt_dict, ids, segments=True)
    checked = 0
    for image_id, p in props.items():
        g = gt[image_id]
        if not len(g):
            continue
        order = np.argsort(-p.scores.astype(np.float64), kind="mergesort")[:1000]
        rles = [{"size": [p.height, p.width], "counts": p.counts[i]} for i in order]
        gt_rles = [{"size": [g.height, g.width], "counts": c} for c in g.rle_counts]
        ref = np.asarray(mask_utils.iou(rles, gt_rles, g.crowd.astype(np.uint8)))
        np.testing.assert_array_equal(
            segm_ious(p.counts, order, g.rle_counts, g.height, g.width, g.crowd), ref)
        ref_box = np.asarray(mask_utils.iou(p.boxes[order].astype(np.float64), g.boxes,
                                            g.crowd.astype(np.uint8)))
        np.testing.assert_array_equal(box_ious(p.boxes[order], g.boxes, g.crowd), ref_box)
        checked += 1
    assert checked >= 6


def test_box_ious_equal_pycocotools_with_degenerate_boxes():
    rng = np.random.default_rng(0)
    dt = np.round(rng.uniform(0, 50, (40, 4)), 1)
    dt[:5, 2] = 0  # zero width
    dt[5:8] = [[10.3, 10.7, 0.1, 1e-7]] * 3  # tiny
    gt = np.round(rng.uniform(0, 50, (7, 4)), 2)
    crowd = np.array([0, 1, 0, 0, 1, 0, 0], np.uint8)
    np.testing.assert_array_equal(box_ious(dt, gt, crowd),
                                  np.asarray(mask_utils.iou(dt, gt, crowd)))
    assert box_ious(dt, np.zeros((0, 4)), np.zeros(0, bool)).shape == (40, 0)


def test_corrupt_or_wrongly_sized_rle_is_a_clear_error():
    good = mask_utils.encode(np.asfortranarray(_rect(10, 10, 2, 2, 6, 6)))["counts"]
    order = np.array([0])
    for bad in (good[:-2], b"\x7f\x7f", good + b"1"):  # truncated, not RLE, one run too many
        with pytest.raises(ValueError, match="corrupt COCO RLE"):
            segm_ious([bad], order, [good], 10, 10, np.zeros(1, bool))
    with pytest.raises(ValueError, match="10 x 11"):  # the mask is 10 x 10
        segm_ious([good], order, [good], 10, 11, np.zeros(1, bool))
    # Through the evaluation: the image is named, as a SegdistError (one line in the CLI).
    gt = {"images": [{"id": 3, "height": 10, "width": 10}], "categories": [{"id": 1}],
          "annotations": [{"id": 1, "image_id": 3, "category_id": 1, "iscrowd": 0, "area": 16.0,
                           "bbox": [2, 2, 4, 4], "segmentation": {"size": [10, 10],
                                                                   "counts": good.decode()}}]}
    props = ImageProposals(3, 10, 10, [0.9], [[2, 2, 4, 4]], [good[:-2]], "x")
    with pytest.raises(SegdistError, match="image 3: proposal 0: corrupt"):
        evaluate_shard([props], GroundTruth.prepare(gt, {"segm": [3]}), ["segm"], 1000)


def test_add_hits_counts_matches_to_countable_gts_only():
    rng = np.random.default_rng(2)
    match = rng.integers(-1, 5, (21, 30))
    countable = np.array([True, False, True, True, False])
    hits = np.zeros((21, 4, 100), np.int64)
    add_hits(hits, 2, match, countable)
    add_hits(hits, 2, match, countable)
    expect = 2 * ((match >= 0) & countable[np.maximum(match, 0)])
    np.testing.assert_array_equal(hits[:, 2, :30], expect)
    assert hits[:, [0, 1, 3]].sum() == 0 and hits[:, 2, 30:].sum() == 0
    with pytest.raises(ValueError):
        add_hits(hits, 2, np.full((21, 30), 7), countable)  # a GT index beyond G


def test_greedy_match_of_no_detections_or_no_gt():
    assert greedy_match(np.zeros((0, 3)), np.zeros(3, bool), np.zeros(3, bool), ALL_IOUS).shape \
        == (21, 0)
    assert (greedy_match(np.zeros((4, 0)), np.zeros(0, bool), np.zeros(0, bool), ALL_IOUS)
            == -1).all()


@pytest.mark.parametrize("seed", [0, 5])
def test_ar_curve_is_bit_identical_to_cocoeval_mean_at_every_count(seed):
    gt_dict, props = hard_case(seed)
    for iou_type in ("segm", "bbox"):
        ids = eval_image_ids(gt_dict, iou_type)
        counts = count_images(prepare_ground_truth(gt_dict, ids, segments=iou_type == "segm"),
                              props, ids, iou_type)
        rec = counts.recall()
        for area in ("all", "small", "medium", "large"):
            ref = [counts.average_recall(m, area, rec) for m in range(1, 1001)]
            np.testing.assert_array_equal(counts.average_recall_curve(area, rec), ref)


def test_small_cli_run_imports_neither_torch_nor_ray(tmp_path):
    """`segdist evaluate` on a one-chunk run, in a fresh interpreter: in-process, and the
    heavyweight modules stay unimported (start-up is most of a small run's time)."""
    from segdist.proposals.layout import write_chunk

    gt_dict, props = hard_case(2, n_images=8)
    (tmp_path / "gt.json").write_text(json.dumps(gt_dict))
    write_chunk(str(tmp_path / "run"), 0, list(props.values()), ["parquet"])
    code = ("import json, sys\n"
            "from segdist.cli import main\n"
            f"rc = main(['evaluate', '--proposals', {str(tmp_path / 'run')!r}, '--dataset', "
            f"{str(tmp_path / 'gt.json')!r}, '--no-progress'])\n"
            "print(json.dumps({'rc': rc, 'loaded': [m for m in ('torch', 'ray', 'matplotlib', "
            "'pandas') if m in sys.modules]}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result == {"rc": 0, "loaded": []}
    doc = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert doc["runs"][0]["mode"] == "in-process" and doc["runs"][0]["shards"] == 1
