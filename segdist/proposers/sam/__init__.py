"""Segment Anything proposers: SAM (ViT-B/L/H) and SAM 2 / 2.1 (Hiera-T/S/B+/L) automatic mask
generation, on the official model code (the ``segment-anything`` and ``sam2`` packages, the
optional extras ``segdist[sam]`` and ``segdist[sam2]``).

This module is the family's door: the presets (:data:`SAM_PRESETS`, :data:`SAM2_PRESETS`: the
official network and checkpoint file of each), the config classes (:class:`SamConfig`,
:class:`Sam2Config`: the official generators' parameters with their defaults) and the builders
:func:`build_sam`, :func:`build_sam2`. The rest of the package: ``grid`` (crops and point grids),
``nets`` (the official networks, weights, install errors), ``runners`` (image encoding and batched
prompt decoding per model generation), ``transformer`` (the decoder's transformer, its first
layer's image side once per image), ``generator`` (the automatic mask generator, a Proposer),
``regions`` (SAM's small-region removal).
Nothing here imports torch or the SAM packages: validating a config does not load them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, model_validator

from segdist.config import ModelConfig

if TYPE_CHECKING:
    from segdist.proposers.sam.generator import SamProposer

log = logging.getLogger(__name__)

RANDOM_SEED = 0  # random weights are deterministic: the same config gives the same proposals


@dataclass(frozen=True)
class SamPreset:
    """One official network: ``arch`` (segment_anything's ``sam_model_registry`` key, or the
    packaged Hydra config of sam2's ``build_sam2``) and the official checkpoint file at ``url``."""

    generation: Literal["sam", "sam2"]
    arch: str
    url: str

    @property
    def checkpoint(self) -> str:
        return self.url.rsplit("/", 1)[1]


_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
_SAM2_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/072824/"
_SAM21_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"

SAM_PRESETS: dict[str, SamPreset] = {
    "sam-vit-b": SamPreset("sam", "vit_b", _SAM_URL + "sam_vit_b_01ec64.pth"),
    "sam-vit-l": SamPreset("sam", "vit_l", _SAM_URL + "sam_vit_l_0b3195.pth"),
    "sam-vit-h": SamPreset("sam", "vit_h", _SAM_URL + "sam_vit_h_4b8939.pth"),
}
SAM2_PRESETS: dict[str, SamPreset] = {
    "sam2-hiera-t": SamPreset("sam2", "configs/sam2/sam2_hiera_t.yaml", _SAM2_URL + "sam2_hiera_tiny.pt"),
    "sam2-hiera-s": SamPreset("sam2", "configs/sam2/sam2_hiera_s.yaml", _SAM2_URL + "sam2_hiera_small.pt"),
    "sam2-hiera-b+": SamPreset("sam2", "configs/sam2/sam2_hiera_b+.yaml",
                               _SAM2_URL + "sam2_hiera_base_plus.pt"),
    "sam2-hiera-l": SamPreset("sam2", "configs/sam2/sam2_hiera_l.yaml", _SAM2_URL + "sam2_hiera_large.pt"),
    "sam2.1-hiera-t": SamPreset("sam2", "configs/sam2.1/sam2.1_hiera_t.yaml",
                                _SAM21_URL + "sam2.1_hiera_tiny.pt"),
    "sam2.1-hiera-s": SamPreset("sam2", "configs/sam2.1/sam2.1_hiera_s.yaml",
                                _SAM21_URL + "sam2.1_hiera_small.pt"),
    "sam2.1-hiera-b+": SamPreset("sam2", "configs/sam2.1/sam2.1_hiera_b+.yaml",
                                 _SAM21_URL + "sam2.1_hiera_base_plus.pt"),
    "sam2.1-hiera-l": SamPreset("sam2", "configs/sam2.1/sam2.1_hiera_l.yaml",
                                _SAM21_URL + "sam2.1_hiera_large.pt"),
}
PRESETS: dict[str, SamPreset] = {**SAM_PRESETS, **SAM2_PRESETS}


class _GeneratorConfig(ModelConfig):
    """The automatic mask generator's parameters, shared by SAM and SAM 2 (docs/models.md).

    points_per_side: prompts per image side (points_per_side^2 single-point prompts) on the whole
    image; crop layer i gets int(points_per_side / crop_n_points_downscale_factor^i) per side.
    points_per_batch: prompts decoded at once (the official batches: it may change the last bits).
    pred_iou_thresh: keep masks whose predicted IoU is above it (0: no filter).
    stability_score_thresh: keep masks whose stability score (IoU of the mask binarised at
    mask_threshold +- stability_score_offset) is at least it (0: no filter).
    box_nms_thresh: box IoU of the NMS within a crop. crop_n_layers: extra crop layers (layer i:
    2^i x 2^i crops overlapping by crop_overlap_ratio of the short side at layer 1), merged with
    an NMS at crop_nms_thresh preferring smaller crops. min_mask_region_area: holes and islands
    smaller than this many pixels are removed (SAM: opencv after generation; SAM 2: on the
    low-resolution masks, by the sam2 package's CUDA extension when it is built).
    mask_threshold: logit at which masks are binarised.
    """

    WEIGHT_KINDS: ClassVar[tuple[str, ...]] = ("random", "state-dict")
    FILE_WEIGHTS: ClassVar[str] = "state-dict"

    points_per_side: int = Field(default=32, ge=1)
    points_per_batch: int = Field(default=64, ge=1)
    pred_iou_thresh: float = Field(default=0.88, ge=0)
    stability_score_thresh: float = Field(default=0.95, ge=0)
    stability_score_offset: float = Field(default=1.0, ge=0)
    mask_threshold: float = 0.0
    box_nms_thresh: float = Field(default=0.7, gt=0, le=1)
    crop_n_layers: int = Field(default=0, ge=0, le=4)
    crop_nms_thresh: float = Field(default=0.7, gt=0, le=1)
    crop_overlap_ratio: float = Field(default=512 / 1500, ge=0, lt=1)
    crop_n_points_downscale_factor: int = Field(default=1, ge=1)
    min_mask_region_area: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _every_layer_has_points(self):
        last = int(self.points_per_side / self.crop_n_points_downscale_factor ** self.crop_n_layers)
        if last < 1:
            raise ValueError(
                f"model.points_per_side={self.points_per_side} with crop_n_points_downscale_factor="
                f"{self.crop_n_points_downscale_factor} leaves crop layer {self.crop_n_layers} "
                "without points; raise points_per_side or lower crop_n_layers")
        return self

    @property
    def preset(self) -> SamPreset:
        return PRESETS[self.name]

    def weights_help(self) -> str:
        preset = self.preset
        return (f"the official {self.name} checkpoint is {preset.checkpoint}: download {preset.url} "
                f"and pass it as model.weights=/path/or/s3/uri/{preset.checkpoint}")


class SamConfig(_GeneratorConfig):
    """SAM presets (ViT-B/L/H): SamAutomaticMaskGenerator's parameters and defaults.

    weights: unset (seeded random) or the official checkpoint file (a state dict, any fsspec URI:
    ``sam_vit_h_4b8939.pth`` etc., docs/models.md), loaded with weights_only=True.
    """

    FAMILY: ClassVar[str] = "Segment Anything"

    name: Literal[tuple(SAM_PRESETS)] = "sam-vit-h"  # type: ignore[valid-type]


class Sam2Config(_GeneratorConfig):
    """SAM 2 and 2.1 presets (Hiera-T/S/B+/L): SAM2AutomaticMaskGenerator's parameters and
    defaults (pred_iou_thresh 0.8), with its ``use_m2m`` (a second decoder pass refining each mask
    from its own low-resolution logits) and ``multimask_output`` (three masks per point, or one
    chosen by stability)."""

    FAMILY: ClassVar[str] = "Segment Anything 2"

    name: Literal[tuple(SAM2_PRESETS)] = "sam2-hiera-l"  # type: ignore[valid-type]
    pred_iou_thresh: float = Field(default=0.8, ge=0)
    use_m2m: bool = False
    multimask_output: bool = True


def build_sam(config: SamConfig) -> "SamProposer":
    """A ready SAM proposer for ``config`` (official network, weights loaded, on its device)."""
    return _build(config)


def build_sam2(config: Sam2Config) -> "SamProposer":
    """A ready SAM 2 / 2.1 proposer for ``config`` (official network, weights loaded, on its device)."""
    return _build(config)


def _build(config: _GeneratorConfig) -> "SamProposer":
    from segdist.device import resolve_device
    from segdist.proposers.sam.generator import GeneratorSettings, SamProposer
    from segdist.proposers.sam.nets import load_network
    from segdist.proposers.sam.runners import make_runner

    device = resolve_device(config.device)
    precision = config.precision
    if device.type != "cuda" and precision != "fp32":
        log.warning("model.precision=%s applies on CUDA only; running fp32 on %s", precision, device)
        precision = "fp32"
    model, sha = load_network(config.name, config.preset, config.weights, config.storage_options,
                              seed=RANDOM_SEED, weights_help=config.weights_help())
    runner = make_runner(config.preset.generation, model.to(device).eval(),
                         min_region_area=config.min_mask_region_area, precision=precision)
    settings = GeneratorSettings.from_config(config)
    return SamProposer(config.name, runner, settings, batch_size=config.batch_size,
                       weights_sha256=sha)
