"""``segdist show IMAGE|FOLDER``: draw a model's top proposals over one image and write a PNG, or
over each image of a folder (the first ``--limit``), one PNG per image in the ``--out`` folder."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from segdist.config import ModelConfig

HELP = "draw the top proposals over an image, or over each image of a folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from segdist.proposers import PROPOSERS

    parser.add_argument("image", help="image URI (local path, s3://..., any fsspec URI), or a "
                                      "folder: every image under it, as dataset.format images")
    parser.add_argument("--model", default="sharpmask-zoom", choices=list(PROPOSERS),
                        help="model preset (default: sharpmask-zoom)")
    parser.add_argument("--weights", default=None,
                        help="weights, as model.weights takes them: a segdist checkpoint (e.g. "
                             "from convert-t7), an original .t7, or for Mask R-CNN DEFAULT or a "
                             "state-dict file; default: random weights")
    parser.add_argument("--top", type=int, default=20, help="how many proposals to draw (default 20)")
    parser.add_argument("--out", default=None,
                        help="output PNG URI (default overlay.png); for a folder, the folder the "
                             "PNGs go to (default overlays)")
    parser.add_argument("--limit", type=int, default=None,
                        help="folder: only the first N images by path (default: all)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--max-image-side", type=int, default=None,
                        help="scale the image down to this longer side for the model (the picture "
                             "keeps the full size)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="any other setting of the model section (repeatable), e.g. --set "
                             "points_per_side=16 for the Segment Anything presets")


def run(args: argparse.Namespace) -> int:
    from segdist.config import apply_overrides, model_config
    from segdist.errors import ConfigError
    from segdist.imageio import read_image
    from segdist.proposers import build_proposer, config_class
    from segdist.storage import atomic_write
    from segdist.visualize import draw_proposals, encode_png

    if args.top < 1:
        raise ConfigError(f"--top must be >= 1 (got {args.top})")
    fields = dict(name=args.model, weights=args.weights, proposals=args.top, device=args.device,
                  batch_size=1)
    if args.max_image_side is not None:
        if "max_image_side" not in config_class(args.model).model_fields:
            raise ConfigError(f"--max-image-side does not apply to {args.model}: it has no "
                              "max_image_side setting")
        fields["max_image_side"] = args.max_image_side
    overrides = [item if item.startswith("model.") else f"model.{item}" for item in args.overrides]
    fields = apply_overrides({"model": fields}, overrides)["model"]
    cfg = model_config(**fields)
    if cfg.weights.kind == "random" and config_class(args.model).WEIGHT_KINDS != ("random",):
        # Random weights draw plausible-looking but meaningless proposals: say so up front.
        print(f"segdist show: note: no --weights given, so {args.model} runs with random weights "
              "(its proposals mean nothing); pass --weights, e.g. a checkpoint from segdist "
              "convert-t7 or train, or the original's model.t7 URL", file=sys.stderr)
    if _is_folder(args.image):
        return run_folder(args, cfg)
    if args.limit is not None:
        raise ConfigError("--limit is for a folder; the image given is one file")
    args.out = args.out or "overlay.png"
    image = read_image(args.image)
    proposer = build_proposer(cfg)
    (props,) = proposer([image], [0])
    atomic_write(args.out, encode_png(draw_proposals(image, props, top=args.top)))
    best = ", ".join(f"{s:.3f}" for s in props.scores[:5])
    print(f"{args.out}: {min(len(props), args.top)} proposals of {proposer.name} drawn over "
          f"{args.image} ({image.shape[1]}x{image.shape[0]}); best scores {best}")
    return 0


def _is_folder(uri: str) -> bool:
    from segdist.storage import url_to_fs

    fs, path = url_to_fs(uri)
    try:
        return fs.isdir(path)
    except OSError:
        return False  # read_image then says what is wrong with the file


def overlay_name(file_name: str) -> str:
    """The PNG an image's overlay goes to, flat in the output folder: ``sub/a.jpg`` ->
    ``sub__a.jpg.png`` (the extension stays, so ``a.jpg`` and ``a.png`` do not collide)."""
    return file_name.replace("/", "__") + ".png"


def run_folder(args: argparse.Namespace, cfg: "ModelConfig") -> int:
    """``segdist show FOLDER``: overlays of the first ``--limit`` images (by path) of a folder.

    The images are those an ``images`` dataset of the folder has (recursive, hidden files and
    non-image extensions left out). The model loads once; a file that fails to decode is reported
    and skipped. Returns 0 when at least one overlay was written.
    """
    from segdist.data.images import load_images
    from segdist.errors import ConfigError, ImageDecodeError, SegdistError
    from segdist.imageio import read_image
    from segdist.proposers import build_proposer
    from segdist.storage import atomic_write, join
    from segdist.visualize import draw_proposals, encode_png

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1 (got {args.limit})")
    out = args.out or "overlays"
    if out.lower().endswith(".png"):
        raise ConfigError(f"--out {out}: for a folder, --out names the folder the PNGs go to")
    records = sorted(load_images(args.image).images, key=lambda r: r.file_name)
    records = records[:args.limit] if args.limit else records
    if not records:
        raise SegdistError(f"no images under {args.image} (extensions: see docs/datasets.md)")
    proposer = build_proposer(cfg)
    written = 0
    for rec in records:
        try:
            image = read_image(rec.uri)
        except ImageDecodeError as exc:
            print(f"skipped {rec.file_name}: {exc.reason}")
            continue
        (props,) = proposer([image], [rec.image_id])
        target = join(out, overlay_name(rec.file_name))
        atomic_write(target, encode_png(draw_proposals(image, props, top=args.top)))
        written += 1
        best = f"{props.scores[0]:.3f}" if len(props) else "-"
        print(f"{target}: {min(len(props), args.top)} proposals over {rec.file_name} "
              f"({image.shape[1]}x{image.shape[0]}), best score {best}")
    if not written:
        raise SegdistError(f"none of the {len(records)} images under {args.image} could be read")
    print(f"{written} overlays of {proposer.name} in {out} ({len(records) - written} skipped)")
    return 0
