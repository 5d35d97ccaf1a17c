"""Mask R-CNN proposers (torchvision's maskrcnn_resnet50_fpn and _v2).

Presets: ``maskrcnn`` (v1, masks), ``maskrcnn-v2`` (v2, masks), ``maskrcnn-rpn`` (v1, the region
proposal network's boxes, no masks). This module is the family's door (:class:`MaskRCNNConfig`,
:func:`build`); :mod:`.proposer` runs the network. Torch is imported by :func:`build` only.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from segdist.config import ModelConfig

if TYPE_CHECKING:
    from segdist.proposers.maskrcnn.proposer import MaskRCNNProposer

log = logging.getLogger(__name__)

PRESETS = {"maskrcnn": ("v1", "masks"), "maskrcnn-v2": ("v2", "masks"), "maskrcnn-rpn": ("v1", "rpn")}
RANDOM_SEED = 0  # random weights are deterministic: the same config gives the same proposals


class MaskRCNNConfig(ModelConfig):
    """Mask R-CNN presets: the shared fields plus ``max_image_side``.

    weights: unset (seeded random), a torchvision weights enum member (DEFAULT, COCO_V1), or a
    plain state-dict file (a bare path/URI). max_image_side: caps the resolution the network runs
    at (torchvision resizes to short side 800, long side <= 1333: both are capped).
    """

    FAMILY: ClassVar[str] = "Mask R-CNN"
    WEIGHT_KINDS: ClassVar[tuple[str, ...]] = ("random", "torchvision", "state-dict")
    FILE_WEIGHTS: ClassVar[str] = "state-dict"

    name: Literal[tuple(PRESETS)] = "maskrcnn"  # type: ignore[valid-type]
    max_image_side: int | None = Field(default=None, ge=32)


def build(config: MaskRCNNConfig) -> "MaskRCNNProposer":
    """A ready Mask R-CNN proposer for ``config`` (weights loaded, on its device, eval mode)."""
    from segdist.device import gpu_path, resolve_device
    from segdist.models.fold import fold_batchnorm
    from segdist.models.maskrcnn import build_maskrcnn
    from segdist.proposers.maskrcnn.proposer import MaskRCNNProposer

    device = resolve_device(config.device)
    version, mode = PRESETS[config.name]
    size = {}
    if config.max_image_side:
        size = dict(min_size=min(800, config.max_image_side),
                    max_size=min(1333, config.max_image_side))
    model, sha = build_maskrcnn(version=version, weights=config.weights, proposals=config.proposals,
                                storage_options=config.storage_options, seed=RANDOM_SEED, **size)
    if gpu_path(device):
        fold_batchnorm(model.backbone)  # FrozenBatchNorm2d: 1 kernel per conv instead of ~5
    precision = config.precision
    if device.type != "cuda" and precision != "fp32":
        log.warning("model.precision=%s applies on CUDA only; running fp32 on %s", precision,
                    device)
        precision = "fp32"
    return MaskRCNNProposer(config.name, model.to(device), mode, proposals=config.proposals,
                            memory_budget_mb=config.memory_budget_mb, batch_size=config.batch_size,
                            precision=precision, weights_sha256=sha)
