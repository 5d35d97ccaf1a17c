"""Outputs unchanged: every preset's proposals of a fixed synthetic set, against stored sha256s.

The digests below were computed by the code *before* the proposer refactor (issue 10, commit
b0f8743) and must not change unless a change of the output is intended (then say so in the commit
and update them from this test's failure message). The dense presets' digests were regenerated
once since (issue 11): the pyramid's level images now follow the original's SpatialReSamplingEx
(aligned corners) instead of align_corners=False bilinear; the Mask R-CNN digests are the
originals. They cover every preset with its defaults and
the dense pipeline's options (NMS, a trunk budget small enough to tile, ``max_image_side``, custom
scales and threshold, a checkpoint file), on CPU with one torch thread: the float results of other
CPU kernel families or torch versions may differ in the last bit, which flips a few mask pixels.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from segdist.config import model_config
from segdist.proposals.types import ImageProposals
from segdist.proposers import build_proposer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Three small images, two of one size (batched together) and one transposed.
SIZES = [(40, 56), (56, 40), (40, 56)]
IDS = [3, 11, 12]
DENSE = dict(trunk="resnet18", proposals=8, device="cpu", batch_size=2)
MASKRCNN = dict(proposals=8, device="cpu", batch_size=2, max_image_side=64)  # runs at <= 64 px

CASES: dict[str, dict] = {
    "deepmask": dict(name="deepmask", **DENSE),
    "deepmask-zoom": dict(name="deepmask-zoom", **DENSE),
    "deepmask-zoom2": dict(name="deepmask-zoom2", **DENSE),
    "sharpmask": dict(name="sharpmask", **DENSE),
    "sharpmask-zoom": dict(name="sharpmask-zoom", **DENSE),
    "sharpmask-zoom2": dict(name="sharpmask-zoom2", **DENSE),
    "maskrcnn": dict(name="maskrcnn", **MASKRCNN),
    "maskrcnn-v2": dict(name="maskrcnn-v2", **MASKRCNN),
    "maskrcnn-rpn": dict(name="maskrcnn-rpn", **MASKRCNN),
    "deepmask+nms": dict(name="deepmask", nms=0.5, **DENSE),
    # the two levels fit the budget once untiled, then in 20 tiles of one cell
    "sharpmask+tiled": dict(name="sharpmask", memory_budget_mb=50,
                            scales={"min": -0.5, "max": 0.0, "step": 0.5}, **DENSE),
    "deepmask+options": dict(name="deepmask", max_image_side=48, threshold=0.4,
                             scales={"min": -1.0, "max": 0.5, "step": 0.5}, **DENSE),
    "deepmask+checkpoint": dict(name="deepmask-zoom", weights="CHECKPOINT",
                                **{**DENSE, "trunk": None}),
    # SAM 2 (the sam2 extra): random Hiera-T, a 2 x 2 point grid, every mask kept (random weights
    # give no stable mask), the cap of 8 cutting the 12
    "sam2-hiera-t": dict(name="sam2-hiera-t", points_per_side=2, pred_iou_thresh=0.0,
                         stability_score_thresh=0.0, box_nms_thresh=1.0, proposals=8, device="cpu",
                         batch_size=2),
}
NEEDS = {"sam2-hiera-t": "sam2"}  # the optional package a case needs

EXPECTED = {
    "deepmask": "3841ce344c1a6eaa37e3ecd40abb3688aa13d72e7dc5c54c5667cbc1ce3b4634",
    "deepmask-zoom": "ea6c98936e9b16277d23b04a565c1b15cd72fcc6cb22a1f192ca9181a25ef834",
    "deepmask-zoom2": "3ea755d03a48926d91e7237a45187520b62463bf37921922aac28ab05e8590db",
    "sharpmask": "073c6c4ce72a62860b18f72754b9383930d33f10bd4b238e55a1c8e68986cafb",
    "sharpmask-zoom": "05922e3d2c27714f0afcaa0a7baa31dcd78a7ec0f30f136961f0548de8bca084",
    "sharpmask-zoom2": "8ce814e47221048d53cb9aba97ad98b8cf2bc6c50020c946c118ee8c33778fc2",
    "maskrcnn": "1c107b63fe05db76ebe06f5205c1db3ab62f3bc545b3c6d53b441b42f8ce0fb4",
    "maskrcnn-v2": "89628197b13ca2d8c0e8af517b89d9be29ca42b1ddbfcc73752c34f875b746cf",
    "maskrcnn-rpn": "49c335345b8cc54cd12f8fe40e06ed168eb6c636647704756931576c56363288",
    "deepmask+nms": "c5541d8889f9001e57042e8b0cdbc27c97d1f573a4a3ac1a6baf69f906b4892f",
    "sharpmask+tiled": "46d6b6e17a5d39fe4c6d215e8615e9adb86dcd42076e4079881654aa0b85ee9f",
    "deepmask+options": "dfb0ea98aa06c442f3e4832622c31a22d0a0bac9f1edc12712cd93d563766a71",
    "deepmask+checkpoint": "205e8a28c453fbebd28a70a919a9b93909fdabaa41e3d5a0ef06a25b107ed11f",
    # added with the SAM presets (issue 12), computed by them
    "sam2-hiera-t": "e2a5b00ba77de6c65f15d2f65fdab67238f1385d70ceed1607048a2ec0afff12",
}


def images() -> list[np.ndarray]:
    """Deterministic uint8 H x W x 3 images: a gradient with two bright rectangles and noise."""
    rng = np.random.default_rng(20261129)
    out = []
    for h, w in SIZES:
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([60 + 100 * xx / w, 80 + 60 * yy / h, 120 + 0 * xx], -1)
        for _ in range(2):
            y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
            img[y0:y0 + h // 3, x0:x0 + w // 3] = rng.uniform(0, 255, 3)
        out.append(np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8))
    return out


def digest(proposals: list[ImageProposals], weights_sha256: str | None) -> str:
    """sha256 over every field of every image's proposals, in a fixed byte layout."""
    h = hashlib.sha256(json.dumps({"weights_sha256": weights_sha256}).encode())
    for p in proposals:
        h.update(json.dumps([p.image_id, p.height, p.width, p.model, len(p)]).encode())
        h.update(p.scores.astype("<f4").tobytes())
        h.update(p.boxes.astype("<f4").tobytes())
        h.update(b"no-masks" if p.counts is None else b"\n".join(p.counts))
        h.update(b"no-labels" if p.labels is None else p.labels.astype("<i4").tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A segdist checkpoint of a seeded random resnet18 DeepMask (its bytes are deterministic)."""
    from segdist.models.checkpoint import save_checkpoint
    from segdist.models.deepmask import deepmask

    torch.manual_seed(7)
    uri = str(tmp_path_factory.mktemp("fp") / "dm18.safetensors")
    save_checkpoint(deepmask(trunk="resnet18"), uri)
    return uri


def run_case(settings: dict, checkpoint_uri: str) -> str:
    settings = {**settings}
    if settings.get("weights") == "CHECKPOINT":
        settings["weights"] = checkpoint_uri
    gen = build_proposer(model_config(**settings))
    out = []
    for s in range(0, len(IDS), 2):  # as a worker calls it: batch_size images at a time
        out += gen(images()[s:s + 2], IDS[s:s + 2])
    assert [p.image_id for p in out] == IDS
    return digest(out, gen.weights_sha256)


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_unchanged_fingerprint(case, checkpoint):
    if case in NEEDS:
        pytest.importorskip(NEEDS[case])
    got = run_case(CASES[case], checkpoint)
    assert got == EXPECTED.get(case), (
        f"{case}: proposals changed (sha256 {got}, stored {EXPECTED.get(case)}); if intended, "
        "update EXPECTED and say why in the commit")
