"""segdist's SAM / SAM 2 automatic mask generation against the official generators: same network
(seeded random weights), same images, same settings; wall and process CPU seconds per image, runs
interleaved (official, ours, official, ours, ...) and the best of each kept; the outputs are
checked equal (masks byte for byte, boxes, scores within 1e-6) before any number is printed.

    python benchmarks/sam.py --model sam2-hiera-t --points-per-side 8 --pred-iou-thresh median

``--pred-iou-thresh median`` (or qNN, a percentile): random weights predict IoUs in a narrow band, so the official
default (0.88 SAM, 0.8 SAM 2) would drop every mask; the median of the image's predicted IoUs
keeps about half of them, as the default does for a trained network. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch


def _official(name: str, net, settings: dict):
    if name.startswith("sam2"):
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

        return SAM2AutomaticMaskGenerator(net, output_mode="coco_rle", **settings)
    from segment_anything import SamAutomaticMaskGenerator

    return SamAutomaticMaskGenerator(net, output_mode="coco_rle", **settings)


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sam2-hiera-t")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--min-side", type=int, default=480)
    ap.add_argument("--max-side", type=int, default=640)
    ap.add_argument("--points-per-side", type=int, default=8)
    ap.add_argument("--pred-iou-thresh", default="median",
                    help="a number, 'median', or qNN (that percentile of the predicted IoUs)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from segdist.config import model_config
    from segdist.data.synthetic import make_synthetic
    from segdist.imageio import read_image
    from segdist.proposers import build_proposer

    root = tempfile.mkdtemp()
    info = make_synthetic(root, args.images, seed=0, min_side=args.min_side, max_side=args.max_side)
    images = [read_image(u) for u in sorted(u for u in info["files"] if "/images/" in u)]
    # stability 0 and NMS 1.0: random weights give no stable mask and near-identical boxes
    base = dict(points_per_side=args.points_per_side, stability_score_thresh=0.0, box_nms_thresh=1.0)
    thresh = args.pred_iou_thresh
    if thresh == "median" or thresh.startswith("q"):  # of the first image's predicted IoUs
        probe = build_proposer(model_config(name=args.model, device="cpu", pred_iou_thresh=0.0,
                                            **base))
        q = 50.0 if thresh == "median" else float(thresh[1:])
        thresh = float(np.percentile(probe(images[:1], [0])[0].scores, q))
    thresh = float(thresh)
    settings = dict(base, pred_iou_thresh=thresh)
    ours = build_proposer(model_config(name=args.model, device="cpu", **settings))
    ref = _official(args.model, ours.runner.model, settings)

    best = {"official": (np.inf, np.inf), "segdist": (np.inf, np.inf)}
    n_masks = 0
    for _ in range(args.repeat):
        anns, w, c = _timed(lambda: [ref.generate(im) for im in images])
        best["official"] = min(best["official"], (w, c))
        props, w, c = _timed(lambda: ours(images, list(range(len(images)))))
        best["segdist"] = min(best["segdist"], (w, c))
        for a, p in zip(anns, props):  # equal outputs, or no numbers
            a = sorted(a, key=lambda x: -x["predicted_iou"])
            assert [x["segmentation"]["counts"].encode() for x in a] == p.counts
            assert np.allclose([x["predicted_iou"] for x in a], p.scores, rtol=0, atol=1e-6)
        n_masks = sum(len(p) for p in props)
    sizes = ", ".join(f"{im.shape[1]}x{im.shape[0]}" for im in images)
    print(f"{args.model}, {len(images)} images ({sizes}), {args.points_per_side}^2 points, "
          f"pred_iou_thresh {thresh:.4f}, {n_masks} masks out, torch threads {args.threads}")
    for k, (w, c) in best.items():
        print(f"  {k:9s} wall {w / len(images):7.2f} s/image  CPU {c / len(images):7.2f} s/image  "
              f"{len(images) / w:.3f} images/s")
    print(f"  speed-up (CPU seconds): {best['official'][1] / best['segdist'][1]:.2f}x")


if __name__ == "__main__":
    main()
