"""Are an image's proposals byte-identical whatever batch it ran in, on this device?

On the CPU the tests say yes (tests/test_batching.py, tests/test_maskrcnn.py). On a GPU it also
needs cuDNN/cuBLAS to pick batch-size-independent algorithms for the batched dense trunks and
Mask R-CNN's per-image network calls: this script measures it. Each preset (random weights, 1000
proposals) runs the profile's COCO-like size mix once as one window (the proposer batches by size
under the budget) and once image by image; it prints, per preset, the share of images whose
proposals are byte-identical (RLE counts, scores, boxes) and the largest score difference
otherwise. One JSON line per preset (``--json`` writes them all).

    python benchmarks/gpu_exactness.py --device cuda --images 24
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from segdist.commands.bench import _mix_images
from segdist.commands.bench_profile import size_mix
from segdist.config import model_config
from segdist.proposers import build_proposer, config_class


def compare(together, alone) -> dict:
    """Byte-for-byte comparison of two lists of ImageProposals of the same images."""
    same, worst = 0, 0.0
    for a, b in zip(together, alone):
        identical = (a.counts == b.counts and a.scores.tobytes() == b.scores.tobytes()
                     and a.boxes.tobytes() == b.boxes.tobytes())
        same += identical
        if not identical:
            n = min(len(a), len(b))
            worst = max(worst, float(np.abs(a.scores[:n] - b.scores[:n]).max()) if n else 1.0)
    return {"images": len(together), "identical": same, "max_score_diff": worst}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="deepmask-zoom,sharpmask-zoom,maskrcnn")
    p.add_argument("--device", default="cuda")
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--proposals", type=int, default=1000)
    p.add_argument("--trunk", default="resnet50")
    p.add_argument("--memory-budget-mb", type=int, default=65536)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    images = _mix_images(size_mix(args.images))
    ids = list(range(len(images)))
    rows = []
    for preset in args.presets.split(","):
        options = dict(name=preset, device=args.device, proposals=args.proposals,
                       batch_size=64, memory_budget_mb=args.memory_budget_mb)
        if "trunk" in config_class(preset).model_fields:  # the families that have one
            options["trunk"] = args.trunk
        proposer = build_proposer(model_config(**options))
        t0 = time.perf_counter()
        together = proposer(images, ids)
        t1 = time.perf_counter()
        alone = [proposer([im], [i])[0] for im, i in zip(images, ids)]
        t2 = time.perf_counter()
        row = {"preset": preset, "device": args.device,
               "torch": torch.__version__, **compare(together, alone),
               "window_s": round(t1 - t0, 3), "one_by_one_s": round(t2 - t1, 3)}
        if args.device.startswith("cuda"):
            row["gpu"] = torch.cuda.get_device_name()
        print(json.dumps(row), flush=True)
        rows.append(row)
        del proposer
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
