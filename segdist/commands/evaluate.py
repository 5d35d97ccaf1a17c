"""``segdist evaluate --proposals A [B ...] --dataset D``: exact AR (in-process or sharded on Ray),
report and plots."""

from __future__ import annotations

import argparse
import json
import logging
import posixpath
import sys
from typing import Any

HELP = "average recall of proposals (sharded, exact), with a report and plots"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--proposals", nargs="+", required=True, metavar="URI",
                        help="one or more proposal locations (segdist output, coco-json or parquet "
                             "folder, original props-<start>-<end>.json folder, or one COCO "
                             "results file); several are compared in one table and plot")
    parser.add_argument("--dataset", required=True,
                        help="ground truth: a run/dataset config YAML (its 'dataset' section, COCO "
                             "or VOC) or a COCO instances JSON URI")
    parser.add_argument("--images", default=None,
                        help="image folder URI (only to complete a COCO dataset; not read)")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate only the first N images by ascending id (e.g. 5000 for the "
                             "papers' COCO val2014 protocol)")
    parser.add_argument("--out", default=None,
                        help="report folder URI (default: <first proposals>/eval)")
    parser.add_argument("--names", nargs="+", default=None,
                        help="row names for the runs in the table and plots (default: folder names)")
    parser.add_argument("--iou-types", nargs="+", choices=("segm", "bbox"), default=None,
                        help="default: segm and bbox (segm skipped for box-only proposals)")
    parser.add_argument("--max-dets", type=int, default=1000,
                        help="proposals per image evaluated (COCOeval maxDets[-1]; default 1000)")
    parser.add_argument("--storage-options", default=None, metavar="JSON",
                        help='fsspec options for proposals, dataset and output, e.g. '
                             '\'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\'')
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (e.g. auto or ray://head:10001); default: "
                             "RAY_ADDRESS if set, else a local Ray on this machine")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="CPUs of the local Ray (default: all); 1 evaluates in this process "
                             "without Ray (as small runs always are, see docs/evaluation.md)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _storage_options(text: str | None) -> dict[str, Any]:
    from segdist.errors import ConfigError

    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"--storage-options is not valid JSON ({exc}); e.g. "
                          '\'{"client_kwargs": {"endpoint_url": "http://host:9000"}}\'') from None
    if not isinstance(value, dict):
        raise ConfigError("--storage-options must be a JSON object")
    return value


def load_ground_truth(dataset: str, images: str | None, limit: int | None,
                      storage_options: dict[str, Any]
                      ) -> tuple[dict[str, Any], dict[str, Any], list[int] | None]:
    """``(coco_gt, info, image_ids)`` from a config YAML (its ``dataset`` section) or an
    annotations URI.

    ``limit`` selects the first ``limit`` image ids (``image_ids``; None without a limit) but keeps
    the whole ground truth: proposals of the images after the limit (a run over the full split, the
    papers' protocol) are then outside the evaluated selection, not images of another dataset.
    """
    coco_gt, info = _load(dataset, images, storage_options)
    if not limit:
        return coco_gt, info, None
    ids = sorted(int(im["id"]) for im in coco_gt.get("images", []))[:limit]
    return coco_gt, {**info, "images": len(ids)}, ids


def _load(dataset: str, images: str | None,
          storage_options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    from segdist.data import load_dataset
    from segdist.errors import ConfigError

    if dataset.endswith((".yaml", ".yml")):
        from segdist.config import load_config

        cfg = load_config(_dataset_file_model(), dataset).dataset
        update: dict[str, Any] = {}
        if images:
            update["images"] = images
        if storage_options and not cfg.storage_options:
            update["storage_options"] = storage_options
        cfg = cfg.model_copy(update=update) if update else cfg
        if cfg.format == "images":
            raise ConfigError(f"{dataset}: dataset.format 'images' has no annotations, so there "
                              "is no ground truth to evaluate against; " + _NO_GT_HINT)
        ds = load_dataset(cfg)
        return ds.coco_gt, {"name": ds.name, "source": dataset, "format": cfg.format,
                            "images": len(ds)}
    from segdist.data.coco import load_coco

    ds = load_coco(dataset, images or posixpath.dirname(dataset.rstrip("/")), storage_options)
    return ds.coco_gt, {"name": ds.name, "source": dataset, "format": "coco", "images": len(ds)}


_NO_GT_HINT = ("average recall needs an annotated dataset (coco, lvis or voc); the proposals "
               "themselves are usable as they are (segdist export, segdist.proposals.store)")


def refuse_runs_without_ground_truth(uris: list[str], storage_options: dict[str, Any]) -> None:
    """Raise ConfigError when a proposals location is a run over an image collection without
    annotations (its manifest says ``dataset.format: images``): no ground truth has its ids."""
    from segdist.errors import ConfigError, StorageError
    from segdist.proposals.layout import manifest_uri
    from segdist.storage import read_bytes

    for uri in uris:
        try:
            doc = json.loads(read_bytes(manifest_uri(uri), storage_options))
        except (StorageError, ValueError, OSError):
            continue  # not a job output (a chunk folder, a single file): nothing to tell
        dataset = doc.get("dataset") if isinstance(doc, dict) else None
        if isinstance(dataset, dict) and dataset.get("format") == "images":
            raise ConfigError(f"the proposals at {uri} were made for an image collection without "
                              f"annotations ({dataset.get('name')!r}, dataset.format 'images'): "
                              "there is no ground truth to evaluate against; " + _NO_GT_HINT)


def _dataset_file_model():
    """The config file ``--dataset`` names, as ``segdist.config.load_config`` validates it: a run
    config's ``dataset:`` section (its other sections belong to other commands and are not checked
    here), or a bare dataset section."""
    from pydantic import BaseModel, ConfigDict, model_validator

    from segdist.config import DatasetConfig

    class DatasetFile(BaseModel):
        model_config = ConfigDict(extra="ignore", frozen=True)
        dataset: DatasetConfig

        @model_validator(mode="before")
        @classmethod
        def _bare_section(cls, raw: Any) -> Any:
            return raw if not isinstance(raw, dict) or "dataset" in raw else {"dataset": raw}

    return DatasetFile


def incomplete_warning(run) -> str | None:
    """What to tell about a job output (the job's chunk layout) evaluated without a complete
    manifest, or None: the images of chunks it lacks have no proposals, and count as misses."""
    uri = run.proposals_uri
    if run.kind not in ("parquet", "coco-json") or uri.endswith((".parquet", ".json", ".json.gz")):
        return None  # not a job's chunk folder
    again = "re-run segdist generate with the same config to complete it"
    if run.manifest is None:
        return (f"{uri} has no manifest.json: the job that wrote it may not have finished, and "
                f"images without proposals count as misses; {again}")
    if run.manifest.get("complete") is False:
        totals = run.manifest.get("totals") or {}
        return (f"{uri} is incomplete (its manifest: {totals.get('chunks_committed', '?')} of "
                f"{totals.get('chunks', '?')} chunks committed, {totals.get('chunks_failed', '?')} "
                f"failed): the images of the missing chunks count as misses; {again}")
    return None


def run(args: argparse.Namespace) -> int:
    from segdist.errors import ConfigError
    from segdist.evaluation.report import build_report, default_out, markdown_table, write_report
    from segdist.evaluation.sharded import evaluate_proposals
    from segdist.storage import check_writable

    if args.names and len(args.names) != len(args.proposals):
        raise ConfigError(f"--names gives {len(args.names)} names for {len(args.proposals)} "
                          "--proposals locations; give one per location or none")
    if args.max_dets < 1:
        raise ConfigError(f"--max-dets must be >= 1, got {args.max_dets}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    options = _storage_options(args.storage_options)
    refuse_runs_without_ground_truth(args.proposals, options)
    out = args.out or default_out(args.proposals[0])
    check_writable(out, options)  # fail before the work, not after it

    coco_gt, info, image_ids = load_ground_truth(args.dataset, args.images, args.limit, options)
    # Each run decides where it is evaluated: in this process when small (or --num-cpus 1), else
    # on Ray (an embedded local cluster unless --address / RAY_ADDRESS names one).
    runs = [evaluate_proposals(uri, coco_gt, image_ids=image_ids, iou_types=args.iou_types,
                               max_dets=args.max_dets, storage_options=options,
                               address=args.address, num_cpus=args.num_cpus,
                               progress=not args.no_progress)
            for uri in args.proposals]
    for r in runs:
        warning = incomplete_warning(r)
        if warning:
            print(f"segdist evaluate: warning: {warning}", file=sys.stderr)
    report = build_report(runs, info, args.names)
    written = write_report(report, out, options)
    print(markdown_table(report), end="")
    print(f"report: {written['eval.json']} (+ table.md, ar_vs_proposals.svg, recall_vs_iou.svg)")
    return 0
