"""The dense proposer's scale presets and the plain settings its pipeline takes (no torch here:
config validation reads the preset names)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from segdist.errors import ConfigError

# preset -> (smin, smax) in log2 units, step 0.5 (the original's -scales / zoom variants)
PRESET_RANGES: dict[str, tuple[float, float]] = {
    "deepmask": (-2.5, 0.5),
    "sharpmask": (-2.5, 0.5),
    "deepmask-zoom": (-2.5, 1.0),
    "sharpmask-zoom": (-2.5, 1.0),
    "deepmask-zoom2": (-2.5, 1.5),
    "sharpmask-zoom2": (-2.5, 1.5),
}


def scale_exponents(smin: float, smax: float, step: float = 0.5) -> list[float]:
    """log2 scales smin, smin+step, ..., up to smax inclusive (robust to float steps)."""
    if step <= 0 or smax < smin:
        raise ConfigError(f"scale range needs step > 0 and max >= min (got {smin}..{smax} step {step})")
    n = int(math.floor((smax - smin) / step + 1e-9)) + 1
    return [smin + i * step for i in range(n)]


def preset_scales(name: str) -> tuple[float, ...]:
    """The pyramid scales (2^s) of a DeepMask/SharpMask preset name."""
    if name not in PRESET_RANGES:
        raise ConfigError(f"no scale pyramid for model {name!r}; presets: {sorted(PRESET_RANGES)}")
    smin, smax = PRESET_RANGES[name]
    return tuple(2.0 ** e for e in scale_exponents(smin, smax, 0.5))


@dataclass(frozen=True)
class InferenceSettings:
    """How whole-image inference runs.

    scales: pyramid scales (2^s). proposals: k, kept per image. threshold: mask binarisation
    probability. nms: IoU threshold of an optional box NMS over the candidates (None: no NMS, as the
    original). max_image_side: longer side the pyramid is computed for (None: the image's own).
    memory_budget_mb: bounds the trunk tiles and the mask/RLE batches. tile_cells: embedding cells
    per tile side (None: derived from the budget). precision: autocast dtype of the networks
    ("fp32" = none). channels_last: NHWC inputs. nms_pool: with NMS, candidates kept = nms_pool * k.
    """

    scales: tuple[float, ...]
    proposals: int = 1000
    threshold: float = 0.2
    nms: float | None = None
    max_image_side: int | None = None
    memory_budget_mb: int = 1024
    tile_cells: int | None = None
    precision: str = "fp32"
    channels_last: bool = False
    nms_pool: int = 3

    def __post_init__(self) -> None:
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ConfigError(f"inference scales must be positive and non-empty (got {self.scales})")
        if self.proposals < 1:
            raise ConfigError(f"proposals must be >= 1 (got {self.proposals})")
        if not 0 < self.threshold < 1:
            raise ConfigError(f"mask threshold must be a probability in (0, 1) (got {self.threshold})")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be fp32, bf16 or fp16 (got {self.precision!r})")
        if self.tile_cells is not None and self.tile_cells < 1:
            raise ConfigError(f"tile_cells must be >= 1 (got {self.tile_cells})")
