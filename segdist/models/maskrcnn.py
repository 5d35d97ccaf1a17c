"""torchvision's Mask R-CNN (maskrcnn_resnet50_fpn and _v2) set up as a proposal source.

The builder returns the network in eval mode with box score threshold 0 and ``proposals``
detections per image (so every image yields k detections across all classes), and the weights'
sha256. Running it for proposals (masks or RPN mode) is :mod:`segdist.proposers.maskrcnn`.

Weights (a :class:`~segdist.config.WeightsRef`): random (seeded), a torchvision weights enum
member (the torch.hub cache is used; offline without a cached copy a clear error says how to pass
a file), or a state-dict file (torch.save loaded with weights_only=True, or safetensors).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from segdist.config import RANDOM_WEIGHTS, WeightsRef
from segdist.errors import ConfigError

VERSIONS = ("v1", "v2")


def _builder_and_enum(version: str):
    from torchvision.models.detection import mask_rcnn

    if version == "v1":
        return mask_rcnn.maskrcnn_resnet50_fpn, mask_rcnn.MaskRCNN_ResNet50_FPN_Weights
    if version == "v2":
        return mask_rcnn.maskrcnn_resnet50_fpn_v2, mask_rcnn.MaskRCNN_ResNet50_FPN_V2_Weights
    raise ConfigError(f"Mask R-CNN version must be one of {VERSIONS} (got {version!r})")


def build_maskrcnn(*, version: str = "v1", weights: WeightsRef = RANDOM_WEIGHTS, proposals: int = 1000,
                   storage_options: Mapping[str, Any] | None = None, seed: int = 0,
                   **kwargs: Any) -> tuple[nn.Module, str | None]:
    """A torchvision Mask R-CNN in eval mode set up for proposals; returns (model, weights sha256).

    Args:
        version: "v1" (maskrcnn_resnet50_fpn) or "v2" (maskrcnn_resnet50_fpn_v2).
        weights: random (seeded by ``seed``, sha256 None), a torchvision enum member ("DEFAULT"
            or a member name), or a state-dict file.
        proposals: detections per image (and RPN proposals kept at test time, at least 1000).
        kwargs: passed to the torchvision builder (e.g. ``min_size``/``max_size``: the resolution
            the model runs at).
    """
    builder, enum_cls = _builder_and_enum(version)
    opts = dict(num_classes=91, box_score_thresh=0.0, box_detections_per_img=proposals,
                rpn_post_nms_top_n_test=max(1000, proposals))
    opts.update(kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builder(weights=None, weights_backbone=None, **opts)
    if weights.kind == "random":
        return model.eval(), None
    from segdist.models.weights import enum_state_dict, read_state_dict

    if weights.kind == "torchvision":
        try:
            member = enum_cls[weights.uri]
        except KeyError:
            names = [m.name for m in enum_cls] + ["DEFAULT"]
            raise ConfigError(f"unknown {enum_cls.__name__} member {weights.uri!r}; use one of "
                              f"{names} or the URI of a weights file") from None
        state, digest = enum_state_dict(member)
    elif weights.kind == "state-dict":
        state, digest = read_state_dict(weights.uri, storage_options)
    else:
        raise ConfigError(f"model.weights: {weights.kind} weights do not fit Mask R-CNN; pass a "
                          "torchvision enum member (e.g. DEFAULT) or a state-dict file")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"weights {weights} do not fit maskrcnn_resnet50_fpn"
                          f"{'_v2' if version == 'v2' else ''} with 91 classes: "
                          f"{str(exc).splitlines()[0][:300]}") from None
    return model.eval(), digest
