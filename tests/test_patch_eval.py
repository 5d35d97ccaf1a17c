"""The mask logits' upsampling in training and per-patch evaluation follows the original model's
upsampling layer (nnx SpatialReSamplingEx, mode 'bilinear'), checked against a plain loop of its
rule in float32 on odd sizes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segdist.training.patch_eval import patch_ious, resize_logits

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def resampling_ex_loop(plane: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """SpatialReSamplingEx's bilinear rule, one output pixel at a time, in float32 as its C code
    computes: ratio = (in - 1) / (out - 1); source position = ratio * output index; the four
    neighbours weighted by the areas of the opposite sub-rectangles, the right/bottom neighbour
    clamped to the last row/column."""
    f = np.float32
    ih, iw = plane.shape
    hr, wr = f(ih - 1) / f(oh - 1), f(iw - 1) / f(ow - 1)
    out = np.zeros((oh, ow), np.float32)
    for y in range(oh):
        for x in range(ow):
            sx, sy = f(wr * f(x)), f(hr * f(y))
            x0, y0 = math.floor(sx), math.floor(sy)
            x1, y1 = x0 + 1, y0 + 1
            w_tl = (f(x1) - sx) * (f(y1) - sy)
            w_tr = (sx - f(x0)) * (f(y1) - sy)
            w_bl = (f(x1) - sx) * (sy - f(y0))
            w_br = (sx - f(x0)) * (sy - f(y0))
            xr, yb = min(x1, iw - 1), min(y1, ih - 1)
            out[y, x] = (plane[y0, x0] * w_tl + plane[y0, xr] * w_tr + plane[yb, x0] * w_bl
                         + plane[yb, xr] * w_br)
    return out


def reference(logits: torch.Tensor, size: int) -> torch.Tensor:
    planes = [resampling_ex_loop(p.numpy(), size, size) for p in logits.float()]
    return torch.from_numpy(np.stack(planes))


@pytest.mark.parametrize("shape, size", [((7, 7), 13), ((5, 5), 12), ((9, 9), 20), ((3, 5), 9),
                                         ((56, 56), 112)])
def test_resize_logits_is_spatial_resampling_ex(shape, size):
    g = torch.Generator().manual_seed(size)
    logits = torch.randn(2, *shape, generator=g) * 4
    got = resize_logits(logits, size)
    ref = reference(logits, size)
    span = float(ref.max() - ref.min())
    assert got.shape == (2, size, size) and got.dtype == torch.float32
    assert float((got - ref).abs().max()) <= 1e-6 * span
    # the corners are the input's corners exactly (aligned corners)
    assert torch.equal(got[:, [0, 0, -1, -1], [0, -1, 0, -1]],
                       logits[:, [0, 0, -1, -1], [0, -1, 0, -1]])
    # the half-pixel convention this replaced is far from the original on the same logits
    half = F.interpolate(logits[:, None], size=(size, size), mode="bilinear",
                         align_corners=False)[:, 0]
    assert float((half - ref).abs().max()) > 0.05 * span
    assert resize_logits(got, size) is got  # no-op at the label size (SharpMask)


def test_patch_ious_compare_the_upsampled_logits_with_the_labels():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 7, 7, generator=g)
    labels = torch.where(torch.rand(3, 13, 13, generator=g) > 0.5, 1.0, -1.0)
    pred = reference(logits, 13) > 0
    gt = labels > 0
    want = ((pred & gt).flatten(1).sum(1) / (pred | gt).flatten(1).sum(1)).float()
    assert torch.allclose(patch_ious(logits, labels), want, atol=0, rtol=1e-6)


def test_training_loss_uses_the_same_upsampling():
    """train_step's mask loss is the soft margin of the SpatialReSamplingEx-upsampled logits."""
    from segdist.models.deepmask import DeepMask, DeepMaskConfig
    from segdist.training.trainer import train_step

    torch.manual_seed(0)
    model = DeepMask(DeepMaskConfig(arch="resnet18", i_sz=32, o_sz=5, fc_dim=16, feat_ch=8,
                                    score_hidden=8)).eval()
    g = torch.Generator().manual_seed(1)
    inputs = torch.randn(2, 3, 64, 64, generator=g)
    labels = torch.where(torch.rand(2, 9, 9, generator=g) > 0.5, 1.0, -1.0)
    with torch.no_grad():
        want = F.soft_margin_loss(reference(model(inputs)[0], 9), labels)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    got = train_step(model, {"inputs": inputs, "labels": labels, "head": "mask"}, opt, g_sz=9,
                     device=torch.device("cpu"))
    assert abs(got - float(want)) <= 1e-6 * float(want)
