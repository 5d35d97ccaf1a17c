"""``segdist export {detectron2,mmdet,original} --proposals URI --out URI``."""

from __future__ import annotations

import argparse
import json
import logging

from segdist.errors import ConfigError

HELP = "export proposals for Detectron2, MMDetection or the original layout"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("format", choices=["detectron2", "mmdet", "original"],
                        help="detectron2: proposals .pkl; mmdet: MMDetection 3.x proposals .pkl; "
                             "original: segm/ and bbox/ props-<start>-<end>.json folders")
    parser.add_argument("--proposals", required=True,
                        help="proposals location (a segdist output, chunk folder or results file)")
    parser.add_argument("--out", required=True,
                        help="output URI: the .pkl file (detectron2, mmdet) or a folder (original)")
    parser.add_argument("--dataset", metavar="CONFIG",
                        help="dataset config YAML (the 'dataset:' section of a run config, or a "
                             "file with just its fields); required for mmdet")
    parser.add_argument("--annotations", metavar="URI",
                        help="COCO instances JSON (with --images), instead of --dataset")
    parser.add_argument("--images", metavar="URI", help="image folder of --annotations")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a dataset config field, e.g. limit=100")
    parser.add_argument("--top-k", type=int, default=None,
                        help="keep at most this many proposals per image (default: all)")
    parser.add_argument("--per-file", type=int, default=500,
                        help="original: images per props-<start>-<end>.json file (default 500)")
    parser.add_argument("--gzip", action="store_true", help="original: write .json.gz")
    parser.add_argument("--ids", choices=["auto", "image-id", "file-name"], default="auto",
                        help="detectron2: the pickle's 'ids' are the image ids or the file names "
                             "(paths relative to the image folder); auto (default): file names "
                             "for a run over an image folder (dataset.format images), else ids")
    parser.add_argument("--storage-options", default=None, metavar="JSON",
                        help="fsspec options for --proposals and --out, as JSON (credentials are "
                             "better left to the environment)")


def _dataset(args):
    """The dataset named by --dataset or --annotations/--images and its format, or (None, None)."""
    if not (args.dataset or args.annotations or args.images):
        return None, None
    from segdist.config import DatasetConfig, load_config, validate

    if args.dataset:
        from segdist.storage import read_bytes
        import yaml

        raw = yaml.safe_load(read_bytes(args.dataset).decode("utf-8")) or {}
        if isinstance(raw, dict) and isinstance(raw.get("dataset"), dict):
            raw = raw["dataset"]  # a whole run config: take its dataset section
        cfg = load_config(DatasetConfig, None, args.overrides, base=raw)
    else:
        if not (args.annotations and args.images):
            raise ConfigError("--annotations and --images go together (or use --dataset CONFIG)")
        cfg = validate(DatasetConfig, {"format": "coco", "annotations": args.annotations,
                                       "images": args.images}, "--annotations/--images")
    from segdist.data import load_dataset

    return load_dataset(cfg), cfg.format


def _run_dataset_format(proposals: str, options) -> str | None:
    """``dataset.format`` in the manifest of a job output, None when there is none."""
    from segdist.errors import StorageError
    from segdist.proposals.layout import manifest_uri
    from segdist.storage import read_bytes

    try:
        doc = json.loads(read_bytes(manifest_uri(proposals), options))
    except (StorageError, ValueError, OSError):
        return None
    dataset = doc.get("dataset") if isinstance(doc, dict) else None
    return dataset.get("format") if isinstance(dataset, dict) else None


def _file_names(args, dataset, dataset_format, store, options) -> dict[int, str] | None:
    """Detectron2 ids as file names (``--ids``), from the dataset and the proposals."""
    mode = args.ids
    if mode == "auto":
        fmt = dataset_format or _run_dataset_format(args.proposals, options)
        mode = "file-name" if fmt == "images" else "image-id"
    if mode == "image-id":
        return None
    names = store.file_names()
    if dataset is not None:
        names.update({r.image_id: r.file_name for r in dataset.images})
    return names


def run(args: argparse.Namespace) -> int:
    from segdist.proposals.store import open_proposals

    try:
        options = json.loads(args.storage_options) if args.storage_options else None
    except ValueError as exc:
        raise ConfigError(f"--storage-options is not valid JSON: {exc}") from None
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    if args.per_file < 1:
        raise ConfigError(f"--per-file must be >= 1, got {args.per_file}")
    dataset, dataset_format = _dataset(args)
    store = open_proposals(args.proposals, options)
    ids = [r.image_id for r in dataset.images] if dataset is not None else []

    if args.format == "detectron2":
        from segdist.export.detectron2 import export_detectron2

        info = export_detectron2(store, args.out, dataset_ids=ids, top_k=args.top_k,
                                 storage_options=options,
                                 file_names=_file_names(args, dataset, dataset_format, store,
                                                        options))
    elif args.format == "mmdet":
        if dataset is None:
            raise ConfigError("mmdet needs the dataset's file names: pass --dataset CONFIG or "
                              "--annotations URI --images URI")
        from segdist.export.mmdet import export_mmdet

        info = export_mmdet(store, args.out, dataset, top_k=args.top_k, storage_options=options)
    else:
        from segdist.export.original import export_original

        info = export_original(store, args.out, dataset_ids=ids, per_file=args.per_file,
                               gzip=args.gzip, top_k=args.top_k, storage_options=options)
    print(json.dumps({"format": args.format, **{k: v for k, v in info.items() if k != "files"},
                      "out": args.out, "files": len(info.get("files", [1]))}))
    return 0
