"""Benchmark: sharded evaluation (local Ray) against one pycocotools COCOeval, on synthetic data.

Not a test (tests never time anything). Run::

    python -m segdist.evaluation.bench --images 5000 --proposals 1000 --single-images 500 \
        --workdir /tmp/evalbench

The data are COCO-like without pixels: 640 x 480 images, about 7 objects each (polygons, sizes
log-uniform from 8 to 300 px, 1 % crowd regions as RLE), and per image ``--proposals`` proposals
rasterised straight to RLE: a third are jittered copies of the objects, the rest random polygons,
with scores that favour the jittered ones. The proposals are written as Parquet chunks of 250
images (the job's layout), and the sharded evaluation reads them from there.

COCOeval runs once over the first ``--single-images`` images (segments, then boxes; its time is
loadRes + evaluate + accumulate + summarize) and the sharded job runs on the same images, so the
two numbers compare the same work; both must agree to 1e-12. COCOeval's cost is linear in the
number of images (a Python loop per image), so its time for all images is extrapolated from
that run, and said so. The sharded job then also runs on all images.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

HEIGHT, WIDTH = 480, 640


def _polygon(rng: np.random.Generator, cx: float, cy: float, rx: float, ry: float,
             vertices: int = 12, wobble: float = 0.15) -> list[float]:
    """A closed star-shaped polygon [x0, y0, x1, y1, ...] around (cx, cy) with radii (rx, ry)."""
    angles = np.sort(rng.uniform(0, 2 * np.pi, vertices))
    r = 1 + rng.uniform(-wobble, wobble, vertices)
    xs = np.clip(cx + rx * r * np.cos(angles), 0, WIDTH)
    ys = np.clip(cy + ry * r * np.sin(angles), 0, HEIGHT)
    return np.stack([xs, ys], axis=1).reshape(-1).tolist()


def synthetic_gt(n_images: int, seed: int = 0) -> dict[str, Any]:
    """COCO instances dict: ``n_images`` images of 640 x 480 with polygon objects, 80 categories."""
    images, anns = [], []
    aid = 1
    for i in range(n_images):
        rng = np.random.default_rng([seed, i])
        image_id = 100000 + i
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "height": HEIGHT,
                       "width": WIDTH})
        for _ in range(int(min(rng.poisson(7), 20))):
            size = math.exp(rng.uniform(math.log(8), math.log(300)))
            aspect = math.exp(rng.uniform(-0.7, 0.7))
            rx, ry = size * aspect / 2, size / aspect / 2
            cx, cy = rng.uniform(rx / 2, WIDTH - rx / 2), rng.uniform(ry / 2, HEIGHT - ry / 2)
            poly = _polygon(rng, cx, cy, rx, ry)
            rle = mask_utils.merge(mask_utils.frPyObjects([poly], HEIGHT, WIDTH))
            area = float(mask_utils.area(rle))
            if area == 0:
                continue
            crowd = rng.random() < 0.01
            seg: Any = [poly]
            if crowd:  # COCO's crowd regions are RLE
                seg = {"size": [HEIGHT, WIDTH], "counts": rle["counts"].decode("ascii")}
            anns.append({"id": aid, "image_id": image_id, "category_id": int(rng.integers(1, 81)),
                         "iscrowd": int(crowd), "area": area,
                         "bbox": [float(v) for v in mask_utils.toBbox(rle)], "segmentation": seg})
            aid += 1
    cats = [{"id": c, "name": f"class{c}"} for c in range(1, 81)]
    return {"images": images, "annotations": anns, "categories": cats}


def synthetic_proposals(coco_gt: dict[str, Any], n_proposals: int, seed: int = 1
                        ) -> Iterator["ImageProposals"]:  # noqa: F821
    """Per image (in id order): ``n_proposals`` RLE proposals, sorted by descending score."""
    from segdist.proposals.types import ImageProposals

    by_image: dict[int, list[dict]] = {}
    for a in coco_gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for k, im in enumerate(sorted(coco_gt["images"], key=lambda im: im["id"])):
        rng = np.random.default_rng([seed, k])
        objects = np.asarray([a["bbox"] for a in by_image.get(im["id"], [])], dtype=np.float64)
        n_near = n_proposals // 3 if len(objects) else 0
        n_far = n_proposals - n_near
        # Jittered objects: centre moved by ~8 % of the size, scale by ~15 %.
        x, y, w, h = objects[rng.integers(len(objects), size=n_near)].T if n_near else np.zeros((4, 0))
        s = np.exp(rng.normal(0, 0.15, n_near))
        near = _polygons(rng, x + w / 2 + rng.normal(0, 0.08, n_near) * w,
                         y + h / 2 + rng.normal(0, 0.08, n_near) * h,
                         np.maximum(w * s / 2, 1), np.maximum(h * s / 2, 1), wobble=0.2)
        size = np.exp(rng.uniform(math.log(8), math.log(480), n_far))
        far = _polygons(rng, rng.uniform(0, WIDTH, n_far), rng.uniform(0, HEIGHT, n_far),
                        size / 2, size * np.exp(rng.uniform(-0.7, 0.7, n_far)) / 2, wobble=0.15)
        scores = np.concatenate([rng.beta(4, 2, n_near), rng.beta(2, 4, n_far)]).astype(np.float32)
        rles = mask_utils.frPyObjects(near + far, HEIGHT, WIDTH)
        order = np.argsort(-scores, kind="stable")
        rles = [rles[i] for i in order]
        yield ImageProposals(im["id"], HEIGHT, WIDTH, scores[order], mask_utils.toBbox(rles),
                             [r["counts"] for r in rles], "bench")


def _polygons(rng: np.random.Generator, cx: np.ndarray, cy: np.ndarray, rx: np.ndarray,
              ry: np.ndarray, vertices: int = 12, wobble: float = 0.15) -> list[list[float]]:
    """N star-shaped polygons at once (as :func:`_polygon`), as lists [x0, y0, x1, y1, ...]."""
    n = len(cx)
    angles = np.sort(rng.uniform(0, 2 * np.pi, (n, vertices)), axis=1)  # N x V
    r = 1 + rng.uniform(-wobble, wobble, (n, vertices))
    xs = np.clip(cx[:, None] + rx[:, None] * r * np.cos(angles), 0, WIDTH)
    ys = np.clip(cy[:, None] + ry[:, None] * r * np.sin(angles), 0, HEIGHT)
    return np.stack([xs, ys], axis=2).reshape(n, 2 * vertices).tolist()


def _cocoeval(coco_gt: dict[str, Any], results: list[dict], iou_type: str, img_ids: list[int]):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = json.loads(json.dumps(coco_gt))  # its own copy: COCOeval edits annotations
        gt.createIndex()
        t0 = time.perf_counter()
        dt = gt.loadRes(results)
        E = COCOeval(gt, dt, iou_type)
        E.params.useCats = 0
        E.params.maxDets = [10, 100, 1000]
        E.params.imgIds = img_ids
        E.evaluate()
        E.accumulate()
        E.summarize()
        seconds = time.perf_counter() - t0
    return E.stats[6:12].tolist(), seconds


def _results(proposals, iou_type: str) -> list[dict]:
    """COCO results as the job writes them (segm without "bbox", bbox with boxes only)."""
    from segdist.proposals.cocojson import encode_bbox, encode_segm, load_results

    encode = encode_segm if iou_type == "segm" else encode_bbox
    return load_results(encode(proposals))


def run_benchmark(n_images: int, n_proposals: int, single_images: int, workdir: str,
                  num_cpus: int | None = None, chunk_size: int = 250) -> dict[str, Any]:
    """Generate (or reuse) the data under ``workdir``, time both evaluations, return the numbers."""
    import ray

    from segdist.evaluation.metrics import coco_stats
    from segdist.evaluation.sharded import evaluate_proposals
    from segdist.ray_connect import connect_ray
    from segdist.proposals.layout import write_chunk
    from segdist.proposals.store import open_proposals

    os.makedirs(workdir, exist_ok=True)
    tag = f"{n_images}x{n_proposals}"
    gt_path = os.path.join(workdir, f"gt-{tag}.json")
    run_dir = os.path.join(workdir, f"run-{tag}")
    out: dict[str, Any] = {"images": n_images, "proposals_per_image": n_proposals,
                           "single_images": single_images, "chunk_size": chunk_size}
    if not os.path.exists(os.path.join(run_dir, "done")):
        t0 = time.perf_counter()
        gt = synthetic_gt(n_images)
        with open(gt_path, "w") as f:
            json.dump(gt, f)
        chunk: list = []
        index = 0
        for p in synthetic_proposals(gt, n_proposals):
            chunk.append(p)
            if len(chunk) == chunk_size:
                write_chunk(run_dir, index, chunk, ["parquet"])
                chunk, index = [], index + 1
        if chunk:
            write_chunk(run_dir, index, chunk, ["parquet"])
        open(os.path.join(run_dir, "done"), "w").close()
        out["generate_seconds"] = round(time.perf_counter() - t0, 1)
    with open(gt_path) as f:
        gt = json.load(f)
    out["gt_annotations"] = len(gt["annotations"])
    out["parquet_bytes"] = sum(os.path.getsize(os.path.join(run_dir, "parquet", n))
                               for n in os.listdir(os.path.join(run_dir, "parquet")))

    # The same images both ways: the first `single_images` ids, i.e. the first chunk files
    # (linked into their own location, so that the sharded run reads only those).
    if single_images % chunk_size:
        raise ValueError(f"--single-images must be a multiple of the chunk size {chunk_size}")
    ids = sorted(im["id"] for im in gt["images"])[:single_images]
    subset_dir = os.path.join(workdir, f"run-{tag}-first{single_images}")
    os.makedirs(os.path.join(subset_dir, "parquet"), exist_ok=True)
    for k in range(single_images // chunk_size):
        name = f"chunk-{k:06d}.parquet"
        link = os.path.join(subset_dir, "parquet", name)
        if not os.path.lexists(link):
            os.symlink(os.path.join(run_dir, "parquet", name), link)
    subset = list(open_proposals(subset_dir).iter_images())
    assert [p.image_id for p in subset] == ids
    started = connect_ray(None, num_cpus, num_gpus=0)
    try:
        out["ray_cpus"] = int(ray.cluster_resources().get("CPU", 0))
        # Warm-up: worker processes start and import once (not part of either number).
        evaluate_proposals(subset_dir, gt, image_ids=ids[:1], progress=False)
        t0 = time.perf_counter()
        sub_run = evaluate_proposals(subset_dir, gt, image_ids=ids, progress=False)
        out["sharded_subset_seconds"] = round(time.perf_counter() - t0, 2)
        single: dict[str, Any] = {}
        for iou_type in ("segm", "bbox"):
            stats, seconds = _cocoeval(gt, _results(subset, iou_type), iou_type, ids)
            mine = coco_stats(sub_run.counts[iou_type])
            single[iou_type] = {"seconds": round(seconds, 2), "stats": stats,
                                "max_abs_diff": max(abs(a - b) for a, b in zip(stats, mine))}
        out["cocoeval_subset"] = single
        out["cocoeval_subset_seconds"] = round(sum(v["seconds"] for v in single.values()), 2)
        del subset
        t0 = time.perf_counter()
        full = evaluate_proposals(run_dir, gt, progress=False)
        out["sharded_full_seconds"] = round(time.perf_counter() - t0, 2)
        out["sharded_full_stats"] = {t: coco_stats(c) for t, c in full.counts.items()}
        out["shards"] = full.shards
    finally:
        if started:
            ray.shutdown()
    out["cocoeval_full_seconds_extrapolated"] = round(
        out["cocoeval_subset_seconds"] * n_images / single_images, 1)
    out["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                      "platform": platform.platform()}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--proposals", type=int, default=1000)
    parser.add_argument("--chunk-size", type=int, default=250)
    parser.add_argument("--single-images", type=int, default=500,
                        help="images of the single-COCOeval comparison run")
    parser.add_argument("--workdir", default="/tmp/segdist-evalbench")
    parser.add_argument("--num-cpus", type=int, default=None)
    args = parser.parse_args(argv)
    result = run_benchmark(args.images, args.proposals, min(args.single_images, args.images),
                           args.workdir, args.num_cpus, args.chunk_size)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
