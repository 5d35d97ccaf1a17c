"""Mask R-CNN proposals (torchvision): paste geometry, masks and rpn modes, weights paths."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from segdist.config import WeightsRef, model_config
from segdist.errors import ConfigError, StorageError
from segdist.models.maskrcnn import build_maskrcnn
from segdist.models.weights import hub_cache_file
from segdist.proposers import build_proposer
from segdist.proposers.maskrcnn.proposer import MaskRCNNProposer
from segdist.proposers.paste import paste_batch, paste_geometry

SMALL = dict(min_size=128, max_size=160, rpn_post_nms_top_n_test=200)  # cheap on CPU


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def saved_v1(tmp_path_factory):
    """A v1 state dict saved by the test (random weights, seed 123) and its sha256."""
    model, _ = build_maskrcnn(version="v1", seed=123)
    path = tmp_path_factory.mktemp("w") / "maskrcnn_v1.pth"
    torch.save(model.state_dict(), path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest(), model.state_dict()


def test_paste_equals_torchvision_paste_masks_in_image():
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    g = torch.Generator().manual_seed(0)
    probs = torch.rand(60, 1, 28, 28, generator=g)
    boxes = torch.rand(60, 4, generator=g) * 110
    boxes[:, 2:] += boxes[:, :2] + 1
    boxes[:3] = torch.tensor([[-30.0, -20.0, 40.0, 50.0], [100.0, 90.0, 200.0, 180.0],
                              [5.2, 7.9, 6.1, 8.3]])  # outside the image, beyond it, sub-pixel
    ref = paste_masks_in_image(probs, boxes, (120, 150))[:, 0] > 0.5
    padded, tops, lefts, h, w = paste_geometry(probs[:, 0], boxes)
    size = torch.full((60,), 120), torch.full((60,), 150)
    ours = paste_batch(padded, tops, lefts, h, w, *size, 120, 150, 0.5)
    assert ref.any()
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_masks_mode_random_weights(version):
    model, sha = build_maskrcnn(version=version, proposals=12, **SMALL)
    assert sha is None
    hwc = np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    img = torch.from_numpy(hwc).permute(2, 0, 1)
    (p,) = MaskRCNNProposer("maskrcnn", model, "masks", proposals=12, memory_budget_mb=16)([hwc], [4])
    assert p.image_id == 4 and p.model == "maskrcnn"
    assert len(p.scores) == 12 and np.all(np.diff(p.scores) <= 0)
    assert p.labels.dtype == np.int32 and np.all((p.labels >= 1) & (p.labels <= 90))
    rles = [{"size": [90, 120], "counts": c} for c in p.counts]
    assert mask_utils.decode(rles).shape == (90, 120, 12)
    assert np.allclose(mask_utils.toBbox(rles), p.boxes)
    # equal to torchvision's own forward + postprocess, masks binarised at 0.5
    with torch.inference_mode():
        ref = model([img.float() / 255])[0]
    order = torch.sort(ref["scores"], descending=True, stable=True).indices
    assert np.allclose(p.scores, ref["scores"][order].numpy(), atol=1e-6)
    probs = ref["masks"][order][:, 0].numpy()
    ours = mask_utils.decode(rles).transpose(2, 0, 1).astype(bool)
    # random weights put the probabilities near 0.5 everywhere: pixels may only disagree where
    # torchvision's float value is within rounding of the threshold
    differ = ours != (probs > 0.5)
    assert differ.mean() < 1e-3 and np.all(np.abs(probs[differ] - 0.5) < 1e-5)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_batched_stages_equal_torchvision_per_image(version):
    """The batch-at-once RPN filtering, pooling, detection post-processing and mask head give
    each image torchvision's own numbers for that image alone, bit for bit."""
    from collections import OrderedDict

    from segdist.proposers.maskrcnn import stages

    model, _ = build_maskrcnn(version=version, proposals=25, **SMALL)
    rng = np.random.default_rng(5)
    imgs = [torch.from_numpy(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).permute(2, 0, 1)
            .float() / 255 for _ in range(3)]
    with torch.inference_mode():
        il, _ = model.transform(imgs)
        per_image = [model.backbone(il.tensors[i:i + 1]) for i in range(3)]
        feats = OrderedDict((k, torch.cat([f[k] for f in per_image])) for k in per_image[0])
        props = stages.rpn_proposals(model.rpn, il, feats, model.roi_heads.box_roi_pool)
        dets = stages.detections(model.roi_heads, feats, props, il.image_sizes)
        probs = stages.mask_probabilities(model.roi_heads, feats, dets)
        assert min(props.counts) > 100 and dets.counts == [25] * 3
        for i, img in enumerate(imgs):
            il1, _ = model.transform([img])
            f1 = model.backbone(il1.tensors)
            ref_props, _ = model.rpn(il1, f1)
            # the same proposals; exactly tied probabilities may come in another order (ours:
            # the order the per-level top n gave them, torchvision: its unstable final sort)
            (mine,) = [p for j, p in enumerate(props.per_image()) if j == i]
            assert torch.equal(torch.unique(ref_props[0], dim=0), torch.unique(mine, dim=0))
            (ref,), _ = model.roi_heads(f1, [mine], il1.image_sizes)
            s, e = sum(dets.counts[:i]), sum(dets.counts[:i + 1])
            for name, ours in (("boxes", dets.boxes), ("scores", dets.scores),
                               ("labels", dets.labels), ("masks", probs)):
                theirs = ref[name][:, 0] if name == "masks" else ref[name]
                assert torch.equal(ours[s:e], theirs), (i, name)


def test_an_image_gets_the_same_proposals_alone_and_in_any_batch():
    model, _ = build_maskrcnn(version="v1", proposals=15, **SMALL)
    gen = MaskRCNNProposer("maskrcnn", model, proposals=15, batch_size=3)
    rng = np.random.default_rng(4)
    imgs = [rng.integers(0, 255, s, dtype=np.uint8) for s in [(90, 120, 3), (120, 90, 3),
                                                             (90, 120, 3), (90, 120, 3)]]
    together = gen(imgs, [0, 1, 2, 3])
    in_twos = gen(imgs[:2], [0, 1]) + gen(imgs[2:], [2, 3])
    for i, p in enumerate(together):
        (alone,) = gen(imgs[i:i + 1], [i])
        for other in (alone, in_twos[i]):
            assert other.image_id == p.image_id and other.counts == p.counts
            assert other.scores.tobytes() == p.scores.tobytes()
            assert other.boxes.tobytes() == p.boxes.tobytes()
            assert other.labels.tobytes() == p.labels.tobytes()


def test_host_syncs_per_batch_do_not_grow_with_the_batch():
    """On the GPU path a batch costs 4 host reads whatever its size (the RPN's and the
    detections' NMS answers, the RLE's change positions, the one copy of the results); of the ops
    only the network's modules run per image (for exactness), not the post-processing."""
    from collections import Counter

    from segdist.device import assume_gpu_path
    from segdist.profiling import OpCounter, profiling

    rng = np.random.default_rng(3)
    imgs = [rng.integers(0, 255, (90, 120, 3), dtype=np.uint8) for _ in range(3)]  # one batch
    counts = {}
    with assume_gpu_path():
        model, _ = build_maskrcnn(version="v1", proposals=20, **SMALL)
        gen = MaskRCNNProposer("maskrcnn", model, proposals=20, batch_size=3)
        gen(imgs[:1], [0])  # the poolers' one-off set-up (a host read) happens here
        for n in (1, 3):
            c = OpCounter()
            with torch.inference_mode(), profiling(c, Counter()):
                out = gen(imgs[:n], list(range(n)))
            assert [len(p) for p in out] == [20] * n
            counts[n] = c.ops, c.syncs
    assert counts[1][1] == counts[3][1] == 4
    per_image = (counts[3][0] - counts[1][0]) / 2
    assert per_image < 0.4 * counts[1][0]


def test_batches_hold_one_image_size_in_input_order_out():
    """torchvision pads a batch to its largest image and the padding reaches every image's
    features: the proposer batches images of one size only (a window's sizes in any order),
    so an image's proposals never depend on batch-mates of another size."""
    model, _ = build_maskrcnn(version="v1", proposals=10, **SMALL)
    gen = MaskRCNNProposer("maskrcnn", model, proposals=10, batch_size=4)
    rng = np.random.default_rng(8)
    shapes = [(90, 120), (120, 90), (90, 120), (100, 100), (90, 120)]
    imgs = [rng.integers(0, 255, (*s, 3), dtype=np.uint8) for s in shapes]
    seen = []
    orig = gen._batch
    gen._batch = lambda batch, ids: seen.append([tuple(b.shape[1:]) for b in batch]) or orig(batch, ids)
    out = gen(imgs, [10, 11, 12, 13, 14])
    assert [p.image_id for p in out] == [10, 11, 12, 13, 14]
    assert [(p.height, p.width) for p in out] == shapes
    assert sorted(map(tuple, seen)) == [((90, 120),) * 3, ((100, 100),), ((120, 90),)]
    # an image of another size batched with it changes nothing: its own batch is the same
    (first,) = gen(imgs[1:2], [11])
    assert first.scores.tobytes() == out[1].scores.tobytes() and first.counts == out[1].counts


def test_rpn_mode_boxes_and_objectness():
    model, _ = build_maskrcnn(version="v1", proposals=50, **SMALL)
    hwc = np.random.default_rng(1).integers(0, 255, (80, 100, 3), dtype=np.uint8)
    img = torch.from_numpy(hwc).permute(2, 0, 1)
    (p,) = MaskRCNNProposer("maskrcnn-rpn", model, "rpn", proposals=50)([hwc], [0])
    assert p.counts is None and p.labels is None
    assert len(p.scores) == 50 and np.all(np.diff(p.scores) <= 0)
    assert np.all((p.scores >= 0) & (p.scores <= 1))
    x, y, w, h = p.boxes.T
    assert np.all(x >= 0) and np.all(y >= 0) and np.all(x + w <= 100 + 1e-3) and np.all(y + h <= 80 + 1e-3)
    # the boxes are the RPN's own proposals, rescaled to the image
    with torch.inference_mode():
        il, _ = model.transform([img.float() / 255])
        boxes, _ = model.rpn(il, model.backbone(il.tensors))
    ref = boxes[0][:50] * torch.tensor([100 / il.image_sizes[0][1], 80 / il.image_sizes[0][0]] * 2)
    assert np.allclose(p.boxes[:, :2], ref[:, :2].numpy(), atol=1e-3)


def test_proposer_modes():
    img = np.random.default_rng(2).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    cfg = dict(proposals=30, device="cpu", max_image_side=128)  # the model runs at <= 128 px
    (p,) = build_proposer(model_config(name="maskrcnn-rpn", **cfg))([img], [5])
    assert p.model == "maskrcnn-rpn" and not p.has_masks and len(p) == 30 and p.labels is None
    gen = build_proposer(model_config(name="maskrcnn", **cfg))
    assert gen.model.transform.max_size == 128
    (p,) = gen([img], [6])
    assert p.has_masks and len(p) == 30 and len(p.labels) == 30 and (p.height, p.width) == (60, 80)


def test_weights_from_local_file(saved_v1):
    path, digest, state = saved_v1
    model, sha = build_maskrcnn(version="v1", weights=WeightsRef("state-dict", str(path)), **SMALL)
    assert sha == digest
    assert torch.equal(model.state_dict()["roi_heads.box_predictor.cls_score.weight"],
                       state["roi_heads.box_predictor.cls_score.weight"])
    with pytest.raises(ConfigError, match="do not fit"):
        build_maskrcnn(version="v2", weights=WeightsRef("state-dict", str(path)), **SMALL)


def test_weights_enum_through_torchvision_cache(saved_v1, tmp_path, monkeypatch):
    """'DEFAULT' resolves through torchvision's weights enum and torch.hub's cache: a file saved
    under the enum's expected name in TORCH_HOME is found without network."""
    import os

    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    path, digest, state = saved_v1
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = hub_cache_file(MaskRCNN_ResNet50_FPN_Weights.DEFAULT.url)
    os.makedirs(os.path.dirname(cached))
    os.symlink(path, cached)
    model, sha = build_maskrcnn(version="v1", weights=WeightsRef("torchvision", "DEFAULT"), **SMALL)
    assert sha == digest
    assert torch.equal(model.state_dict()["backbone.body.conv1.weight"], state["backbone.body.conv1.weight"])


def test_weights_enum_offline_says_how_to_pass_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # closed port: fails like no network
    with pytest.raises(StorageError, match="pass it as a file"):
        build_maskrcnn(version="v2", weights=WeightsRef("torchvision", "DEFAULT"), **SMALL)
    with pytest.raises(ConfigError, match="unknown"):
        build_maskrcnn(version="v1", weights=WeightsRef("torchvision", "NOT_A_MEMBER"), **SMALL)


def test_reduced_precision_on_the_cpu_warns_and_runs_fp32(caplog):
    with caplog.at_level("WARNING"):
        gen = build_proposer(model_config(name="maskrcnn", precision="bf16", device="cpu",
                                          proposals=5, max_image_side=64))
    assert gen.precision == "fp32"
    assert "model.precision=bf16 applies on CUDA only; running fp32 on cpu" in caplog.text
