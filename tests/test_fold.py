"""BatchNorm folded into the convolutions at load (inference only): same outputs within float32
tolerance, one kernel fewer per norm."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d

from segdist.models.deepmask import DeepMask, DeepMaskConfig
from segdist.models.fold import fold_batchnorm
from segdist.models.layers import FrozenAffine
from segdist.models.sharpmask import SharpMask
from segdist.models.trunk import LAYOUTS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _randomise_norms(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
            elif isinstance(m, FrozenAffine):
                m.a.copy_(torch.rand(m.a.shape, generator=g) + 0.5)
                m.b.copy_(torch.rand(m.b.shape, generator=g) - 0.5)


def _norms(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d, FrozenAffine))
               for m in model.modules())


@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[1]])
def test_folded_sharpmask_dense_outputs_within_fp32_tolerance(layout):
    torch.manual_seed(0)
    model = SharpMask(DeepMask(DeepMaskConfig(arch="resnet18", layout=layout))).eval()
    _randomise_norms(model, 1)
    folded = copy.deepcopy(model)
    n = fold_batchnorm(folded)
    # all but the affines after an addition ("released": aff_out), which follow no convolution
    after_add = sum(getattr(m, "aff_out", None) is not None for m in model.modules())
    assert n == _norms(model) - after_add and _norms(folded) == after_add
    x = torch.randn(2, 3, 176, 208)
    with torch.inference_mode():
        (e1, h1), (e2, h2) = model.dense(x), folded.dense(x)
    torch.testing.assert_close(e2, e1, rtol=1e-4, atol=1e-5)
    for a, b in zip(h1, h2):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_folded_torchvision_bottleneck_with_frozen_batchnorm():
    # Mask R-CNN's backbone: torchvision Bottlenecks with FrozenBatchNorm2d and a conv+norm
    # downsample Sequential
    torch.manual_seed(2)
    down = nn.Sequential(nn.Conv2d(32, 64, 1, stride=2, bias=False), FrozenBatchNorm2d(64))
    block = nn.Sequential(Bottleneck(32, 16, stride=2, downsample=down, norm_layer=FrozenBatchNorm2d),
                          Bottleneck(64, 16, norm_layer=FrozenBatchNorm2d)).eval()
    _randomise_norms(block, 3)
    folded = copy.deepcopy(block)
    assert fold_batchnorm(folded) == 7 and _norms(folded) == 0
    x = torch.randn(2, 32, 33, 29)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), block(x), rtol=1e-4, atol=1e-5)


def test_a_training_batchnorm_is_not_folded():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    assert fold_batchnorm(model) == 0 and isinstance(model[1], nn.BatchNorm2d)
