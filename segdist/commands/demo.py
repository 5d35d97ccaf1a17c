"""``segdist demo``: the whole pipeline on a synthetic dataset, trained vs untrained, in minutes.

1. writes the synthetic "shapes" dataset (train split + held-out val split);
2. trains a small DeepMask (ResNet-18 trunk, small windows) on the train split, in this process;
3. saves an *untrained* DeepMask of the same architecture (same seed as the trained one's start);
4. generates proposals for the held-out images with both models through the Ray job;
5. evaluates both (COCO average recall, class-agnostic, up to 1000 proposals per image);
6. draws both models' top proposals over a held-out image (PNG) and prints the AR table.

``--large`` (alias ``--gpu``) runs the same pipeline much bigger, for a machine with a GPU.
Every output lies under ``--out`` (default ./segdist-demo); the command ends by listing them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass

HELP = "whole pipeline on a synthetic dataset: train, generate, evaluate, compare"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo run (see SMALL and LARGE)."""

    images: int  # synthetic images, train + val
    val_fraction: float
    min_side: int
    max_side: int
    max_objects: int
    trunk: str
    i_sz: int
    o_sz: int
    batch_size: int
    steps: int  # training steps (the LR drops for the last quarter)
    lr: float
    optimizer: str  # "sgd" (the original's) or "adamw"
    train_minutes: float  # training stops here even if `steps` are not done (a slow machine)
    eval_patches: int  # held-out patches of the per-patch evaluation after each quarter
    scales: tuple[float, float, float]  # pyramid min, max, step (log2)
    device: str
    loader_workers: int
    job_workers: int


# Chosen by experiment on 2 shared CPU cores (docs/benchmarks.md, "Training and the demo").
SMALL = DemoPlan(images=400, val_fraction=0.1, min_side=128, max_side=192, max_objects=4,
                 trunk="resnet18", i_sz=64, o_sz=32, batch_size=32, steps=320, lr=1e-3,
                 optimizer="adamw", train_minutes=6.5, eval_patches=256,
                 scales=(-2.5, 1.0, 0.5), device="cpu", loader_workers=1, job_workers=2)
LARGE = DemoPlan(images=4000, val_fraction=0.05, min_side=160, max_side=512, max_objects=8,
                 trunk="resnet50", i_sz=160, o_sz=56, batch_size=32, steps=20000, lr=1e-3,
                 optimizer="adamw", train_minutes=60.0, eval_patches=2048,
                 scales=(-2.5, 1.0, 0.5), device="auto", loader_workers=8, job_workers=1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="segdist-demo",
                        help="folder (or any fsspec URI) for every output (default ./segdist-demo)")
    parser.add_argument("--large", "--gpu", dest="large", action="store_true",
                        help="a much bigger run (4000 images, ResNet-50, 20k steps) for a GPU")
    parser.add_argument("--steps", type=int, default=None, help="training steps (override)")
    parser.add_argument("--seed", type=int, default=0, help="dataset and training seed")
    parser.add_argument("--address", default=None,
                        help="Ray cluster for the proposal and evaluation jobs (default: local)")


def run(args: argparse.Namespace) -> int:
    plan = LARGE if args.large else SMALL
    if args.steps is not None:
        plan = DemoPlan(**{**asdict(plan), "steps": max(1, args.steps)})
    report = run_demo(args.out, plan, seed=args.seed, address=args.address)
    print(report)
    return 0


def _torch_threads() -> int:
    """Threads for training: the cores not already busy (two torch threads on a core that another
    process keeps busy run many times slower than one)."""
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, round(cores - busy)))


def _abs(uri: str) -> str:
    return uri if "://" in uri else os.path.abspath(uri)


def run_demo(out: str, plan: DemoPlan, *, seed: int = 0, address: str | None = None) -> str:
    """Run the demo under ``out``; returns the printed report (also written to OUT/demo.txt).

    Steps (see the module docstring): data, training, proposals + evaluation of both models, the
    overlay picture, the report.
    """
    from segdist.data import load_dataset

    out = _abs(out)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    split = _write_data(out, plan, seed, timings)
    val = load_dataset(split["val"])
    trained, untrained, result, threads = _train(out, plan, seed, split, timings)
    models = {"trained": trained, "untrained": untrained}
    ar = _generate_and_evaluate(out, plan, split["val"], val, models, address, timings)
    overlay_uri, shown = _overlay(out, val)
    return _report(out, plan, seed, ar, result, models, timings, time.perf_counter() - t_start,
                   overlay_uri, shown, threads, n_val=len(val))


def _write_data(out: str, plan: DemoPlan, seed: int, timings: dict[str, float]) -> dict:
    """Step 1: the synthetic dataset (kept if already there); the train and val dataset configs."""
    from segdist.config import DatasetConfig
    from segdist.data.synthetic import make_synthetic
    from segdist.storage import exists, join

    t = time.perf_counter()
    data = join(out, "data")
    ann = {s: join(data, "annotations", f"instances_{s}.json") for s in ("train", "val")}
    if not exists(ann["val"]):
        log.info("writing %d synthetic images to %s", plan.images, data)
        make_synthetic(data, plan.images, seed=seed, min_side=plan.min_side,
                       max_side=plan.max_side, max_objects=plan.max_objects, crowd_prob=0.0,
                       val_fraction=plan.val_fraction)
    timings["data"] = time.perf_counter() - t
    return {s: DatasetConfig(format="coco", annotations=ann[s], images=join(data, "images"))
            for s in ("train", "val")}


def _train(out: str, plan: DemoPlan, seed: int, split: dict, timings: dict[str, float]):
    """Step 2-3: the untrained model saved, then training in this process;
    (trained checkpoint URI, untrained checkpoint URI, the TrainResult, torch threads)."""
    from segdist.config import validate
    from segdist.models.checkpoint import save_checkpoint
    from segdist.storage import join
    from segdist.training.config import TrainConfig
    from segdist.training.trainer import fit, initial_model

    t = time.perf_counter()
    spe = max(1, plan.steps // 4)
    threads = _torch_threads() if plan.device == "cpu" else None
    cfg = validate(TrainConfig, {
        "model": {"arch": "deepmask", "trunk": plan.trunk, "i_sz": plan.i_sz, "o_sz": plan.o_sz},
        "data": {"train": split["train"].model_dump(), "val": split["val"].model_dump(),
                 "loader_workers": plan.loader_workers},
        # Four epochs; the LR drops 10x for the last one (the original's schedule, compressed).
        "optim": {"name": plan.optimizer, "batch_size": plan.batch_size, "steps_per_epoch": spe,
                  "epochs": -(-plan.steps // spe), "lr_schedule": [[1, plan.lr], [4, plan.lr / 10]]},
        "eval": {"every_epochs": 1, "patches": plan.eval_patches, "batch_size": 64},
        "output": {"uri": join(out, "train")},
        "resources": {"torch_threads": threads},
        "device": plan.device, "seed": seed, "log_every": 20,
    }, "demo training config")
    log.info("training a %s DeepMask (i_sz %d) for %d steps of %d windows (%s torch threads), "
             "at most %.1f min", plan.trunk, plan.i_sz, cfg.total_steps, plan.batch_size,
             threads or "default", plan.train_minutes)
    untrained_uri = join(out, "untrained.safetensors")
    save_checkpoint(initial_model(cfg), untrained_uri, {"note": "the trained run's initial weights"})
    result = fit(cfg, max_seconds=plan.train_minutes * 60)
    trained_uri = result.best_model or result.final_model or join(out, "train", "final.safetensors")
    timings["train"] = time.perf_counter() - t
    return trained_uri, untrained_uri, result, threads


def _generate_and_evaluate(out: str, plan: DemoPlan, val_cfg, val, models: dict[str, str],
                           address: str | None, timings: dict[str, float]) -> dict[str, dict]:
    """Step 4-5: proposals for the held-out images with each model through the Ray job, and their
    AR; {model label: {"segm"|"bbox": metrics}}."""
    from segdist.config import JobConfig, OutputConfig, ResourcesConfig, model_config
    from segdist.errors import SegdistError
    from segdist.evaluation.metrics import summarize
    from segdist.evaluation.sharded import evaluate_proposals
    from segdist.job.driver import run_job
    from segdist.ray_connect import connect_ray
    from segdist.storage import join

    started = connect_ray(address)
    ar: dict[str, dict] = {}
    try:
        for name, weights in models.items():
            t = time.perf_counter()
            job = JobConfig(
                dataset=val_cfg,
                model=model_config(name="deepmask", weights=weights, proposals=1000,
                                   scales={"min": plan.scales[0], "max": plan.scales[1],
                                           "step": plan.scales[2]},
                                   device="auto" if plan.device == "auto" else "cpu", batch_size=4),
                output=OutputConfig(uri=join(out, "proposals", name), chunk_size=max(
                    1, -(-len(val) // (2 * plan.job_workers)))),
                resources=ResourcesConfig(num_workers=plan.job_workers, cpus_per_worker=1,
                                          decode_threads=1),
            )
            res = run_job(job, address=address, overwrite=True, progress=False)
            if not res.complete:
                raise SegdistError(f"the proposal job for the {name} model did not complete:\n"
                                   f"{res.summary()}")
            timings[f"generate_{name}"] = time.perf_counter() - t
            t = time.perf_counter()
            run_eval = evaluate_proposals(job.output.uri, val.coco_gt, max_dets=1000,
                                          progress=False)
            ar[name] = {k: summarize(c)["metrics"] for k, c in run_eval.counts.items()}
            timings[f"evaluate_{name}"] = time.perf_counter() - t
    finally:
        if started:
            import ray

            ray.shutdown()
    return ar


def _overlay(out: str, val) -> tuple[str, int]:
    """Step 6: trained (left) and untrained (right) top proposals on the held-out image with the
    most objects, enlarged 2x when small; (PNG URI, image id)."""
    import numpy as np

    from segdist.imageio import read_image
    from segdist.proposals.store import open_proposals
    from segdist.storage import atomic_write, join
    from segdist.visualize import draw_proposals, encode_png

    counts: dict[int, int] = {}
    for a in val.coco_gt["annotations"]:
        counts[a["image_id"]] = counts.get(a["image_id"], 0) + 1
    first = max(val.images, key=lambda r: (counts.get(r.image_id, 0), -r.image_id))
    image = read_image(first.uri)
    panels = [draw_proposals(image, open_proposals(join(out, "proposals", name)).get(first.image_id),
                             top=5) for name in ("trained", "untrained")]
    gap = np.full((image.shape[0], 6, 3), 255, np.uint8)
    overlay = np.concatenate([panels[0], gap, panels[1]], axis=1)
    if max(image.shape[:2]) < 256:
        overlay = overlay.repeat(2, axis=0).repeat(2, axis=1)
    overlay_uri = join(out, "overlay.png")
    atomic_write(overlay_uri, encode_png(overlay))
    return overlay_uri, first.image_id


def _report(out: str, plan: DemoPlan, seed: int, ar: dict, result, models: dict[str, str],
            timings: dict[str, float], total: float, overlay_uri: str, shown: int,
            threads: int | None, n_val: int) -> str:
    """The AR table and where every output is; written to OUT/demo.txt and OUT/demo.json."""
    from segdist.storage import atomic_write, join

    t_ar, u_ar = ar["trained"]["segm"]["AR@100"], ar["untrained"]["segm"]["AR@100"]
    rows = []
    for kind in ("segm", "bbox"):
        for key in ("AR@10", "AR@100", "AR@1000"):
            a, b = ar["trained"][kind].get(key), ar["untrained"][kind].get(key)
            ratio = f"{a / b:6.1f}x" if a is not None and b else "      -"
            rows.append(f"  {kind:<5} {key:<8} {_f(a):>9} {_f(b):>11} {ratio}")
    best = result.best or {}
    patch = best.get("patch", {})
    lines = [
        "",
        f"segdist demo: {n_val} held-out synthetic images, {plan.trunk} DeepMask (i_sz "
        f"{plan.i_sz}) trained {result.step} steps x {plan.batch_size} windows",
        f"per-patch (held-out, best step {best.get('step', '-')}): mean IoU "
        f"{_f(patch.get('mean_iou'))}, IoU>=.5 {_f(patch.get('iou50'))}, IoU>=.7 "
        f"{_f(patch.get('iou70'))}",
        "average recall (COCO, class-agnostic, <= 1000 proposals per image):",
        f"  {'type':<5} {'metric':<8} {'trained':>9} {'untrained':>11}  ratio",
        *rows,
        f"trained AR@100 (segments) = {_f(t_ar)}, {t_ar / u_ar:.1f}x the untrained model's"
        if u_ar else f"trained AR@100 (segments) = {_f(t_ar)}",
        "time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + f"; total {total:.0f} s",
        "outputs:",
        f"  dataset            {join(out, 'data')}",
        f"  training run       {join(out, 'train')} (config.yaml, metrics.jsonl, checkpoints/)",
        f"  trained model      {models['trained']}",
        f"  untrained model    {models['untrained']}",
        f"  proposals          {join(out, 'proposals', 'trained')}, {join(out, 'proposals', 'untrained')}",
        f"  overlay            {overlay_uri} (top 5 proposals of image {shown}: "
        "trained left, untrained right)",
        f"  numbers            {join(out, 'demo.json')}",
    ]
    report = "\n".join(lines)
    summary = {"plan": asdict(plan), "seed": seed, "steps": result.step, "best": best,
               "ar": ar, "timings_s": timings, "total_s": total, "val_images": n_val,
               "trained_model": models["trained"], "untrained_model": models["untrained"],
               "torch_threads": threads, "history": result.history}
    atomic_write(join(out, "demo.json"), json.dumps(summary, indent=1).encode())
    atomic_write(join(out, "demo.txt"), report.encode())
    return report


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"
