"""DeepMask and SharpMask proposers (the original's presets, with their scale pyramids).

This module is the family's door: :class:`DenseConfig` (the model section's fields for these
presets) and :func:`build`. The rest of the package is the whole-image pipeline it runs:
``settings`` (presets, plain settings), ``pyramid`` (levels, windows, tiles), ``pool`` (the
candidate pool), ``pipeline`` (collect, select, masks, RLE), ``proposer`` (images in, proposals out).
Torch is imported by :func:`build` only: validating a config does not load it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from segdist.config import EXECUTION_ONLY, ModelConfig
from segdist.errors import ConfigError
from segdist.proposers.dense.settings import (PRESET_RANGES, InferenceSettings, preset_scales,
                                              scale_exponents)

if TYPE_CHECKING:
    from segdist.proposers.dense.proposer import DenseProposer

log = logging.getLogger(__name__)

PRESETS = tuple(PRESET_RANGES)
RANDOM_SEED = 0  # random weights are deterministic: the same config gives the same proposals


class ScalesConfig(BaseModel):
    """Scale pyramid 2^min .. 2^max in steps of 2^step (log2 units)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min: float = -2.5
    max: float = 1.0
    step: float = Field(default=0.5, gt=0)

    @model_validator(mode="after")
    def _ordered(self):
        if self.max < self.min:
            raise ValueError(f"model.scales.max ({self.max}) must be >= model.scales.min ({self.min})")
        return self


class DenseConfig(ModelConfig):
    """DeepMask / SharpMask presets: the shared fields plus the pyramid, trunk and mask settings.

    weights: unset (seeded random), a segdist checkpoint (a bare path/URI; ``segdist train``
    writes them, ``segdist convert-t7`` converts the originals) or the original's model.t7
    (converted on load). A SharpMask checkpoint serves the DeepMask presets with its DeepMask.
    """

    FAMILY: ClassVar[str] = "DeepMask/SharpMask"
    WEIGHT_KINDS: ClassVar[tuple[str, ...]] = ("random", "checkpoint", "t7")
    FILE_WEIGHTS: ClassVar[str] = "checkpoint"

    name: Literal[PRESETS] = "sharpmask-zoom"  # type: ignore[valid-type]
    trunk: Literal["resnet50", "resnet34", "resnet18"] | None = None  # None: from checkpoint/preset
    scales: ScalesConfig | None = None  # None: the preset's pyramid
    nms: float | None = Field(default=None, gt=0, le=1)
    threshold: float = Field(default=0.2, gt=0, lt=1)  # mask binarisation probability
    max_image_side: int | None = Field(default=None, ge=32)
    channels_last: bool = Field(default=False, json_schema_extra=EXECUTION_ONLY)


def build(config: DenseConfig) -> "DenseProposer":
    """A ready DeepMask/SharpMask proposer for ``config`` (weights loaded, on its device, eval)."""
    import torch

    from segdist.device import gpu_path, resolve_device
    from segdist.models.fold import fold_batchnorm
    from segdist.proposers.dense.proposer import DenseProposer

    device = resolve_device(config.device)
    precision, channels_last = config.precision, config.channels_last
    if device.type != "cuda" and (precision != "fp32" or channels_last):
        log.warning("model.precision=%s / channels_last=%s apply on CUDA only; running fp32 on %s",
                    precision, channels_last, device)
        precision, channels_last = "fp32", False
    model, sha = _load_model(config)
    if gpu_path(device):
        # One kernel per conv+norm instead of two. Within float32 rounding of the unfolded model
        # (tests/test_fold.py), not bit-identical: the CPU keeps the unfolded model, so CPU
        # outputs stay those of the stored fingerprints.
        fold_batchnorm(model)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.scales is not None:
        s = config.scales
        scales = tuple(2.0 ** e for e in scale_exponents(s.min, s.max, s.step))
    else:
        scales = preset_scales(config.name)
    settings = InferenceSettings(
        scales=scales, proposals=config.proposals, threshold=config.threshold, nms=config.nms,
        max_image_side=config.max_image_side, memory_budget_mb=config.memory_budget_mb,
        precision=precision, channels_last=channels_last)
    return DenseProposer(config.name, model, settings, device=device, batch_size=config.batch_size,
                         weights_sha256=sha)


def _load_model(config: DenseConfig):
    """(model in eval mode on the CPU, weights sha256 or None) for a dense preset."""
    import torch

    from segdist.models.checkpoint import build_model, load_weights
    from segdist.models.deepmask import DeepMaskConfig

    kind = config.name.split("-")[0]  # "deepmask" or "sharpmask"
    ref = config.weights
    if ref.kind == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model = build_model(kind, DeepMaskConfig(arch=config.trunk or "resnet50"))
        return model.eval(), None
    model, info = load_weights(ref, config.storage_options)
    if info.kind != kind:
        if kind == "deepmask" and info.kind == "sharpmask":
            log.info("%s: using the DeepMask inside SharpMask checkpoint %s", config.name, ref.uri)
            model = model.deepmask
        else:
            raise ConfigError(f"model.weights {ref.uri} is a {info.kind} checkpoint; the "
                              f"{config.name} preset needs a {kind} checkpoint")
    if config.trunk is not None and config.trunk != info.config.arch:
        raise ConfigError(f"model.trunk={config.trunk} but checkpoint {ref.uri} has a "
                          f"{info.config.arch} trunk; leave model.trunk unset to use the checkpoint's")
    return model.eval(), info.sha256
