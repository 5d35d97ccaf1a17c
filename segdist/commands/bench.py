"""``segdist bench``: images/s and peak memory per model preset, end to end (decoded image -> RLE).

Each (preset, workload) runs in a fresh subprocess so that its peak memory is its own: on CPU the
child's peak resident set size (``ru_maxrss`` from ``wait4``) and its resident size after the model
was loaded (the increase is what inference needed); on CUDA ``torch.cuda.max_memory_allocated``.
Workloads: N synthetic ``--size`` images (default 640x480, COCO-like), and one ``--big`` image
(default 4000x3000); k proposals each (default 1000), masks encoded to RLE. Timing excludes model
loading and one warm-up image. Random weights (the cost does not depend on the weights' values,
except Mask R-CNN's number of detections, which is always k with score threshold 0).

``--profile`` measures what bounds a GPU instead, on any device (:mod:`segdist.profiling`): a chunk
of ``--images`` synthetic images with a COCO-like size mix (50% 640x480, 20% 480x640, 30% long side
640 and short side drawn from 300-640, seeded) goes through the proposer in one call, as a worker
hands it a window of decoded images, taking the GPU branch wherever the code branches on the
device; reported per image: non-view aten ops, sync-type ops, FLOPs (and the trunk's FLOPs against
the untiled figure), host CPU milliseconds of JPEG decoding, the RLE host part and the COCO-JSON /
Parquet encoders, peak memory and images/s (with the counting on).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from segdist.errors import ConfigError

HELP = "images/s and peak memory per model preset (decoded image to RLE), on this machine's device"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from segdist.proposers import PROPOSERS

    p.add_argument("--presets", default="all",
                   help=f"comma-separated presets or 'all' ({', '.join(PROPOSERS)})")
    p.add_argument("--images", type=int, default=8, help="timed images of --size per preset")
    p.add_argument("--size", default="640x480",
                   help="WxH of the COCO-like images, or 'mix' for the profile's size mix")
    p.add_argument("--big", default="4000x3000", help="WxH of the large image ('none' to skip)")
    p.add_argument("--big-max-side", type=int, default=None,
                   help="max_image_side for the large image (default: full resolution)")
    p.add_argument("--proposals", type=int, default=1000)
    p.add_argument("--trunk", default="resnet50", choices=["resnet50", "resnet34", "resnet18"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--memory-budget-mb", type=int, default=1024)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads in the worker (default: torch's own choice)")
    p.add_argument("--json", default=None, help="also write the results as JSON to this path")
    p.add_argument("--profile", action="store_true",
                   help="count ops, syncs, FLOPs and host CPU per image over a COCO-like size mix "
                        "(the GPU path, measured on any device; see docs/benchmarks.md)")
    p.add_argument("--window", type=int, default=None,
                   help="images per proposer call (default: --profile all --images at once, "
                        "else --batch-size)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one measurement


def _size(text: str) -> tuple[int, int] | str:
    if text.lower() == "mix":
        return "mix"
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"image size {text!r}: expected WxH, e.g. 640x480") from None
    if w < 16 or h < 16:
        raise ConfigError(f"image size {text!r} is too small (at least 16x16)")
    return w, h


def _images(n: int, w: int, h: int, seed: int):
    """Deterministic COCO-like test images: smooth background plus a few bright/dark shapes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(n):
        img = np.empty((h, w, 3), np.float32)
        for c in range(3):
            img[..., c] = rng.uniform(40, 200) + rng.uniform(-30, 30) * (xx / w) + rng.uniform(-30, 30) * (yy / h)
        for _ in range(6):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            r = rng.uniform(0.05, 0.3) * min(h, w)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
        out.append(np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8))
    return out


def _mix_images(sizes: list[tuple[int, int]]):
    """One :func:`_images` image per ``(width, height)`` of ``sizes`` (the profile's size mix),
    image ``i`` seeded ``100 + i``: the same pixels for ``--size mix`` and ``--profile``."""
    return [_images(1, w, h, seed=100 + i)[0] for i, (w, h) in enumerate(sizes)]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _measure(spec: dict) -> dict:
    """One measurement, inside the worker process."""
    import torch

    from segdist.config import model_config
    from segdist.proposers import build_proposer

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cfg = model_config(**spec["model"])
    gen = build_proposer(cfg)
    if spec["size"] == "mix":  # the profile's COCO-like size mix
        from segdist.commands.bench_profile import size_mix
        imgs = _images(1, 320, 240, seed=0) + _mix_images(size_mix(spec["n"]))
    else:
        w, h = spec["size"]
        imgs = _images(1, 320, 240, seed=0) + _images(spec["n"], w, h, seed=1)
    cuda = gen.device.startswith("cuda")
    gen(imgs[:1], [0])  # warm-up on a small image (allocator, kernels, lazy imports), not timed
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_loaded = _rss_mb()
    t0 = time.perf_counter()
    n_props = 0
    bs = cfg.batch_size
    # as a worker calls it: windows of images (the proposer batches them itself)
    window = max(bs, spec.get("window") or bs)
    for s in range(1, len(imgs), window):
        out = gen(imgs[s:s + window], list(range(s, s + len(imgs[s:s + window]))))
        n_props += sum(len(p) for p in out)
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    res = {"images_per_s": spec["n"] / dt, "s_per_image": dt / spec["n"],
           "proposals_per_image": n_props / spec["n"], "rss_loaded_mb": rss_loaded,
           "device": str(gen.device), "torch_threads": torch.get_num_threads()}
    if cuda:
        res["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        res["gpu"] = torch.cuda.get_device_name()
    return res


def _spawn(spec: dict) -> dict:
    """Run a measurement in a child and read its own peak RSS with wait4 (not the maximum over all
    children that getrusage would give)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: exec the worker with stdout on the pipe
        os.close(r)
        os.dup2(w, 1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.execv(sys.executable, [sys.executable, "-m", "segdist", "bench", "--worker",
                                  json.dumps(spec)])
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not out.strip():
        return {"error": f"worker exited with {os.waitstatus_to_exitcode(status)}"}
    res = json.loads(out.strip().splitlines()[-1])
    res["cpu_peak_rss_mb"] = usage.ru_maxrss / 1024
    return res


def run(args: argparse.Namespace) -> int:
    if args.worker:
        spec = json.loads(args.worker)
        if spec.get("profile"):
            from segdist.commands.bench_profile import measure
            print(json.dumps(measure(spec)))
        else:
            print(json.dumps(_measure(spec)))
        return 0
    from segdist.proposers import PROPOSERS

    presets = list(PROPOSERS) if args.presets == "all" else [p.strip() for p in args.presets.split(",")]
    bad = [p for p in presets if p not in PROPOSERS]
    if bad:
        raise ConfigError(f"unknown presets {bad}; choose from {list(PROPOSERS)}")
    if args.images < 1:
        raise ConfigError(f"--images must be >= 1 (got {args.images})")
    if args.profile:
        return _run_profile(args, presets)
    workloads = [("coco", _size(args.size), args.images, None)]
    if args.big.lower() != "none":
        workloads.append(("big", _size(args.big), 1, args.big_max_side))
    rows = []
    for preset in presets:
        for label, size, n, max_side in workloads:
            model = _model(args, preset, max_image_side=max_side)
            res = _spawn({"model": model, "size": size, "n": n, "threads": args.threads,
                          "window": args.window})
            name = "size mix" if size == "mix" else f"{size[0]}x{size[1]}"
            res.update(preset=preset, workload=name
                       + (f" (max side {max_side})" if max_side else ""), images=n)
            rows.append(res)
            _print_row(res)
    return _report(args.json, rows)


def _model(args: argparse.Namespace, preset: str, **options) -> dict:
    """The model config dict (for :func:`segdist.config.model_config`) of ``preset`` from the
    command's options; ``trunk``, ``channels_last`` and the extra ``options`` go only to the
    families whose config has them."""
    from segdist.proposers import config_class

    family = config_class(preset).model_fields
    model = dict(name=preset, proposals=args.proposals, device=args.device,
                 precision=args.precision, batch_size=args.batch_size,
                 memory_budget_mb=args.memory_budget_mb)
    for key, value in {"trunk": args.trunk, "channels_last": args.channels_last, **options}.items():
        if key in family:
            model[key] = value
    return model


def _report(path: str | None, rows: list[dict]) -> int:
    """Write ``rows`` as JSON to ``path`` (atomically; nothing without a path); the exit code:
    1 when a measurement failed."""
    if path:
        from segdist.storage import atomic_write

        atomic_write(path, json.dumps(rows, indent=2).encode())
    return 0 if all("error" not in r for r in rows) else 1


def _run_profile(args: argparse.Namespace, presets: list[str]) -> int:
    """``--profile``: one child per preset over the size mix; a table row each (and JSON)."""
    rows = []
    print("| preset | images | ops/img | syncs/img | TFLOP/img | trunk TFLOP/img (untiled) | "
          "host ms/img: decode, RLE host, COCO-JSON, Parquet | peak RSS MB | img/s (counting) |")
    for preset in presets:
        res = _spawn({"profile": True, "model": _model(args, preset), "n": args.images, "seed": 0,
                      "window": args.window, "threads": args.threads})
        res.update(preset=preset)
        rows.append(res)
        if "error" in res:
            print(f"| {preset} | error: {res['error']} |", flush=True)
            continue
        h = res["host_ms_per_image"]
        trunk = ("-" if res["trunk_tflops_per_image"] is None else
                 f"{res['trunk_tflops_per_image']:.3f} ({res['untiled_trunk_tflops_per_image']:.3f})")
        print(f"| {preset} | {res['images']} | {res['ops_per_image']:.0f} | "
              f"{res['syncs_per_image']:.2f} | {res['tflops_per_image']:.3f} | {trunk} | "
              f"{h['decode']:.1f}, {h.get('rle_host', 0):.2f}, "
              f"{h.get('coco_json_segm', 0) + h['coco_json_bbox']:.2f}, {h['parquet']:.2f} | "
              f"{res['peak_rss_mb']:.0f} | {res['images_per_s_counting']:.3f} |", flush=True)
    return _report(args.json, rows)


def _print_row(r: dict) -> None:
    if "error" in r:
        print(f"| {r['preset']} | {r['workload']} | error: {r['error']} |", flush=True)
        return
    mem = (f"{r['cuda_peak_mb']:.0f} MB CUDA" if "cuda_peak_mb" in r else
           f"{r['cpu_peak_rss_mb']:.0f} MB RSS peak ({r['rss_loaded_mb']:.0f} MB after loading)")
    print(f"| {r['preset']} | {r['workload']} | {r['images']} | {r['images_per_s']:.3f} | "
          f"{r['s_per_image']:.2f} | {r['proposals_per_image']:.0f} | {mem} | {r['device']} |",
          flush=True)
