"""``segdist train`` config: which model, which data, the original's optimisation schedule, outputs.

Defaults are the original's (train.lua, TrainerDeepMask.lua, TrainerSharpMask.lua): batch 32,
4000 batches per epoch, 300 epochs, SGD with momentum 0.9 and weight decay 5e-4 for DeepMask,
plain SGD for SharpMask, LR 1e-3 / 5e-4 / 1e-4. Defaults that depend on the architecture
(g_sz, hfreq, the LR schedule, momentum, weight decay) are filled in before validation, so the
validated config always holds concrete numbers (and the saved ``config.yaml`` shows them).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from segdist.config import DatasetConfig

Arch = Literal["deepmask", "sharpmask"]

# (first epoch, learning rate), epochs 1-based as in the original's updateScheduler
DEEPMASK_LR_SCHEDULE = [(1, 1e-3), (51, 5e-4), (121, 1e-4)]
SHARPMASK_LR_SCHEDULE = [(1, 1e-3), (51, 5e-4), (81, 1e-4)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainModelConfig(_Section):
    """The network being trained.

    ``trunk_weights``: torchvision ImageNet ResNet weights for the trunk, as a file URI (a
    torchvision state dict, ``.pth``) or a weights enum name (``DEFAULT``, ``IMAGENET1K_V1``;
    needs a reachable hub). None: random initialisation. ``deepmask``: for ``arch: sharpmask``, the
    URI of the trained DeepMask checkpoint that is frozen under the refinement modules.
    ``o_sz``: side of the DeepMask mask head's output (upsampled bilinearly to ``data.g_sz``).
    """

    arch: Arch = "deepmask"
    trunk: Literal["resnet50", "resnet34", "resnet18"] = "resnet50"
    i_sz: int = Field(default=160, ge=32)
    o_sz: int = Field(default=56, ge=4)
    trunk_weights: str | None = None
    deepmask: str | None = None
    storage_options: dict[str, Any] = Field(default_factory=dict)  # for the two URIs above

    @field_validator("i_sz")
    @classmethod
    def _multiple_of_16(cls, v: int) -> int:
        if v % 16:
            raise ValueError(f"model.i_sz must be a multiple of 16 (the trunk's stride), got {v}")
        return v

    @model_validator(mode="after")
    def _sharpmask_needs_deepmask(self):
        if self.arch == "sharpmask" and not self.deepmask:
            raise ValueError("model.arch 'sharpmask' trains on a frozen DeepMask: set model.deepmask "
                             "to the URI of a trained DeepMask checkpoint (.safetensors)")
        return self


class TrainDataConfig(_Section):
    """Where the training (and held-out) images are, and the sampler's jitter.

    ``g_sz``: label size (original: 112 for DeepMask, 160 for SharpMask at i_sz 160; scaled with
    i_sz). ``scale_jitter``: +- log2 units around the canonical object size. ``shift_jitter``:
    +- pixels of centre jitter at the canonical scale (original 16 at i_sz 160; scaled with i_sz).
    ``image_cache``: decoded images kept per loader process (repeat samples skip the decode).
    """

    train: DatasetConfig
    val: DatasetConfig | None = None
    g_sz: int = Field(ge=4)
    scale_jitter: float = Field(default=0.25, ge=0, le=2)
    shift_jitter: float = Field(ge=0)
    loader_workers: int = Field(default=2, ge=0)
    image_cache: int = Field(default=64, ge=0)


class OptimConfig(_Section):
    """The optimiser and its schedule. ``hfreq`` is the share of score batches (0: masks only).

    ``name``: ``sgd`` (the original; ``momentum``, ``weight_decay``) or ``adamw`` (not the
    original's: for short runs from a random trunk, e.g. the CPU demo; ``momentum`` is unused).
    """

    name: Literal["sgd", "adamw"] = "sgd"
    batch_size: int = Field(default=32, ge=1)
    steps_per_epoch: int = Field(default=4000, ge=1)
    epochs: int = Field(default=300, ge=1)
    hfreq: float = Field(ge=0, le=1)
    lr_schedule: list[tuple[int, float]]
    momentum: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0)

    @field_validator("lr_schedule")
    @classmethod
    def _schedule(cls, v: list[tuple[int, float]]) -> list[tuple[int, float]]:
        if not v or v[0][0] != 1:
            raise ValueError("optim.lr_schedule must start at epoch 1, e.g. [[1, 0.001], [51, 0.0005]]")
        epochs = [e for e, _ in v]
        if epochs != sorted(set(epochs)):
            raise ValueError(f"optim.lr_schedule epochs must increase strictly, got {epochs}")
        if any(lr <= 0 for _, lr in v):
            raise ValueError("optim.lr_schedule learning rates must be > 0")
        return v


class PatchEvalConfig(_Section):
    """Per-patch evaluation during training (evalPerPatch) on held-out jittered patches."""

    every_epochs: int = Field(default=2, ge=1)
    patches: int = Field(default=6400, ge=1)
    batch_size: int = Field(default=32, ge=1)
    seed: int = 1


class TrainOutputConfig(_Section):
    """Checkpoints, logs and the best model go under ``uri`` (any fsspec URI)."""

    uri: str
    storage_options: dict[str, Any] = Field(default_factory=dict)
    checkpoint_every: int | None = Field(default=None, ge=1)  # steps; None: at each epoch's end
    keep: int = Field(default=2, ge=1)  # step checkpoints kept (older ones are deleted)


class TrainResourcesConfig(_Section):
    """Ray Train workers (one process per worker; DDP across them)."""

    workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    torch_threads: int | None = Field(default=None, ge=1)  # None: torch's default
    max_failures: int = Field(default=0, ge=-1)  # Ray Train restarts; -1: unlimited
    ray_storage: str | None = None  # local folder for Ray Train's own run records


class TrainConfig(_Section):
    """Everything ``segdist train`` needs; see configs/train-*.yaml."""

    model: TrainModelConfig = Field(default_factory=TrainModelConfig)
    data: TrainDataConfig
    optim: OptimConfig
    eval: PatchEvalConfig = Field(default_factory=PatchEvalConfig)
    output: TrainOutputConfig
    resources: TrainResourcesConfig = Field(default_factory=TrainResourcesConfig)
    seed: int = 0
    log_every: int = Field(default=50, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _arch_defaults(cls, raw: Any) -> Any:
        """Fill the architecture-dependent defaults that the user left out."""
        if not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        model = raw.get("model") or {}
        if isinstance(model, BaseModel):
            model = model.model_dump()
        arch = model.get("arch", "deepmask")
        i_sz = model.get("i_sz", 160)
        sharp = arch == "sharpmask"
        if isinstance(raw.get("data"), dict):
            data = dict(raw["data"])
            if isinstance(i_sz, int):
                data.setdefault("g_sz", i_sz if sharp else round(i_sz * 112 / 160))
                data.setdefault("shift_jitter", 16.0 * i_sz / 160)
            raw["data"] = data
        optim = raw.get("optim") or {}
        if isinstance(optim, dict):
            optim = dict(optim)
            optim.setdefault("hfreq", 0.0 if sharp else 0.5)
            optim.setdefault("lr_schedule", SHARPMASK_LR_SCHEDULE if sharp else DEEPMASK_LR_SCHEDULE)
            optim.setdefault("momentum", 0.0 if sharp else 0.9)
            optim.setdefault("weight_decay", 0.0 if sharp else 5e-4)
            raw["optim"] = optim
        return raw

    @property
    def w_sz(self) -> int:
        """Training window side: i_sz plus 16 px of context on each side."""
        return self.model.i_sz + 32

    @property
    def obj_sz(self) -> int:
        """Canonical object size (longer side, px in the window): ceil(i_sz * 128 / 224)."""
        return math.ceil(self.model.i_sz * 128 / 224)

    @property
    def total_steps(self) -> int:
        return self.optim.epochs * self.optim.steps_per_epoch


def lr_at_epoch(schedule: list[tuple[int, float]], epoch: int) -> float:
    """Learning rate of 1-based ``epoch``: the last schedule row whose first epoch is <= epoch."""
    lr = schedule[0][1]
    for first, value in schedule:
        if epoch >= first:
            lr = value
    return lr
