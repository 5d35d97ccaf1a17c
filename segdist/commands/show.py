"""``segdist show IMAGE``: draw a model's top proposals over one image and write a PNG."""

from __future__ import annotations

import argparse

HELP = "draw the top proposals over an image"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from segdist.config import MODEL_NAMES

    parser.add_argument("image", help="image URI (local path, s3://..., any fsspec URI)")
    parser.add_argument("--model", default="sharpmask-zoom", choices=MODEL_NAMES,
                        help="model preset (default: sharpmask-zoom)")
    parser.add_argument("--weights", default=None,
                        help="weights URI (a segdist checkpoint, e.g. from convert-t7, or a "
                             "torchvision file / DEFAULT for Mask R-CNN); default: random weights")
    parser.add_argument("--top", type=int, default=20, help="how many proposals to draw (default 20)")
    parser.add_argument("--out", default="overlay.png", help="output PNG URI (default overlay.png)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--max-image-side", type=int, default=None,
                        help="scale the image down to this longer side for the model (the picture "
                             "keeps the full size)")


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from segdist.config import ModelConfig
    from segdist.errors import ConfigError
    from segdist.imageio import read_image
    from segdist.models.generator import build_generator
    from segdist.storage import atomic_write
    from segdist.visualize import draw_proposals, encode_png

    if args.top < 1:
        raise ConfigError(f"--top must be >= 1 (got {args.top})")
    try:
        cfg = ModelConfig(name=args.model, weights=args.weights, proposals=args.top,
                          device=args.device, max_image_side=args.max_image_side, batch_size=1)
    except ValidationError as exc:
        raise ConfigError(f"invalid model settings: {exc.errors()[0]['msg']}") from exc
    image = read_image(args.image)
    generator = build_generator(cfg)
    (props,) = generator([image], [0])
    atomic_write(args.out, encode_png(draw_proposals(image, props, top=args.top)))
    best = ", ".join(f"{s:.3f}" for s in props.scores[:5])
    print(f"{args.out}: {min(len(props), args.top)} proposals of {generator.name} drawn over "
          f"{args.image} ({image.shape[1]}x{image.shape[0]}); best scores {best}")
    return 0
