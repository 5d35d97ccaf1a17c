"""The dense proposer's whole-image pipeline: pyramid, resampling, paste-back geometry, placement,
tiling, memory; the proposer per preset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import nn

from segdist.config import model_config
from segdist.models.deepmask import DeepMask, DeepMaskConfig
from segdist.models.sharpmask import SharpMask
from segdist.proposers import build_proposer
from segdist.proposers.dense.proposer import DenseProposer
from segdist.proposers.dense.pyramid import (MEAN, STD, Level, plan_tiles, pyramid_images,
                                             pyramid_levels)
from segdist.proposers.dense.settings import InferenceSettings, preset_scales
from segdist.proposers.paste import paste_batch

PRESETS = ["deepmask", "deepmask-zoom", "deepmask-zoom2", "sharpmask", "sharpmask-zoom",
           "sharpmask-zoom2"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def propose_images(model, images, settings):
    """The dense proposer with ``model`` and ``settings`` on the CPU, ids 0, 1, ..."""
    proposer = DenseProposer("test", model, settings, device=torch.device("cpu"), batch_size=4,
                             weights_sha256=None)
    return proposer(images, list(range(len(images))))


# -------------------------------------------------------------------------------------------------
# A hand-built model with the inference protocol of DeepMask: no training, known geometry.


class BoxModel(nn.Module):
    """Scores a window by (mean of channel 0 over its central 80 x 80) minus (mean over the rest of
    its 160 x 160); every window's mask is its central half (mask cells [o/4, 3o/4)).

    So a bright 80 x 80 square on a dark background scores highest in the window centred on it,
    and that window's mask is exactly the square: where the mask lands checks the geometry.
    """

    def __init__(self, o: int = 40):
        super().__init__()
        self.cfg = DeepMaskConfig(arch="resnet18", o_sz=o)
        self.mask_size, self.halo_px, self.activation_bytes_per_px = o, 0, 16
        pattern = torch.full((o, o), -4.0)
        pattern[o // 4:3 * o // 4, o // 4:3 * o // 4] = 4.0
        self.register_buffer("pattern", pattern)

    def dense(self, x):
        v = x[:, :1]
        hp, wp = x.shape[-2:]
        gray = (0.5 - MEAN[0]) / STD[0]
        # the trunk's ceil(H/16) grid: extend with the padding value to a multiple of 16
        v = F.pad(v, (0, -wp % 16, 0, -hp % 16), value=gray)
        full = F.avg_pool2d(v, 160, stride=16)                     # window [16r, 16r + 160)
        centre = F.avg_pool2d(v[..., 40:, 40:], 80, stride=16)     # [16r + 40, 16r + 120)
        h, w = full.shape[-2:]
        centre = centre[..., :h, :w]
        surround = (full * 160 ** 2 - centre * 80 ** 2) / (160 ** 2 - 80 ** 2)
        return centre - surround, []

    def score_map(self, emb):
        return emb[:, 0]

    def window_masks(self, vecs, extras):
        return self.pattern.expand(len(vecs), -1, -1).clone()


def _square(h, w, top, left, side):
    m = np.zeros((h, w), np.uint8)
    m[top:top + side, left:left + side] = 1
    return m


def _iou(rle, gt):
    return float(mask_utils.iou([rle], [mask_utils.encode(np.asfortranarray(gt))], [0])[0, 0])


def test_placement_of_known_objects_across_scales():
    """An 80 px square (best seen at scale 1) and a 160 px square (best at scale 0.5): the top two
    proposals' masks land on them (an off-by-one-cell location would miss by 16/32 px)."""
    h, w = 320, 384
    img = np.zeros((h, w, 3), np.uint8)
    a = _square(h, w, 72, 232, 80)       # centred on (112, 272) = 16 * (7, 17)
    b = _square(h, w, 144, 16, 160)      # centred on (224, 96) = 32 * (7, 3)
    img[(a + b) > 0] = 255
    st = InferenceSettings(scales=(0.5, 1.0), proposals=5)
    (res,) = propose_images(BoxModel(), [img], st)
    rles = res.rles()
    # cell (r, c) is the window centred on level pixel (16r, 16c): one cell off would miss by
    # 16 px (scale 1) or 32 px (scale 0.5)
    assert _iou(rles[0], a) > 0.95 and _iou(rles[1], b) > 0.95
    assert np.abs(res.boxes[0] - [232, 72, 80, 80]).max() <= 2
    assert np.abs(res.boxes[1] - [16, 144, 160, 160]).max() <= 3
    assert np.all(np.diff(res.scores) <= 0)


def test_placement_with_max_image_side_keeps_original_frame():
    """Downscaled by max_image_side, the masks still land on the object in original pixels."""
    h, w = 640, 768
    obj = _square(h, w, 144, 464, 160)   # at half size: centred on (112, 272)
    img = np.zeros((h, w, 3), np.uint8)
    img[obj > 0] = 255
    st = InferenceSettings(scales=(1.0,), proposals=3, max_image_side=384)
    (res,) = propose_images(BoxModel(), [img], st)
    rle = res.rles()[0]
    assert mask_utils.decode(rle).shape == (h, w)
    assert _iou(rle, obj) > 0.95
    assert np.abs(res.boxes[0] - [464, 144, 160, 160]).max() <= 3


def test_mask_batches_by_budget_equal_one_batch():
    img = np.random.default_rng(0).integers(0, 255, (320, 384, 3), dtype=np.uint8)
    big = InferenceSettings(scales=(0.5, 1.0), proposals=60, memory_budget_mb=1024)
    small = InferenceSettings(scales=(0.5, 1.0), proposals=60, memory_budget_mb=16)  # ~16/batch
    (r1,) = propose_images(BoxModel(), [img], big)
    (r2,) = propose_images(BoxModel(), [img], small)
    assert r1.counts == r2.counts and np.array_equal(r1.boxes, r2.boxes)
    assert np.array_equal(r1.scores, r2.scores) and len(r1.scores) == 60


def test_nms_setting_suppresses_overlaps():
    img = np.random.default_rng(1).integers(0, 255, (320, 384, 3), dtype=np.uint8)

    def max_iou(res):
        b = res.boxes.astype(np.float64)
        iou = mask_utils.iou(b.tolist(), b.tolist(), [0] * len(b))
        np.fill_diagonal(iou, 0)
        return iou.max()

    (plain,) = propose_images(BoxModel(), [img], InferenceSettings(scales=(1.0,), proposals=20))
    (nms,) = propose_images(BoxModel(), [img], InferenceSettings(scales=(1.0,), proposals=20,
                                                                 nms=0.3))
    assert max_iou(plain) > 0.7
    assert max_iou(nms) < 0.4  # NMS ran on the low-resolution mask boxes: within a pixel or two
    assert np.all(np.diff(nms.scores) <= 0) and nms.scores[0] == plain.scores[0]


# -------------------------------------------------------------------------------------------------
# Pyramid, resampling, paste-back


@pytest.mark.parametrize("name,n", [("deepmask", 7), ("sharpmask", 7), ("deepmask-zoom", 8),
                                    ("sharpmask-zoom", 8), ("deepmask-zoom2", 9),
                                    ("sharpmask-zoom2", 9)])
def test_scale_count_per_preset(name, n):
    scales = preset_scales(name)
    assert len(scales) == n
    assert scales[0] == pytest.approx(2 ** -2.5) and scales[-1] == pytest.approx(2 ** (-2.5 + 0.5 * (n - 1)))
    levels = pyramid_levels(480, 640, InferenceSettings(scales=scales))
    assert [(lv.height, lv.width) for lv in levels][:3] == [(85, 113), (120, 160), (170, 226)]
    assert len(levels) == n


def resampling_ex_loop(plane: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """nnx SpatialReSamplingEx (mode='bilinear') as its C loop computes it, pixel by pixel in
    float32; an output side of 1 (where the C code divides by zero) reads position 0."""
    f = np.float32
    ih, iw = plane.shape
    wr = f(0) if ow == 1 else f(iw - 1) / f(ow - 1)
    hr = f(0) if oh == 1 else f(ih - 1) / f(oh - 1)
    out = np.zeros((oh, ow), np.float32)
    for y in range(oh):
        for x in range(ow):
            ix, iy = wr * f(x), hr * f(y)
            x0, y0 = int(np.floor(ix)), int(np.floor(iy))
            se = (ix - f(x0)) * (iy - f(y0))
            sw = (f(x0 + 1) - ix) * (iy - f(y0))
            ne = (ix - f(x0)) * (f(y0 + 1) - iy)
            nw = (f(x0 + 1) - ix) * (f(y0 + 1) - iy)
            x1, y1 = min(x0 + 1, iw - 1), min(y0 + 1, ih - 1)
            out[y, x] = (plane[y0, x0] * nw + plane[y0, x1] * ne + plane[y1, x0] * sw
                         + plane[y1, x1] * se)
    return out


@pytest.mark.parametrize("src,levels", [((37, 53), [(52, 74), (13, 9), (37, 53)]),
                                        ((9, 7), [(1, 5), (4, 1), (1, 1), (17, 13)]),
                                        ((1, 7), [(3, 11)])])
def test_pyramid_images_are_spatial_resampling_ex(src, levels):
    # The original's pyramid (InferDeepMask.lua: nn.SpatialReSamplingEx{mode='bilinear'}), on odd
    # sizes, shrinking, enlarging and equal, output sides of 1, several levels made together:
    # exactly the C loop's float32 values, then padded and normalised.
    rng = np.random.default_rng(sum(src))
    imgs = torch.from_numpy(rng.integers(0, 255, (2, 3, *src), dtype=np.uint8))
    lvs = [Level(i, 1.0, h, w, src[0] / h, src[1] / w) for i, (h, w) in enumerate(levels)]
    got = pyramid_images(imgs, lvs, 80)
    for lv, x in zip(lvs, got):
        for b in range(2):
            unit = imgs[b].numpy().astype(np.float32) * np.float32(1 / 255)  # image.load's [0, 1]
            ref = np.stack([resampling_ex_loop(unit[c], lv.height, lv.width) for c in range(3)])
            ref = F.pad(torch.from_numpy(ref)[None], (80, 80, 80, 80), value=0.5)
            ref = (ref - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
            assert x.shape == (2, 3, lv.height + 160, lv.width + 160)
            assert torch.equal(x[b:b + 1], ref), (lv, b)


def test_paste_batch_equals_resize_then_paste():
    # three windows (one partly above, one partly left of its image), two image sizes on one canvas
    torch.manual_seed(0)
    logits = torch.randn(3, 8, 8)
    tops = torch.tensor([-5.0, 10.0, 30.0], dtype=torch.float64)
    lefts = torch.tensor([3.0, -7.0, 20.0], dtype=torch.float64)
    win = torch.full((3,), 24.0, dtype=torch.float64)
    heights, widths = torch.tensor([40, 40, 33]), torch.tensor([50, 50, 37])
    out = paste_batch(logits, tops, lefts, win, win, heights, widths, 40, 50, 0.1)
    for i in range(3):
        big = F.interpolate(logits[i][None, None], size=(24, 24), mode="bilinear",
                            align_corners=False)[0, 0] > 0.1
        ref = torch.zeros(140, 150, dtype=torch.bool)
        t, left = int(tops[i]) + 50, int(lefts[i]) + 50
        ref[t:t + 24, left:left + 24] = big
        ref[50 + int(heights[i]):] = False  # nothing outside the mask's own image
        ref[:, 50 + int(widths[i]):] = False
        assert torch.equal(out[i], ref[50:90, 50:100])


# -------------------------------------------------------------------------------------------------
# Real models: tiling, the proposer per preset


@pytest.fixture(scope="module")
def models18():
    torch.manual_seed(0)
    dm = DeepMask(DeepMaskConfig(arch="resnet18")).eval()
    return dm, SharpMask(dm).eval()


@pytest.mark.parametrize("which", [0, 1], ids=["deepmask", "sharpmask"])
def test_tiled_equals_untiled(models18, which):
    model = models18[which]
    img = np.random.default_rng(2).integers(0, 255, (448, 512, 3), dtype=np.uint8)
    one = InferenceSettings(scales=(1.0,), proposals=30)
    tiled = InferenceSettings(scales=(1.0,), proposals=30, tile_cells=12)
    level = pyramid_levels(448, 512, one)[0]
    tiles = plan_tiles(level, model, tiled)
    assert len(plan_tiles(level, model, one)) == 1 and len(tiles) >= 4
    hp, wp = level.height + 160, level.width + 160
    # the halo is exercised on every side: tiles read from crops cut above, below, left, right
    assert any(t.y0 > 0 for t in tiles) and any(t.y1 < hp for t in tiles)
    assert any(t.x0 > 0 for t in tiles) and any(t.x1 < wp for t in tiles)
    (r1,) = propose_images(model, [img], one)
    (r2,) = propose_images(model, [img], tiled)
    assert np.allclose(r1.scores, r2.scores, atol=1e-5)
    assert r1.counts == r2.counts and np.array_equal(r1.boxes, r2.boxes)


@pytest.mark.parametrize("name", PRESETS)
def test_proposer_per_preset(name):
    h, w = 64, 80
    img = np.random.default_rng(3).integers(0, 255, (h, w, 3), dtype=np.uint8)
    gen = build_proposer(model_config(name=name, trunk="resnet18", proposals=25, device="cpu"))
    assert gen.weights_sha256 is None and gen.device == "cpu"
    (p,) = gen([img], [7])
    assert p.image_id == 7 and p.model == name and (p.height, p.width) == (h, w)
    assert len(p) == 25 and np.all(np.diff(p.scores) <= 0)
    assert np.all((p.scores > 0) & (p.scores < 1))
    assert np.all(p.boxes[:, :2] >= 0)
    assert np.all(p.boxes[:, 0] + p.boxes[:, 2] <= w) and np.all(p.boxes[:, 1] + p.boxes[:, 3] <= h)
    rles = p.rles()
    assert mask_utils.decode(rles).shape == (h, w, 25)
    assert np.allclose(mask_utils.toBbox(rles), p.boxes)


def test_fewer_windows_than_k_returns_all():
    h, w = 40, 48
    img = np.zeros((h, w, 3), np.uint8)
    cfg = model_config(name="deepmask", trunk="resnet18", proposals=1000, device="cpu")
    (p,) = build_proposer(cfg)([img], [1])
    levels = pyramid_levels(h, w, InferenceSettings(scales=preset_scales("deepmask")))
    n = sum((math.ceil((lv.height + 160) / 16) - 9) * (math.ceil((lv.width + 160) / 16) - 9)
            for lv in levels)
    assert len(p) == n < 1000


def test_proposer_batches_mixed_sizes_in_input_order():
    rng = np.random.default_rng(4)
    imgs = [rng.integers(0, 255, s, dtype=np.uint8) for s in [(48, 64, 3), (64, 48, 3), (48, 64, 3)]]
    gen = build_proposer(model_config(name="deepmask", trunk="resnet18", proposals=10,
                                      device="cpu", batch_size=2))
    out = gen(imgs, [10, 11, 12])
    assert [p.image_id for p in out] == [10, 11, 12]
    assert [(p.height, p.width) for p in out] == [(48, 64), (64, 48), (48, 64)]
    alone = gen([imgs[2]], [12])[0]
    assert np.allclose(out[2].scores, alone.scores, atol=1e-5) and out[2].counts == alone.counts
    with pytest.raises(ValueError, match="uint8"):
        gen([imgs[0].astype(np.float32)], [1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_precision_within_tolerance(precision):
    img = np.random.default_rng(5).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    base = dict(name="sharpmask", trunk="resnet18", proposals=50, device="cuda")
    ref = build_proposer(model_config(**base))([img], [1])[0]
    low = build_proposer(model_config(**base, precision=precision, channels_last=True))([img], [1])[0]
    # tolerance stated in docs/models.md: scores within 0.02 (probabilities) at the same rank
    assert np.abs(ref.scores - low.scores).max() < 0.02
