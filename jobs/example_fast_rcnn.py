"""Example: train a small Fast R-CNN box head on precomputed proposals (segdist.export.fast_rcnn).

    segdist sample-data --out /tmp/sample --images 32
    segdist generate configs/<your run>.yaml          # proposals under OUT
    python jobs/example_fast_rcnn.py --proposals OUT \\
        --annotations /tmp/sample/annotations/instances_all.json --images /tmp/sample/images

Prints the loss of every iteration and, at the end, the first and last five averaged. The working
directory is put on sys.path so that ``segdist`` imports without installation (as in a Ray Job).
"""

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segdist.data.coco import load_coco  # noqa: E402
from segdist.export.fast_rcnn import train_fast_rcnn  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proposals", required=True, help="proposals URI (a segdist output)")
    parser.add_argument("--annotations", required=True, help="COCO instances JSON URI")
    parser.add_argument("--images", required=True, help="image folder URI")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=300)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dataset = load_coco(args.annotations, args.images)
    result = train_fast_rcnn(args.proposals, dataset, iterations=args.iterations,
                             batch_size=args.batch_size, top_k=args.top_k,
                             num_workers=args.workers)
    n = min(5, len(result.losses))
    print(json.dumps({"iterations": len(result.losses),
                      "first_loss": sum(result.losses[:n]) / n,
                      "last_loss": sum(result.losses[-n:]) / n}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
