"""``segdist bench --profile``: one preset's GPU-path costs per image, measured on any device.

Runs inside the bench's child process (so its peak memory is its own); see
:mod:`segdist.profiling` for what is counted and :mod:`segdist.commands.bench` for the command.
"""

from __future__ import annotations

import io
import time
from collections import Counter

import numpy as np


def size_mix(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """(width, height) of ``n`` COCO-like images: 50% 640x480, 20% 480x640, the rest long side 640
    and short side uniform in 300..640 (landscape or portrait at random), in a seeded order."""
    rng = np.random.default_rng(seed)
    n_land, n_port = round(0.5 * n), round(0.2 * n)
    sizes = [(640, 480)] * n_land + [(480, 640)] * n_port
    for _ in range(n - n_land - n_port):
        short = int(rng.integers(300, 641))
        sizes.append((640, short) if rng.random() < 0.5 else (short, 640))
    return [sizes[i] for i in rng.permutation(n)]


def _jpeg(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _trunk_flops(proposer, sizes: list[tuple[int, int]], counter_cls) -> float | None:
    """FLOPs of the dense trunk over every pyramid level of ``sizes`` untiled at batch 1 (on the
    meta device: shapes only), or None for a proposer without a pyramid."""
    import copy

    import torch

    model, settings = getattr(proposer, "model", None), getattr(proposer, "settings", None)
    if model is None or not hasattr(model, "dense") or settings is None:
        return None
    from segdist.proposers.dense.pyramid import pyramid_levels

    meta = copy.deepcopy(model)
    # flop_counter counts convolutions and matrix products only: BatchNorms (which its meta
    # decomposition trips on) are replaced by identities without changing the count.
    for mod in list(meta.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
                setattr(mod, name, torch.nn.Identity())
    meta = meta.to("meta")
    pad = model.cfg.i_sz // 2
    total = 0
    for w, h in sizes:
        for lv in pyramid_levels(h, w, settings):
            x = torch.empty(1, 3, lv.height + 2 * pad, lv.width + 2 * pad, device="meta")
            with counter_cls(display=False) as fc, torch.inference_mode():
                meta.dense(x)
            total += _module_flops(fc, "Trunk")
    return float(total)


def _module_flops(counter, cls_name: str) -> int:
    """FLOPs flop_counter attributed to the outermost modules of class ``cls_name`` (the ResNet
    trunk: tiles and halos included when the run was tiled)."""
    counts = counter.get_flop_counts()
    names = [k for k in counts if k.split(".")[-1] == cls_name or k.endswith(f"({cls_name})")]
    if not names:
        names = [k for k in counts if cls_name.lower() in k.lower()]
    outer = [k for k in names if not any(k != o and k.startswith(o + ".") for o in names)]
    return int(sum(sum(counts[k].values()) for k in outer))


def measure(spec: dict) -> dict:
    """One preset's profile (``spec``: model config dict, n, seed, window, threads)."""
    import resource

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from segdist.config import model_config
    from segdist.device import assume_gpu_path
    from segdist.imageio import decode_image
    from segdist.proposals import cocojson, parquet
    from segdist.proposers import build_proposer
    from segdist.commands.bench import _images, _mix_images
    from segdist.profiling import OpCounter, profiling

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    n = spec["n"]
    sizes = size_mix(n, spec.get("seed", 0))
    with assume_gpu_path():  # build and run as on a GPU (BatchNorm folding, device RLE coder)
        gen = build_proposer(model_config(**spec["model"]))
        images = _mix_images(sizes)
        blobs = [_jpeg(im) for im in images]
        t0 = time.thread_time()
        decoded = [decode_image(b, f"synthetic-{i}.jpg") for i, b in enumerate(blobs)]
        decode_s = time.thread_time() - t0
        gen(_images(1, 320, 240, seed=0), [10 ** 6])  # warm-up: allocator, lazy imports
        counter, stages = OpCounter(), Counter()
        _region_torchvision(gen, counter)
        window = spec.get("window") or n
        wall0, cpu0 = time.perf_counter(), time.process_time()
        out = []
        with FlopCounterMode(display=False) as flops, torch.inference_mode(), \
                profiling(counter, stages):
            for s in range(0, n, window):
                out += gen(decoded[s:s + window], list(range(s, min(n, s + window))))
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    enc = {}
    for name, fn in (("coco_json_segm", lambda: cocojson.encode_segm(out)),
                     ("coco_json_bbox", lambda: cocojson.encode_bbox(out)),
                     ("parquet", lambda: parquet.encode(out))):
        fn()  # first call: lazy imports and codec set-up, not counted
        # best of 3: a worker encodes chunk after chunk, so the steady state is what it pays (a
        # single call right after the model's gigabytes were freed also pays their page faults)
        best = float("inf")
        for _ in range(3):
            t0 = time.thread_time()
            fn()
            best = min(best, time.thread_time() - t0)
        enc[name] = best * 1000 / n
    if out and out[0].counts is None:
        enc.pop("coco_json_segm")
    untiled = _trunk_flops(gen, sizes, FlopCounterMode)
    trunk = _module_flops(flops, "Trunk") if untiled is not None else None
    ms = {k: v * 1000 / n for k, v in stages.items()}
    res = {
        "images": n, "sizes": Counter(f"{w}x{h}" for w, h in sizes).most_common(),
        "window": window, "ops_per_image": counter.ops / n, "syncs_per_image": counter.syncs / n,
        "ops_by_region_per_image": {k: v / n for k, v in counter.by_region.items()},
        "syncs_by_region_per_image": {k: v / n for k, v in counter.syncs_by_region.items()},
        "top_ops_per_image": {k: v / n for k, v in counter.by_op.most_common(12)},
        "tflops_per_image": flops.get_total_flops() / n / 1e12,
        "untiled_trunk_tflops_per_image": None if untiled is None else untiled / n / 1e12,
        "trunk_tflops_per_image": None if trunk is None else trunk / n / 1e12,
        "host_ms_per_image": {"decode": decode_s * 1000 / n, **ms, **enc},
        "proposals_per_image": sum(len(p) for p in out) / n,
        "images_per_s_counting": n / wall, "cpu_s_per_image": cpu / n,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": str(gen.device), "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available() and str(gen.device).startswith("cuda"):
        res["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    host = res["host_ms_per_image"]
    res["host_ms_rle_and_encoders"] = sum(host.get(k, 0.0) for k in (
        "rle_host", "coco_json_segm", "coco_json_bbox", "parquet"))
    return res


def _region_torchvision(proposer, counter) -> None:
    """Attribute what torchvision's own modules dispatch (Mask R-CNN: the transform, backbone,
    RPN head and anchors, box and mask heads) to the region "torchvision"; the rest (proposal
    filtering, NMS, pooling, paste-back, RLE) stays "ours"."""
    model = getattr(proposer, "model", None)
    if not all(hasattr(model, n) for n in ("transform", "backbone", "rpn", "roi_heads")):
        return
    heads = model.roi_heads
    parts = [model.transform, model.backbone, model.rpn.head, model.rpn.anchor_generator,
             heads.box_head, heads.box_predictor]
    if heads.has_mask():
        parts += [heads.mask_head, heads.mask_predictor]
    stack = []

    def pre(_m, _a):
        cm = counter.region("torchvision")
        cm.__enter__()
        stack.append(cm)

    def post(_m, _a, _o):
        stack.pop().__exit__(None, None, None)

    for p in parts:
        p.register_forward_pre_hook(pre)
        p.register_forward_hook(post)
