"""``segdist sample-data --out URI``: write the deterministic synthetic dataset (COCO or VOC)."""

from __future__ import annotations

import argparse
import json

HELP = "write a deterministic synthetic COCO or VOC dataset"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder URI (local path, s3://...)")
    parser.add_argument("--images", type=int, default=100, help="number of images (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    parser.add_argument("--format", choices=("coco", "voc"), default="coco",
                        help="coco: images/ + annotations/instances_{all,train,val}.json; "
                             "voc: VOC2012/ with JPEGImages, Annotations, ImageSets, "
                             "SegmentationObject, SegmentationClass")
    parser.add_argument("--min-side", type=int, default=160, help="smallest image side in px")
    parser.add_argument("--max-side", type=int, default=640, help="largest image side in px")
    parser.add_argument("--min-objects", type=int, default=1, help="fewest objects per image")
    parser.add_argument("--max-objects", type=int, default=8, help="most objects per image")
    parser.add_argument("--crowd-prob", type=float, default=0.15,
                        help="probability that an image has one iscrowd region")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="share of images in the val split (disjoint from train)")
    parser.add_argument("--storage-options", default=None, metavar="JSON",
                        help='fsspec options for --out as JSON, e.g. \'{"client_kwargs": '
                             '{"endpoint_url": "http://127.0.0.1:9000"}}\' (credentials belong '
                             "in the environment)")


def run(args: argparse.Namespace) -> int:
    from segdist.data.synthetic import make_synthetic
    from segdist.errors import ConfigError

    options = {}
    if args.storage_options:
        try:
            options = json.loads(args.storage_options)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--storage-options is not valid JSON: {exc}") from None
        if not isinstance(options, dict):
            raise ConfigError("--storage-options must be a JSON object")
    result = make_synthetic(
        args.out, args.images, seed=args.seed, fmt=args.format, min_side=args.min_side,
        max_side=args.max_side, min_objects=args.min_objects, max_objects=args.max_objects,
        crowd_prob=args.crowd_prob, val_fraction=args.val_fraction, storage_options=options,
    )
    print(f"wrote {result['n_images']} images ({len(result['train'])} train, "
          f"{len(result['val'])} val) in {args.format} layout under {result['root']}")
    if args.format == "coco":
        for split, uri in result["annotations"].items():
            print(f"  {split}: --set dataset.annotations={uri} --set dataset.images={result['images']}")
    else:
        print(f"  dataset.format=voc dataset.root={result['root']} dataset.split=val|train|trainval")
    return 0
