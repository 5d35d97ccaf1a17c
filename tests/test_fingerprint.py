"""Outputs unchanged: every preset's proposals of a fixed synthetic set, against stored sha256s.

The digests below were computed by the code *before* the proposer refactor (issue 10, commit
b0f8743) and must not change unless a change of the output is intended (then say so in the commit
and update them from this test's failure message). They cover every preset with its defaults and
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
}

EXPECTED = {
    "deepmask": "358b98287028bed249d72afb0aae16c7501f6569e195e86276d00dc0b8330818",
    "deepmask-zoom": "d89ed60b1b2b9724b085b212b1666bbf2cf2f1310c4fc37eb70eae38a8b8634d",
    "deepmask-zoom2": "e41981f35fb898f37eb7293ed4ce76231d78e414efd700ad59b21e1e6006c7f9",
    "sharpmask": "b07cb5cdba3bf1033c7f9b604a82875378b02a973b471f9326e4473d94747e1b",
    "sharpmask-zoom": "34f7fd40f0f5398827b6b2a3dc9b6c8b50b1f887da639cbbfbfcd860ba9dacbf",
    "sharpmask-zoom2": "3d97d63f25d3751fb896e8e910f06be9678a1bf4f79f4a26ddee5d707c1f8633",
    "maskrcnn": "92ab88751a3fa95d33ba1646d219b9299d600742d98e462d407cabec4b3e2a28",
    "maskrcnn-v2": "9330d864a6306131d00314481517a513078fa3445932a1647f657e692082392c",
    "maskrcnn-rpn": "f6fc438a4390bb98b73136b82abb4609933524ff737a17b121fef374f3b4d645",
    "deepmask+nms": "9e66d43dc9f9fbf0fb6cf5a4ac2c46764ac85dacd1d6b2239be97a364e240eaf",
    "sharpmask+tiled": "aa7dd5371387eeab51ab01f6ff9f9530e1aab12834eb9b4a3bee077a54519eca",
    "deepmask+options": "fe91a6a6fa84972c3d723c7b2c8a355545fb53aa79de4e539edd412936c9cfe2",
    "deepmask+checkpoint": "657a10c20e6f2b2bb638ff3028a5ad51190ee9ad125fae140cda6eea725dc6bc",
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
    got = run_case(CASES[case], checkpoint)
    assert got == EXPECTED.get(case), (
        f"{case}: proposals changed (sha256 {got}, stored {EXPECTED.get(case)}); if intended, "
        "update EXPECTED and say why in the commit")
