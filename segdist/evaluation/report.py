"""The evaluation report: ``eval.json``, a Markdown table in the papers' layout, and PNG plots.

Files (every one written atomically through ``segdist.storage``) under the report folder:

    eval.json             protocol, dataset, and per run: metrics, curves, counts, the run's
                          manifest summary (model, weights sha256, config) when it has one
    table.md              rows = runs; box AR@10/100/1000, segment AR@10/100/1000, AR S/M/L
    ar_vs_proposals.svg   AR vs proposals per image (log x), all runs
    recall_vs_iou.svg     recall vs IoU threshold, all runs

By default the folder is ``<proposals>/eval`` (for a single proposals file: ``<file>.eval``
beside it); ``--out`` puts it anywhere.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from segdist import __version__, storage
from segdist.evaluation.metrics import summarize
from segdist.evaluation.plots import ar_vs_proposals_svg, recall_vs_iou_svg
from segdist.evaluation.protocol import (AREA_LABELS, AREA_RANGES, EXTRA_IOUS, MAX_DETS,
                                         STANDARD_IOUS)
from segdist.evaluation.sharded import EvalRun
from segdist.proposals import layout

REPORT_FILES = ("eval.json", "table.md", "ar_vs_proposals.svg", "recall_vs_iou.svg")
#: Manifest fields copied into eval.json (what identifies the run that made the proposals).
_MANIFEST_KEYS = ("model", "config", "dataset", "complete", "totals", "written")


def default_out(proposals_uri: str) -> str:
    """``<folder>/eval`` for a proposals folder (``layout.EVAL_DIR``), ``<file>.eval`` beside a
    single proposals file."""
    uri = proposals_uri.rstrip("/")
    base = posixpath.basename(uri)
    if base.endswith((".json", ".json.gz", ".parquet")):
        return uri + ".eval"
    return storage.join(uri, layout.EVAL_DIR)


def run_names(runs: Sequence[EvalRun]) -> list[str]:
    """Short unique row names: the location's last path part (the model name when they clash)."""
    names = [posixpath.basename(r.proposals_uri.rstrip("/")) or r.proposals_uri for r in runs]
    if len(set(names)) < len(names):
        names = [f"{r.model} ({r.proposals_uri})" for r in runs]
    return names


def run_entry(run: EvalRun, name: str) -> dict[str, Any]:
    """One run's part of eval.json: identity, timing, and per IoU type metrics/curves/counts."""
    entry: dict[str, Any] = {
        "name": name, "proposals": run.proposals_uri, "layout": run.kind, "model": run.model,
        "images_evaluated": run.images, "shards": run.shards,
        "images_outside_selection": run.images_outside, "seconds": round(run.seconds, 3),
        "mode": run.mode, "shard_seconds": _shard_seconds(run),
        "manifest": ({k: run.manifest.get(k) for k in _MANIFEST_KEYS if k in run.manifest}
                     if run.manifest else None),
    }
    for iou_type, counts in run.counts.items():
        entry[iou_type] = summarize(counts)
    return entry


def _shard_seconds(run: EvalRun) -> dict[str, float]:
    """Seconds summed over shards per part (read, gt, segm, bbox): where the time went."""
    total: dict[str, float] = {}
    for r in run.shard_results:
        for k, v in r.seconds.items():
            total[k] = total.get(k, 0.0) + v
    return {k: round(v, 3) for k, v in sorted(total.items())}


def build_report(runs: Sequence[EvalRun], dataset: Mapping[str, Any],
                 names: Sequence[str] | None = None) -> dict[str, Any]:
    """eval.json as plain data (see the module docstring)."""
    names = list(names) if names is not None else run_names(runs)
    if len(names) != len(runs):
        raise ValueError(f"{len(runs)} runs but {len(names)} names")
    return {
        "segdist_version": __version__,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "protocol": {
            "evaluator": "pycocotools COCOeval semantics (useCats=0, category_id 1), exact sharded",
            "iou_thresholds": STANDARD_IOUS.tolist(),
            "curve_extra_iou_thresholds": EXTRA_IOUS.tolist(),
            "area_ranges": {lbl: list(rng) for lbl, rng in zip(AREA_LABELS, AREA_RANGES)},
            "max_dets": list(MAX_DETS),
        },
        "dataset": dict(dataset),
        "runs": [run_entry(r, n) for r, n in zip(runs, names)],
    }


def _fmt(v: float | None) -> str:
    """Papers' style: ``.331``; ``-`` when undefined or not evaluated."""
    if v is None:
        return "-"
    s = f"{v:.3f}"
    return s[1:] if s.startswith("0.") else s


def _metric(run: Mapping[str, Any], iou_type: str, key: str) -> float | None:
    return run.get(iou_type, {}).get("metrics", {}).get(key)


def _table_counts(runs: Sequence[Mapping[str, Any]]) -> tuple[list[int], int | None]:
    """The proposal counts the table's AR columns are labelled with, and the most proposals any
    image of any run has (None when unknown).

    COCOeval caps each image at maxDets: with at most 100 proposals per image, AR@1000 is AR@100
    again. The columns stop at the first standard count that covers every run's images (10, 100,
    1000; those the evaluation reported), so a run of 100 proposals reads AR@10 and AR@100.
    """
    reported = sorted({int(k[3:]) for r in runs for t in ("segm", "bbox") if t in r
                       for k in r[t]["metrics"] if k.startswith("AR@")}) or [max(MAX_DETS)]
    present = [r[t]["counts"].get("max_proposals_per_image") for r in runs
               for t in ("segm", "bbox") if t in r]
    most = max(present) if present and None not in present else None
    top = reported[-1] if not most else min((m for m in reported if m >= most),
                                            default=reported[-1])
    return [m for m in reported if m <= top], most


def _area_key(run: Mapping[str, Any], iou_type: str, area: str, top: int) -> float | None:
    """AR of an area range at ``top`` proposals: the evaluation reports area ARs at its two
    largest counts; any count from ``top`` up is the same number when no image has more."""
    metrics = run.get(iou_type, {}).get("metrics", {})
    counts = sorted(int(k.rsplit("@", 1)[1]) for k in metrics if k.startswith(f"AR_{area}@"))
    at = next((m for m in counts if m >= top), None)
    return None if at is None else metrics[f"AR_{area}@{at}"]


def markdown_table(report: Mapping[str, Any]) -> str:
    """Rows = runs; columns as the DeepMask/SharpMask tables, then a details table."""
    runs = report["runs"]
    dets, most = _table_counts(runs)
    top = dets[-1]
    head = (["run", "model"] + [f"box AR@{m}" for m in dets] + [f"segm AR@{m}" for m in dets]
            + ["AR^S", "AR^M", "AR^L"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        sml_type = "segm" if "segm" in r else "bbox"
        cells = [r["name"], str(r["model"])]
        cells += [_fmt(_metric(r, "bbox", f"AR@{m}")) for m in dets]
        cells += [_fmt(_metric(r, "segm", f"AR@{m}")) for m in dets]
        sml = [_fmt(_area_key(r, sml_type, a, top)) for a in ("small", "medium", "large")]
        if sml_type == "bbox":
            sml = [s + " (box)" if s != "-" else s for s in sml]
        lines.append("| " + " | ".join(cells + sml) + " |")
    lines.append("")
    lines.append(f"AR: average recall over IoU .50:.05:.95 with {'/'.join(map(str, dets))} "
                 f"proposals per image. AR^S/M/L: segment AR at {top} proposals for small "
                 "(< 32^2 px), medium and large (> 96^2 px) objects (box AR, marked, for box-only "
                 "runs).")
    if most is not None and most < top:
        lines.append(f"No image has more than {most} proposals: AR@{top} is AR@{most}.")
    lines.append("")
    detail_keys = list(dict.fromkeys(["AR_small@100", "AR_medium@100", "AR_large@100",
                                      "R@0.5@100", f"R@0.5@{top}", "R@0.7@100", f"R@0.7@{top}"]))
    head2 = ["run", "type"] + detail_keys + ["images", "proposals", "seconds"]
    lines += ["| " + " | ".join(head2) + " |", "|" + "---|" * len(head2)]
    for r in runs:
        for t in ("segm", "bbox"):
            if t not in r:
                continue
            cells = [r["name"], t] + [_fmt(_metric(r, t, k)) for k in detail_keys]
            cells += [str(r[t]["counts"]["images"]), str(r[t]["counts"]["proposals"]),
                      f"{r['seconds']:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(report: Mapping[str, Any], out_uri: str,
                 storage_options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Write the four report files under ``out_uri``; returns ``{file name: URI}``."""
    runs = report["runs"]
    files = {
        "eval.json": (json.dumps(report, indent=1) + "\n").encode("utf-8"),
        "table.md": markdown_table(report).encode("utf-8"),
        "ar_vs_proposals.svg": ar_vs_proposals_svg(runs),
        "recall_vs_iou.svg": recall_vs_iou_svg(runs),
    }
    written = {}
    for name in REPORT_FILES:
        uri = storage.join(out_uri, name)
        storage.atomic_write(uri, files[name], storage_options)
        written[name] = uri
    return written
