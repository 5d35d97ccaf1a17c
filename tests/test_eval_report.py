"""The evaluation report (eval.json, table.md, plots) and ``segdist evaluate`` end to end on S3."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from test_evaluation import hard_case

from segdist import storage
from segdist.cli import main
from segdist.evaluation.groundtruth import eval_image_ids, prepare_ground_truth
from segdist.evaluation.metrics import summarize
from segdist.evaluation.plots import PANEL_W, PLOT, RUN_COLORS, ar_vs_proposals_svg
from segdist.evaluation.recall import count_images
from segdist.evaluation.report import (build_report, default_out, markdown_table, run_names,
                                       write_report)
from segdist.evaluation.sharded import EvalRun
from segdist.proposals.layout import write_chunk


def _runs():
    """Two runs on the same GT: all proposals, and only the top 5 per image (lower AR)."""
    gt_dict, props = hard_case(8, n_images=16)
    few = {i: p.top(5) for i, p in props.items()}
    runs = []
    for name, ps in (("full", props), ("top5", few)):
        counts = {}
        for t in ("segm", "bbox"):
            ids = eval_image_ids(gt_dict, t)
            counts[t] = count_images(prepare_ground_truth(gt_dict, ids, segments=t == "segm"),
                                     ps, ids, t)
        runs.append(EvalRun(f"/data/{name}", "parquet", "sharpmask", counts,
                            {"segm": 16, "bbox": 16}, shards=2))
    runs[0].manifest = {"model": {"name": "sharpmask", "weights_sha256": "ab" * 32},
                        "config": {"model": {"name": "sharpmask"}}, "complete": True,
                        "chunks": ["not copied"]}
    return runs


def _polylines(svg: bytes, colour: str) -> list[np.ndarray]:
    """Points (N x 2, SVG pixels: y grows downwards) of the lines drawn in ``colour``."""
    root = ET.fromstring(svg)
    out = []
    for el in root.iter("{http://www.w3.org/2000/svg}polyline"):
        if el.get("stroke") == colour:
            out.append(np.array([[float(v) for v in p.split(",")] for p in el.get("points").split()]))
    return out


def test_plot_draws_each_runs_curve_rising_in_the_plot_area():
    report = build_report(_runs(), {"name": "hard"})
    svg = ar_vs_proposals_svg(report["runs"])
    root = ET.fromstring(svg)  # well-formed XML
    assert int(root.get("width")) == 2 * PANEL_W  # segments and boxes panels
    x0, y0, x1, y1 = PLOT
    ends = []
    for i in range(2):
        lines = _polylines(svg, RUN_COLORS[i])
        assert len(lines) == 2  # one line per panel
        seg = lines[0]  # the segments panel (left)
        assert len(seg) == 1000
        assert (seg[:, 0] >= x0).all() and (seg[:, 0] <= x1).all()
        assert (seg[:, 1] >= y0).all() and (seg[:, 1] <= y1).all()
        assert seg[-1, 0] - seg[0, 0] == pytest.approx(x1 - x0)  # across the whole x range
        assert (np.diff(seg[:, 1]) <= 1e-9).all()  # AR never falls with more proposals
        assert seg[0, 1] > seg[-1, 1] + 20  # and rises
        # y is AR: the plot's last point is AR@1000 on the 0..1 axis.
        ar = report["runs"][i]["segm"]["metrics"]["AR@1000"]
        assert seg[-1, 1] == pytest.approx(y1 - ar * (y1 - y0), abs=0.01)
        ends.append(seg[-1, 1])
    assert ends[0] < ends[1]  # the better run (all proposals vs top 5) ends higher
    names = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert "full" in names and "top5" in names  # the legend


def test_report_files_json_and_table(tmp_path):
    runs = _runs()
    report = build_report(runs, {"name": "hard", "images": 16})
    written = write_report(report, str(tmp_path / "rep"))
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == sorted(
        ["eval.json", "table.md", "ar_vs_proposals.svg", "recall_vs_iou.svg"])
    doc = json.loads((tmp_path / "rep" / "eval.json").read_text())
    assert written["eval.json"] == str(tmp_path / "rep" / "eval.json")
    assert [r["name"] for r in doc["runs"]] == ["full", "top5"]
    full = doc["runs"][0]
    assert full["manifest"]["model"]["weights_sha256"] == "ab" * 32
    assert "chunks" not in full["manifest"] and doc["runs"][1]["manifest"] is None
    expect = summarize(runs[0].counts["segm"])
    assert full["segm"]["metrics"] == expect["metrics"]
    assert full["segm"]["metrics"]["AR@1000"] == pytest.approx(
        full["segm"]["curves"]["ar_vs_proposals"]["all"][999])
    assert len(full["bbox"]["curves"]["ar_vs_proposals"]["all"]) == 1000
    iou = full["segm"]["curves"]["recall_vs_iou"]
    assert iou["iou"][0] == 0.5 and iou["iou"][-1] == 1.0 and len(iou["@1000"]) == 21
    assert iou["@1000"][0] == full["segm"]["metrics"]["R@0.5@1000"]
    for svg in ("ar_vs_proposals.svg", "recall_vs_iou.svg"):
        root = ET.fromstring((tmp_path / "rep" / svg).read_bytes())
        assert len(list(root.iter("{http://www.w3.org/2000/svg}polyline"))) >= 4
    table = (tmp_path / "rep" / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| full |")]
    assert len(rows) == 3  # the main table's row, then segm and bbox details
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert len(cells) == 11 and cells[1] == "sharpmask"
    ar = full["segm"]["metrics"]["AR@100"]
    assert cells[6] == f"{ar:.3f}".lstrip("0")  # papers' style: .331
    assert markdown_table(report) == table


def test_table_labels_ar_by_the_proposals_the_runs_have():
    gt_dict, props = hard_case(8, n_images=16)  # one image has 1100 proposals, the rest < 150
    table = {}
    for cap in (100, 5, 1000):
        ps = {i: p.top(cap) for i, p in props.items()}
        counts = {t: count_images(prepare_ground_truth(gt_dict, eval_image_ids(gt_dict, t),
                                                       segments=t == "segm"),
                                  ps, eval_image_ids(gt_dict, t), t) for t in ("segm", "bbox")}
        report = build_report([EvalRun("/r", "parquet", "m", counts, {}, 1)], {"name": "hard"})
        table[cap] = markdown_table(report)
        metrics = report["runs"][0]["segm"]["metrics"]
        assert report["runs"][0]["segm"]["counts"]["max_proposals_per_image"] == cap
        head, _, row = table[cap].splitlines()[:3]
        cells = [c.strip() for c in row.strip("|").split("|")]
        columns = {10: ["10"], 100: ["10", "100"], 5: ["10"], 1000: ["10", "100", "1000"]}[cap]
        assert head == ("| run | model | " + " | ".join(f"box AR@{m}" for m in columns) + " | "
                        + " | ".join(f"segm AR@{m}" for m in columns) + " | AR^S | AR^M | AR^L |")
        n = len(columns)
        assert cells[2 + n:2 + 2 * n] == [_fmt_ar(metrics[f"AR@{m}"]) for m in columns]
        # AR^S/M/L at the last column's count: AR_small@100 is AR_small@10 when no image has 10
        assert cells[-3] == _fmt_ar(metrics[f"AR_small@{max(100, int(columns[-1]))}"])
    assert "No image has more than 5 proposals: AR@10 is AR@5." in table[5]
    assert "No image has more than" not in table[100] and "No image has more" not in table[1000]
    assert "with 10/100 proposals per image" in table[100]


def _fmt_ar(v: float) -> str:
    return f"{v:.3f}".lstrip("0")


def test_incomplete_job_outputs_are_warned_about():
    from segdist.commands.evaluate import incomplete_warning

    def run(uri, kind, manifest):
        return EvalRun(uri, kind, "m", {}, {}, 1, manifest=manifest)

    totals = {"chunks": 247, "chunks_committed": 240, "chunks_failed": 2}
    said = incomplete_warning(run("s3://b/out", "parquet", {"complete": False, "totals": totals}))
    assert said == ("s3://b/out is incomplete (its manifest: 240 of 247 chunks committed, 2 "
                    "failed): the images of the missing chunks count as misses; re-run segdist "
                    "generate with the same config to complete it")
    assert incomplete_warning(run("s3://b/out", "coco-json", {"complete": True})) is None
    assert "has no manifest.json" in incomplete_warning(run("/o/coco-json", "coco-json", None))
    # not a job's chunk folder: a results file, the original layout
    assert incomplete_warning(run("/x/results.segm.json", "coco-results", None)) is None
    assert incomplete_warning(run("/x/a.parquet", "parquet", None)) is None
    assert incomplete_warning(run("/x/deepmask", "original", None)) is None


def test_names_and_default_locations():
    assert default_out("s3://b/run1") == "s3://b/run1/eval"
    assert default_out("s3://b/run1/") == "s3://b/run1/eval"
    assert default_out("/x/results.segm.json") == "/x/results.segm.json.eval"
    a = EvalRun("s3://b/run", "parquet", "deepmask", {}, {}, 1)
    b = EvalRun("/local/run", "parquet", "sharpmask", {}, {}, 1)
    assert run_names([a, b]) == ["deepmask (s3://b/run)", "sharpmask (/local/run)"]


def test_cli_compares_two_runs_on_s3(ray_cluster, s3_bucket, tmp_path, capsys):
    bucket, options = s3_bucket
    options = {**options, "key": "testing", "secret": "testing"}  # Ray workers read S3 too
    gt_dict, props = hard_case(9, n_images=14)
    storage.atomic_write(f"s3://{bucket}/gt/instances.json", json.dumps(gt_dict).encode(), options)
    ids = sorted(props)
    for run, ps in (("runA", props), ("runB", {i: p.top(3) for i, p in props.items()})):
        for k in range(0, len(ids), 5):
            write_chunk(f"s3://{bucket}/{run}", k // 5, [ps[i] for i in ids[k:k + 5]],
                        ["parquet", "coco-json"], storage_options=options)
    manifest = {"model": {"name": "sharpmask-zoom", "weights_sha256": "cd" * 32}, "complete": True}
    storage.atomic_write(f"s3://{bucket}/runA/manifest.json", json.dumps(manifest).encode(),
                         options)
    rc = main(["evaluate", "--proposals", f"s3://{bucket}/runA", f"s3://{bucket}/runB",
               "--dataset", f"s3://{bucket}/gt/instances.json", "--names", "A", "B",
               "--storage-options", json.dumps(options), "--no-progress"])
    assert rc == 0
    printed, err = capsys.readouterr()
    assert "| A | sharpmask-zoom |" in printed and "| B |" in printed
    # runB has chunk files but no manifest: a job that may not have finished, said once.
    warnings = [line for line in err.splitlines() if "warning:" in line]
    assert warnings == [f"segdist evaluate: warning: s3://{bucket}/runB has no manifest.json: the "
                        "job that wrote it may not have finished, and images without proposals "
                        "count as misses; re-run segdist generate with the same config to complete "
                        "it"]
    doc = json.loads(storage.read_bytes(f"s3://{bucket}/runA/eval/eval.json", options))
    assert doc["dataset"]["images"] == 14 and doc["dataset"]["format"] == "coco"
    a, b = doc["runs"]
    assert a["manifest"]["model"]["weights_sha256"] == "cd" * 32 and a["shards"] == 3
    for t in ("segm", "bbox"):
        ids_t = eval_image_ids(gt_dict, t)
        gt = prepare_ground_truth(gt_dict, ids_t, segments=t == "segm")
        expect = summarize(count_images(gt, props, ids_t, t))["metrics"]
        assert a[t]["metrics"] == expect
        assert b[t]["metrics"]["AR@1000"] < a[t]["metrics"]["AR@1000"]
    for name in ("table.md", "ar_vs_proposals.svg", "recall_vs_iou.svg"):
        assert storage.exists(f"s3://{bucket}/runA/eval/{name}", options)


def test_cli_errors_are_one_line(tmp_path, capsys):
    gt_dict, props = hard_case(1, n_images=4)
    (tmp_path / "gt.json").write_text(json.dumps(gt_dict))
    p = next(iter(props.values()))
    write_chunk(str(tmp_path / "run"), 0, [p], ["parquet"])
    rc = main(["evaluate", "--proposals", str(tmp_path / "run"), "--dataset",
               str(tmp_path / "gt.json"), "--names", "a", "b"])
    assert rc == 2 and "give one per location" in capsys.readouterr().err
    rc = main(["evaluate", "--proposals", str(tmp_path / "run"), "--dataset",
               str(tmp_path / "missing.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "missing.json" in err and "Traceback" not in err
    rc = main(["evaluate", "--proposals", str(tmp_path / "run"), "--dataset",
               str(tmp_path / "gt.json"), "--storage-options", "{not json"])
    assert rc == 2 and "--storage-options" in capsys.readouterr().err


def test_cli_voc_config_segments_only_where_segmented(ray_cluster, tmp_path):
    """A generate-style config naming a VOC split: box AR over every image, segment AR only over
    the images that have a SegmentationObject PNG."""
    from pycocotools import mask as mask_utils

    from segdist.data.synthetic import make_synthetic
    from segdist.data.voc import load_voc
    from segdist.proposals.types import ImageProposals

    info = make_synthetic(str(tmp_path / "voc"), n_images=8, seed=3, fmt="voc", min_side=48,
                          max_side=128, crowd_prob=0.5)
    root = info["root"]
    for name in ("2026_000001", "2026_000004", "2026_000006"):
        (tmp_path / "voc" / "VOC2012" / "SegmentationObject" / f"{name}.png").unlink()
    config = tmp_path / "job.yaml"
    config.write_text(f"dataset:\n  format: voc\n  root: {root}\n  split: trainval\n"
                      f"output:\n  uri: {tmp_path / 'unused'}\n")
    gt_dict = load_voc(root, split="trainval").coco_gt
    assert len(gt_dict["segm_image_ids"]) == 5
    by_image: dict[int, list] = {}
    for a in gt_dict["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    props = {}
    for k, im in enumerate(gt_dict["images"]):
        if k == 1:
            continue  # a segmented image without proposals: its objects are missed
        h, w = im["height"], im["width"]
        rles = []
        for a in by_image.get(im["id"], []):
            if "segmentation" in a:
                rles.append(a["segmentation"])
            else:  # boxes only: a box-shaped mask
                rles.append(mask_utils.frPyObjects(np.array([a["bbox"]]), h, w)[0])
        if rles:
            rles = [{"size": r["size"], "counts": r["counts"]} for r in rles]
            props[im["id"]] = ImageProposals(
                im["id"], h, w, np.linspace(1, 0.5, len(rles)), mask_utils.toBbox(rles),
                [r["counts"] for r in rles], "gt")
    write_chunk(str(tmp_path / "run"), 0, list(props.values())[:3], ["coco-json"])
    write_chunk(str(tmp_path / "run"), 1, list(props.values())[3:], ["coco-json"])
    rc = main(["evaluate", "--proposals", str(tmp_path / "run"), "--dataset", str(config),
               "--no-progress"])
    assert rc == 0
    doc = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    run = doc["runs"][0]
    assert run["images_evaluated"] == {"segm": 5, "bbox": 8} and doc["dataset"]["format"] == "voc"
    for t in ("segm", "bbox"):
        ids_t = eval_image_ids(gt_dict, t)
        gt = prepare_ground_truth(gt_dict, ids_t, segments=t == "segm")
        assert run[t]["metrics"] == summarize(count_images(gt, props, ids_t, t))["metrics"]
        assert 0.5 < run[t]["metrics"]["AR@100"] < 1.0  # all but the second image's objects


def test_cli_limit_evaluates_the_first_images_of_a_full_run(ray_cluster, tmp_path, capsys):
    """The papers' protocol: proposals exist for every image, --limit N evaluates the first N ids.
    Proposals for the images after the limit are outside the selection (ignored), not an error."""
    gt_dict, props = hard_case(2, n_images=10)
    (tmp_path / "gt.json").write_text(json.dumps(gt_dict))
    ids = sorted(props)
    for k in range(0, len(ids), 4):
        write_chunk(str(tmp_path / "run"), k // 4, [props[i] for i in ids[k:k + 4]], ["parquet"])
    rc = main(["evaluate", "--proposals", str(tmp_path / "run"), "--dataset",
               str(tmp_path / "gt.json"), "--limit", "5", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    doc = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert doc["dataset"]["images"] == 5
    first = sorted(im["id"] for im in gt_dict["images"])[:5]
    for t in ("segm", "bbox"):
        ids_t = eval_image_ids(gt_dict, t, first)
        gt = prepare_ground_truth(gt_dict, ids_t, segments=t == "segm")
        expect = summarize(count_images(gt, props, ids_t, t))["metrics"]
        assert doc["runs"][0][t]["metrics"] == expect
