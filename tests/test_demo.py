"""The demo pipeline end to end at a tiny size: every output exists and the AR table is honest
(the numbers equal pycocotools' COCOeval on the written proposals, class-agnostic, 1000 max)."""

from __future__ import annotations

import contextlib
import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from conftest import coco_result_records
from segdist.commands.demo import DemoPlan, run_demo

TINY = DemoPlan(images=10, val_fraction=0.3, min_side=96, max_side=128, max_objects=3,
                trunk="resnet18", i_sz=32, o_sz=16, batch_size=8, steps=4, lr=0.01,
                optimizer="sgd", train_minutes=2.0, eval_patches=16, scales=(-1.0, 0.0, 1.0), device="cpu", loader_workers=0,
                job_workers=1)


def _cocoeval_ar(coco_gt: dict, store, kind: str) -> list[float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    results = coco_result_records(store.iter_images(), kind)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = coco_gt
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), kind)
        ev.params.useCats = 0
        ev.params.maxDets = [10, 100, 1000]
        ev.params.imgIds = sorted(gt.getImgIds())
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(x) for x in ev.stats[6:9]]


def test_tiny_demo_writes_every_output_and_reports_cocoeval_numbers(ray_cluster, tmp_path):
    from segdist.data.coco import load_coco
    from segdist.proposals.store import open_proposals

    out = tmp_path / "demo"
    report = run_demo(str(out), TINY, seed=1)
    for line in ("average recall", "AR@100", "overlay", str(out / "overlay.png")):
        assert line in report
    summary = json.loads((out / "demo.json").read_text())
    assert summary["steps"] == 4 and summary["val_images"] == 3
    val = load_coco(str(out / "data" / "annotations" / "instances_val.json"),
                    str(out / "data" / "images"))
    for name in ("trained", "untrained"):
        store = open_proposals(str(out / "proposals" / name))
        assert sorted(store.image_ids()) == [r.image_id for r in val.images]
        for kind in ("segm", "bbox"):
            ref = _cocoeval_ar(val.coco_gt, store, kind)
            got = [summary["ar"][name][kind][f"AR@{m}"] for m in (10, 100, 1000)]
            assert got == pytest.approx(ref, abs=1e-9), (name, kind)
    overlay = np.asarray(Image.open(out / "overlay.png"))
    objects = Counter(a["image_id"] for a in val.coco_gt["annotations"])
    shown = max(val.images, key=lambda r: (objects[r.image_id], -r.image_id))
    k = 2 if max(shown.height, shown.width) < 256 else 1  # small images are enlarged
    assert overlay.shape == (k * shown.height, k * (2 * shown.width + 6), 3)  # trained | untrained
    assert (out / "untrained.safetensors").is_file() and (out / "train" / "last.json").is_file()
