"""DeepMask: layers, trunk layouts, parameter counts, dense == windowed, sparse mask head."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segdist.errors import ConfigError, StorageError
from segdist.models.deepmask import DeepMask, DeepMaskConfig, count_parameters
from segdist.models.layers import FrozenAffine, SymmetricPad2d, SymPadConv2d, symmetric_pad
from segdist.models.trunk import build_trunk, load_imagenet_trunk


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("pad", [(1, 1, 1, 1), (3, 3, 3, 3), (2, 0, 5, 1), (7, 4, 0, 9)])
def test_symmetric_pad_matches_numpy(pad):
    x = torch.randn(2, 3, 5, 6)
    left, right, top, bottom = pad
    ref = np.pad(x.numpy(), ((0, 0), (0, 0), (top, bottom), (left, right)), mode="symmetric")
    assert np.array_equal(SymmetricPad2d(pad)(x).numpy(), ref)
    # and it is not PyTorch's 'reflect' (which drops the edge pixel) once the pad is > 1 wide
    if max(pad) <= 4:
        assert not torch.equal(symmetric_pad(x, pad), F.pad(x, pad, mode="reflect"))


def test_sympad_conv_is_conv_on_symmetric_padded_input():
    torch.manual_seed(0)
    conv = SymPadConv2d(3, 4, 7, stride=2, sym_pad=3, bias=True)
    x = torch.randn(1, 3, 11, 9)
    xp = torch.from_numpy(np.pad(x.numpy(), ((0, 0), (0, 0), (3, 3), (3, 3)), mode="symmetric"))
    assert torch.allclose(conv(x), F.conv2d(xp, conv.weight, conv.bias, stride=2), atol=1e-6)
    assert conv(x).shape[-2:] == (6, 5)  # same size as a zero-padded conv with padding 3


def test_frozen_affine_equals_batchnorm_in_eval():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    aff = FrozenAffine.from_batchnorm(bn)
    x = torch.randn(2, 5, 4, 3)
    assert torch.allclose(aff(x), bn(x), atol=1e-5)
    assert len(list(aff.parameters())) == 0 and set(aff.state_dict()) == {"a", "b"}


def test_parameter_counts_resnet50_torchvision_layout():
    m = DeepMask(DeepMaskConfig(arch="resnet50", layout="torchvision"))
    assert count_parameters(m.trunk.resnet) == 8_543_296
    assert count_parameters(m.trunk) == 15_228_608
    assert count_parameters(m.mask_head) == 1_608_768
    assert count_parameters(m.score_head) == 526_337
    assert count_parameters(m) == 17_363_713


def test_released_layout_counts_and_block_structure():
    """The released bottleneck: conv(+bias), affine, ReLU, sympad 3x3 (stride), affine, ReLU, 1x1;
    bare-conv shortcut; add; affine; ReLU."""
    trunk = build_trunk("resnet50", "released")
    assert count_parameters(trunk) == 8_528_000  # conv weights + biases; affines are buffers
    n_affine = sum(m.a.numel() * 2 for m in trunk.modules() if isinstance(m, FrozenAffine))
    assert n_affine == 27_008  # torchvision BN 30,592 minus the 3 shortcut BNs (3,584)
    blk = trunk.layer2[0]
    assert isinstance(blk.shortcut, nn.Conv2d) and blk.shortcut.bias is not None
    assert blk.conv2.stride == (2, 2) and blk.conv2.sym_pad == 1
    torch.manual_seed(0)
    for m in blk.modules():
        if isinstance(m, FrozenAffine):
            m.a.uniform_(0.5, 1.5)
            m.b.normal_()
    x = torch.randn(1, 256, 9, 7)
    y = F.relu(blk.aff1(blk.conv1(x)))
    yp = torch.from_numpy(np.pad(y.detach().numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)), "symmetric"))
    y = F.relu(blk.aff2(F.conv2d(yp, blk.conv2.weight, blk.conv2.bias, stride=2)))
    ref = F.relu(blk.aff_out(blk.conv3(y) + blk.shortcut(x)))
    assert torch.allclose(blk(x), ref, atol=1e-5)


def test_trunk_maps_and_strides():
    trunk = build_trunk("resnet18").eval()
    with torch.no_grad():
        out = trunk(torch.randn(1, 3, 100, 131))
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == {
        "conv1": (64, 50, 66), "layer1": (64, 25, 33), "layer2": (128, 13, 17),
        "layer3": (256, 7, 9)}
    assert build_trunk("resnet50").channels["layer3"] == 1024


def test_torchvision_state_dict_loads_into_trunk(tmp_path):
    import torchvision

    tv = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    trunk = build_trunk("resnet18")
    digest = load_imagenet_trunk(trunk, str(path))
    assert len(digest) == 64
    for k, v in trunk.state_dict().items():
        assert torch.equal(v, tv.state_dict()[k]), k
    with pytest.raises(ConfigError, match="not resnet34|lack"):
        load_imagenet_trunk(build_trunk("resnet34"), str(path))
    with pytest.raises(ConfigError, match="layout='torchvision'"):
        load_imagenet_trunk(build_trunk("resnet18", "released"), str(path))


def test_imagenet_enum_path_uses_torch_hub_cache(tmp_path, monkeypatch):
    """The enum name resolves through torchvision's own loader, which finds the cached file."""
    import torchvision
    from torchvision.models import ResNet18_Weights

    from segdist.models.weights import hub_cache_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    tv = torchvision.models.resnet18()
    cached = hub_cache_file(ResNet18_Weights.IMAGENET1K_V1.url)
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(tv.state_dict(), cached)
    trunk = build_trunk("resnet18")
    load_imagenet_trunk(trunk, "IMAGENET1K_V1")
    assert torch.equal(trunk.conv1.weight, tv.conv1.weight)
    assert torch.equal(trunk.layer3[1].bn2.running_var, tv.layer3[1].bn2.running_var)


def test_imagenet_enum_offline_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    # a closed loopback port as proxy: the download fails at once, as it does without network
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    with pytest.raises(StorageError, match="pass it as a file"):
        load_imagenet_trunk(build_trunk("resnet18"), "DEFAULT")


def test_config_validation():
    with pytest.raises(ConfigError, match="multiple of 16"):
        DeepMaskConfig(i_sz=150)
    with pytest.raises(ConfigError, match="arch"):
        DeepMaskConfig(arch="vgg")


@pytest.fixture(scope="module")
def dm18():
    torch.manual_seed(0)
    return DeepMask(DeepMaskConfig(arch="resnet18")).eval()


def test_forward_shapes_and_dense_equals_window(dm18):
    x = torch.randn(2, 3, 192, 192)
    with torch.no_grad():
        mask, score = dm18(x)
        emb_w, _ = dm18.trunk.window(x)
        emb = dm18.features(x)                       # 192 px -> 12 layer3 cells -> 3x3 embedding
        scores = dm18.score_map(emb)
    assert mask.shape == (2, 56, 56) and score.shape == (2,)
    assert emb.shape == (2, 512, 3, 3)
    # the centre cell reads layer3 cells 1..10: exactly the training path's crop
    assert torch.allclose(emb[:, :, 1, 1], emb_w, atol=1e-4)
    assert torch.allclose(scores[:, 1, 1], score, atol=1e-4)
    with pytest.raises(ValueError, match="192"):
        dm18(torch.randn(1, 3, 160, 160))


def test_sparse_mask_head_equals_dense(dm18):
    """masks_at computes the head only at selected cells; equal to the dense 1x1-conv head."""
    with torch.no_grad():
        emb = dm18.features(torch.randn(2, 3, 256, 224))
        w = dm18.mask_head.weight.view(56 * 56, 512, 1, 1)
        dense = F.conv2d(emb, w, dm18.mask_head.bias)           # B x 3136 x h x w
        idx = torch.tensor([[0, 0, 0], [1, 2, 3], [0, 6, 1], [1, 5, 4]])
        sparse = dm18.masks_at(emb, idx)
    ref = dense[idx[:, 0], :, idx[:, 1], idx[:, 2]].view(-1, 56, 56)
    assert sparse.shape == (4, 56, 56)
    assert torch.allclose(sparse, ref, atol=1e-4)
