"""The training sampler: window geometry, labels, rejection rules, negatives, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from segdist.data.records import Dataset, ImageRecord
from segdist.errors import SegdistError
from segdist.training.crops import crop_resize
from segdist.training.sampler import (
    MEAN, NEG_SCALES, STD, BatchStream, PatchSampler, head_for_step,
)

GREY = (128, 128, 128)


def _rle(mask: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": r["size"], "counts": r["counts"].decode("ascii")}


def _dataset(tmp_path, images: list[list[tuple[np.ndarray, tuple[int, int, int], dict]]],
             size=(120, 160)) -> Dataset:
    """Images of grey background with the given (mask, colour, extra annotation fields) objects."""
    h, w = size
    records, anns = [], []
    for i, objects in enumerate(images, start=1):
        img = np.full((h, w, 3), GREY, np.uint8)
        for mask, colour, extra in objects:
            img[mask] = colour
            x, y, bw, bh = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": extra.pop("cat", 1),
                         "bbox": [float(x), float(y), float(bw), float(bh)],
                         "area": float(mask.sum()), "iscrowd": 0, "segmentation": _rle(mask),
                         **extra})
        path = tmp_path / f"{i:04d}.png"
        Image.fromarray(img).save(path)
        records.append(ImageRecord(i, path.name, str(path), h, w))
    gt = {"images": [{"id": r.image_id, "file_name": r.file_name, "height": h, "width": w}
                     for r in records],
          "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    return Dataset("handmade", records, gt)


def _l_shape(size, y0, x0, side, arm):
    """An L (asymmetric under flips): a vertical bar and a horizontal foot."""
    m = np.zeros(size, bool)
    m[y0:y0 + side, x0:x0 + arm] = True
    m[y0 + side - arm:y0 + side, x0:x0 + side] = True
    return m


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)


def test_crop_resize_identity_fill_and_pooling():
    img = torch.arange(100, dtype=torch.float32).reshape(1, 10, 10)
    assert torch.allclose(crop_resize(img, 0, 0, 10, 10), img, atol=1e-4)
    shifted = crop_resize(img, 2, 3, 10, 10, fill=-1)
    assert torch.allclose(shifted[0, :7, :8], img[0, 3:, 2:], atol=1e-4)
    assert (shifted[0, 8:, :] == -1).all() and (shifted[0, :, 9:] == -1).all()
    # Downscaling by 2 averages 2x2 cells (no aliasing from sampling single pixels).
    half = crop_resize(img, 0, 0, 10, 5)
    ref = torch.nn.functional.avg_pool2d(img[None], 2)[0]
    assert torch.allclose(half, ref, atol=1e-4)
    # Entirely outside: all fill.
    assert (crop_resize(img, 50, 50, 10, 4, fill=0.5) == 0.5).all()


def test_mask_labels_line_up_with_the_object_in_the_window(tmp_path):
    """Over many jittered, flipped samples, the label's object is where the object's colour is."""
    size = (120, 160)
    colour = (250, 20, 20)
    objs = [[(_l_shape(size, 20 + 7 * i, 30 + 11 * i, 44 + 4 * i, 14), colour, {})] for i in range(4)]
    s = PatchSampler(_dataset(tmp_path, objs, size), i_sz=64, g_sz=48, scale_jitter=0.25,
                     shift_jitter=6.4)
    flipped_seen, offsets = set(), []
    for k in range(24):
        rng = np.random.default_rng(k)
        inp, lbl = s.mask_sample(rng)
        assert inp.shape == (3, 96, 96) and lbl.shape == (48, 48)
        assert set(lbl.unique().tolist()) <= {-1.0, 1.0}
        rgb = _unnormalise(inp)[:, 16:80, 16:80]  # the central i_sz region
        # Share of object colour per window pixel (the red channel blends object and grey).
        alpha = ((rgb[0] - GREY[0] / 255) / ((colour[0] - GREY[0]) / 255)).clamp(0, 1)
        red = torch.nn.functional.interpolate(alpha[None, None], size=(48, 48), mode="bilinear",
                                              align_corners=False)[0, 0] > 0.5
        obj = lbl > 0
        iou = (red & obj).sum() / (red | obj).sum()
        assert iou > 0.85, (k, float(iou))
        offsets.append(obj.nonzero().float().mean(0) - red.nonzero().float().mean(0))
        # Which way the L's foot points tells whether the sample was flipped.
        cols = obj.any(0).nonzero()
        bar_left = obj[:, cols.min()].sum() > obj[:, cols.max()].sum()
        flipped_seen.add(bool(bar_left))
    # No systematic shift between label and image (a half-pixel convention error would show here).
    assert torch.stack(offsets).mean(0).abs().max() < 0.25
    assert flipped_seen == {True, False}


def test_mask_sample_scale_and_centre_without_jitter(tmp_path):
    """No jitter: the object is centred and its longer side is obj_sz (37 px at i_sz 64)."""
    size = (120, 160)
    m = np.zeros(size, bool)
    m[30:90, 40:80] = True  # 60 high, 40 wide
    s = PatchSampler(_dataset(tmp_path, [[(m, (0, 0, 250), {})]], size), i_sz=64, g_sz=64,
                     scale_jitter=0.0, shift_jitter=0.0)
    assert s.obj_sz == math.ceil(64 * 128 / 224) == 37
    _, lbl = s.mask_sample(np.random.default_rng(0))
    rows, cols = (lbl > 0).any(1).nonzero()[:, 0], (lbl > 0).any(0).nonzero()[:, 0]
    assert abs(int(rows.max() - rows.min() + 1) - 37) <= 1
    assert abs(int(cols.max() - cols.min() + 1) - round(37 * 40 / 60)) <= 1
    assert abs(float(rows.float().mean()) - 31.5) <= 0.6
    assert abs(float(cols.float().mean()) - 31.5) <= 0.6


def test_crowd_tiny_and_thin_objects_are_never_sampled(tmp_path):
    size = (120, 160)
    good = np.zeros(size, bool)
    good[10:50, 10:40] = True
    crowd = np.zeros(size, bool)
    crowd[60:110, 60:150] = True
    tiny = np.zeros(size, bool)
    tiny[10:19, 100:109] = True  # area 81 < 100
    thin = np.zeros(size, bool)
    thin[10:60, 120:124] = True  # 4 px wide
    objs = [[(good, (250, 0, 0), {}), (crowd, (0, 250, 0), {"iscrowd": 1, "cat": 2}),
             (tiny, (0, 0, 250), {"cat": 2}), (thin, (0, 0, 250), {"cat": 2})]]
    s = PatchSampler(_dataset(tmp_path, objs, size), i_sz=64, g_sz=32, scale_jitter=0.0,
                     shift_jitter=0.0)
    assert len(s.valid_by_category) == 1  # category 2 has nothing usable
    for k in range(10):
        inp, lbl = s.mask_sample(np.random.default_rng(k))
        centre = _unnormalise(inp)[:, 48, 48]
        assert centre[0] > 0.9 and centre[1] < 0.1  # the red (valid) object
    with pytest.raises(SegdistError, match="no annotation usable"):
        PatchSampler(_dataset(tmp_path, [[(crowd, (0, 250, 0), {"iscrowd": 1})]], size),
                     i_sz=64, g_sz=32)


def test_score_positives_centred_negatives_far_from_objects_at_their_scale(tmp_path):
    size = (120, 160)
    masks = []
    for y0, x0, side in ((10, 10, 30), (60, 90, 50), (70, 20, 12)):
        m = np.zeros(size, bool)
        m[y0:y0 + side, x0:x0 + side] = True
        masks.append(m)
    ds = _dataset(tmp_path, [[(m, (250, 250, 0), {}) for m in masks]], size)
    s = PatchSampler(ds, i_sz=64, g_sz=32, scale_jitter=0.25, shift_jitter=6.4)
    for k in range(8):
        inp = s.score_sample(np.random.default_rng(k), positive=True)
        centre = _unnormalise(inp)[:, 46:50, 46:50]
        assert (centre[2] < 0.1).all() and (centre[0] > 0.9).all()  # yellow object at the centre
    anns = ds.coco_gt["annotations"]
    for k in range(200):
        i, x, y, t = s._negative(np.random.default_rng([5, k]))
        assert t in NEG_SCALES
        f = 2.0 ** t
        for a in anns:  # plain reference of the rule, in the scaled image
            bx, by, bw, bh = a["bbox"]
            canon = math.log2(s.obj_sz / max(bw, bh))
            d = math.hypot((bx + bw / 2) * f - x * f, (by + bh / 2) * f - y * f)
            assert not (abs(canon - t) <= 2.5 and d < 3 * s.shift)
    inputs, labels = s.batch(np.random.default_rng(3), "score", 16)
    assert inputs.shape == (16, 3, 96, 96) and set(labels.tolist()) <= {-1.0, 1.0}


def test_batches_do_not_depend_on_loader_workers(tmp_path):
    size = (120, 160)
    objs = [[(_l_shape(size, 20 + 5 * i, 30 + 9 * i, 50, 16), (200, 40, 200), {})] for i in range(3)]
    s = PatchSampler(_dataset(tmp_path, objs, size), i_sz=64, g_sz=32, shift_jitter=6.4)
    stream = BatchStream(s, batch_size=4, hfreq=0.5, seed=11, start_step=5, stop_step=11)
    single = list(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=0))
    multi = list(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2))
    assert [b["step"] for b in single] == [b["step"] for b in multi] == list(range(5, 11))
    for a, b in zip(single, multi):
        assert a["head"] == b["head"] == head_for_step(11, a["step"], 0.5)
        assert torch.equal(a["inputs"], b["inputs"]) and torch.equal(a["labels"], b["labels"])
    heads = {head_for_step(11, k, 0.5) for k in range(40)}
    assert heads == {"mask", "score"}
    assert {head_for_step(11, k, 0.0) for k in range(40)} == {"mask"}
