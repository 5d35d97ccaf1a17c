"""SharpMask: refinement size, shapes, frozen DeepMask, window gathering, sparse == all windows."""

from __future__ import annotations

import pytest
import torch

from segdist.models.deepmask import DeepMask, DeepMaskConfig, count_parameters
from segdist.models.sharpmask import SharpMask, gather_windows


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_refinement_parameter_count_resnet50():
    sm = SharpMask(DeepMask(DeepMaskConfig(arch="resnet50")))
    n = sum(p.numel() for p in sm.refinement_parameters())
    assert n == 2_750_535  # "about 2.75M" (paper: under 3M)
    assert n == count_parameters(sm) - count_parameters(sm.deepmask)
    # channels after each module 16, 8, 4, 2; final conv 2 -> 1
    assert [net[-1].out_channels for net in sm.neths] == [16, 8, 4, 2]
    assert [net[-1].out_channels for net in sm.netvs] == [16, 8, 4, 2]
    assert sm.final.in_channels == 2 and sm.final.out_channels == 1


@pytest.fixture(scope="module")
def sm18():
    torch.manual_seed(0)
    return SharpMask(DeepMask(DeepMaskConfig(arch="resnet18"))).eval()


def test_training_forward_shapes_and_frozen_deepmask(sm18):
    sm18.train()
    assert not sm18.deepmask.training  # frozen DeepMask stays in eval mode
    x = torch.randn(2, 3, 192, 192)
    mask, score = sm18(x)
    assert mask.shape == (2, 160, 160) and score.shape == (2,)
    mask.sum().backward()
    assert all(p.grad is None for p in sm18.deepmask.parameters())
    assert all(p.grad is not None for p in sm18.refinement_parameters())
    sm18.zero_grad(set_to_none=True)
    sm18.eval()


def test_gather_windows_slices_and_zero_fills():
    fmap = torch.arange(2 * 3 * 6 * 7, dtype=torch.float32).view(2, 3, 6, 7)
    idx = torch.tensor([[0, 0, 0], [1, 1, 2], [1, 2, 3]])
    out = gather_windows(fmap, idx, step=2, size=3)
    assert out.shape == (3, 3, 3, 3)
    assert torch.equal(out[0], fmap[0, :, 0:3, 0:3])
    assert torch.equal(out[1], fmap[1, :, 2:5, 4:7])
    # window (4..6, 6..8) sticks out of the 6 x 7 map: zero there
    assert torch.equal(out[2, :, :2, :1], fmap[1, :, 4:6, 6:7])
    assert (out[2, :, 2, :] == 0).all() and (out[2, :, :, 1:] == 0).all()


def test_sparse_refinement_equals_all_windows(sm18):
    """Refining only the selected windows gives the masks of running every window."""
    with torch.no_grad():
        emb, hmaps = sm18.dense(torch.randn(1, 3, 224, 256))
        h, w = emb.shape[-2:]
        rr, cc = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        every = torch.stack([torch.zeros(h * w, dtype=torch.long), rr.flatten(), cc.flatten()], 1)
        all_masks = sm18.masks_at(emb, hmaps, every)           # (h*w) x 160 x 160
        pick = torch.tensor([5, 0, h * w - 1])
        some = sm18.masks_at(emb, hmaps, every[pick])
    assert [m.shape[1] for m in hmaps] == [16, 8, 4, 2]
    assert all_masks.shape == (h * w, 160, 160)
    assert torch.allclose(some, all_masks[pick], atol=1e-4)
