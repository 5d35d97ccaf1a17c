"""Run configs: YAML files validated once, at the edge, into typed objects.

A config file is YAML; ``--set a.b.c=value`` overrides (value parsed as YAML) apply before
validation. Errors name the field, the bad value and what is allowed. Library code takes the typed
objects (or plain arguments), never raw dicts.

Secrets: storage credentials belong in the environment (AWS_ACCESS_KEY_ID, ...) or in a section's
``storage_options``; :func:`public_dict` redacts them before a config is logged or written to a
manifest.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from segdist.errors import ConfigError
from segdist.imageio import DEFAULT_MAX_PIXELS
from segdist.storage import read_bytes, redact

T = TypeVar("T", bound=BaseModel)

MODEL_NAMES = (
    "deepmask", "deepmask-zoom", "deepmask-zoom2",
    "sharpmask", "sharpmask-zoom", "sharpmask-zoom2",
    "maskrcnn", "maskrcnn-v2", "maskrcnn-rpn",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetConfig(_Strict):
    """Where the images and ground truth are.

    format=coco: ``annotations`` is an instances JSON URI, ``images`` the image folder URI.
    format=lvis: the same with an LVIS annotation file (images named by ``coco_url``, see
    ``coco_url_layout``); ``format: coco`` reads such files too.
    format=voc: ``root`` is a VOC20xx folder URI (with JPEGImages/, Annotations/, ImageSets/...),
    ``split`` an ImageSets list name (train, val, trainval, test).
    format=images: no annotations; every image under the folder ``images`` (recursive), or the
    lines of the list file ``image_list``, filtered by ``extensions`` and ``glob``.
    ``max_pixels``: the image decoder refuses images with more pixels (width x height, read from the
    header before decoding: the decompression-bomb guard); default Pillow's own limit. Raise it
    for trusted large images.
    """

    format: Literal["coco", "lvis", "voc", "images"] = "coco"
    annotations: str | None = None
    images: str | None = None
    root: str | None = None
    split: str = "val"
    image_set: Literal["Main", "Segmentation"] = "Main"
    # format=images: a text file of image URIs or paths relative to `images`, one per line.
    image_list: str | None = None
    # format=images: file extensions to keep (no dot, any case); None: the image extensions for a
    # folder, every line of a list file.
    extensions: list[str] | None = None
    # format=images: fnmatch pattern over the path relative to `images` ('*' also matches '/').
    glob: str | None = None
    # COCO/LVIS image entries without file_name: the file is `images` + the coco_url's last folder
    # and file name ("split-folder": train2017/000000000139.jpg; LVIS val mixes train2017 and
    # val2017 images) or its file name alone ("flat": all images in one folder).
    coco_url_layout: Literal["split-folder", "flat"] = "split-folder"
    limit: int | None = Field(default=None, ge=1)
    image_ids: list[int] | None = None
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1)
    storage_options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _needs_location(self):
        if self.format in ("coco", "lvis") and (not self.annotations or not self.images):
            raise ValueError(f"dataset.format '{self.format}' needs dataset.annotations (the "
                             "annotation JSON URI) and dataset.images (image folder URI)")
        if self.format == "voc" and not self.root:
            raise ValueError("dataset.format 'voc' needs dataset.root (the VOC20xx folder URI)")
        if self.format == "images" and not (self.images or self.image_list):
            raise ValueError("dataset.format 'images' needs dataset.images (a folder URI: every "
                             "image under it) or dataset.image_list (a file of image URIs)")
        for name in ("images", "image_list"):
            value = getattr(self, name)
            if value and OUTPUT_URI_PLACEHOLDER in value:
                raise ValueError(f"dataset.{name} is still the placeholder {value!r}: set it to "
                                 f"your images, e.g. --set dataset.{name}=s3://my-bucket/photos")
        if self.extensions is not None and not [e for e in self.extensions if e.strip(". ")]:
            raise ValueError("dataset.extensions must name at least one extension (e.g. [jpg, "
                             "png]) or be left out")
        return self


class ScalesConfig(_Strict):
    """Scale pyramid 2^min .. 2^max in steps of 2^step (log2 units)."""

    min: float = -2.5
    max: float = 1.0
    step: float = Field(default=0.5, gt=0)

    @model_validator(mode="after")
    def _ordered(self):
        if self.max < self.min:
            raise ValueError(f"model.scales.max ({self.max}) must be >= model.scales.min ({self.min})")
        return self


class ModelConfig(_Strict):
    """Which proposal model runs, with which weights, on which device and precision."""

    name: Literal[MODEL_NAMES] = "sharpmask-zoom"  # type: ignore[valid-type]
    weights: str | None = None  # URI of a segdist checkpoint / torchvision file; "DEFAULT" = enum
    trunk: Literal["resnet50", "resnet34", "resnet18"] | None = None  # None: from checkpoint/preset
    proposals: int = Field(default=1000, ge=1)
    scales: ScalesConfig | None = None  # None: the preset's pyramid
    nms: float | None = Field(default=None, gt=0, le=1)
    threshold: float = Field(default=0.2, gt=0, lt=1)  # mask binarisation probability
    max_image_side: int | None = Field(default=None, ge=32)
    batch_size: int = Field(default=4, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False
    memory_budget_mb: int = Field(default=1024, ge=16)
    storage_options: dict[str, Any] = Field(default_factory=dict)  # for a weights file's URI


OUTPUT_URI_PLACEHOLDER = "SET-ME"


class OutputConfig(_Strict):
    uri: str
    formats: list[Literal["coco-json", "parquet"]] = Field(default_factory=lambda: ["coco-json", "parquet"])
    chunk_size: int = Field(default=500, ge=1)
    gzip: bool = False
    storage_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("uri")
    @classmethod
    def _not_placeholder(cls, v):
        # configs/ ship with this placeholder: the output location is the one thing to fill in.
        if OUTPUT_URI_PLACEHOLDER in v:
            raise ValueError(f"output.uri is still the placeholder {v!r}: set it to where the "
                             "proposals should go, e.g. --set output.uri=s3://my-bucket/proposals/run1")
        return v

    @field_validator("formats")
    @classmethod
    def _non_empty(cls, v):
        if not v:
            raise ValueError("output.formats must name at least one of 'coco-json', 'parquet'")
        return sorted(set(v))


class ResourcesConfig(_Strict):
    num_workers: int | None = Field(default=None, ge=1)  # None: one per GPU, else 1 CPU worker
    gpus_per_worker: float = Field(default=1.0, gt=0)
    cpus_per_worker: float = Field(default=1.0, gt=0)
    decode_threads: int = Field(default=4, ge=1)
    max_chunk_attempts: int = Field(default=3, ge=1)
    max_actor_restarts: int = Field(default=3, ge=0)
    # None: no limit. Else the seconds a chunk may run on a worker (from when it is the worker's
    # oldest chunk in flight) before the driver kills the worker, replaces it and retries the chunk.
    chunk_timeout_s: float | None = Field(default=None, gt=0)
    # None: GPU workers if the cluster has GPUs when the job starts; true: GPU workers even if no GPU
    # node is up yet (an autoscaling cluster scales them up); false: CPU workers.
    use_gpus: bool | None = None


class JobConfig(_Strict):
    """``segdist generate`` config: dataset in, proposals out."""

    dataset: DatasetConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    output: OutputConfig
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)


def _set_path(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.get(k)
        if nxt is None:
            nxt = cur[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: '{k}' is a value, not a section")
        cur = nxt
    cur[keys[-1]] = value


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """Apply ``key.path=value`` strings (value parsed as YAML: numbers, lists, null)."""
    raw = copy.deepcopy(raw)  # never mutate the caller's (possibly shared) nested dicts
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value, e.g. model.scales.max=1.0")
        key, value = item.split("=", 1)
        _set_path(raw, key.strip(), yaml.safe_load(value) if value.strip() else None)
    return raw


def _format_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "literal_error":
            allowed = err.get("ctx", {}).get("expected", "")
            msg = f"must be one of {allowed}"
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see configs/ for examples)"
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {loc}: {msg}{shown}")
    return "\n".join(lines)


def validate(model: type[T], raw: dict, source: str = "<dict>") -> T:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None


def load_config(model: type[T], path: str | Path | None, overrides: list[str] | None = None,
                base: dict | None = None) -> T:
    """Read YAML at ``path`` (any URI), merge onto ``base``, apply overrides, validate into ``model``."""
    raw: dict = dict(base or {})
    source = "<overrides>"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(read_bytes(str(path)).decode("utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a YAML mapping at the top level")
        raw.update(loaded)
    return validate(model, apply_overrides(raw, overrides), source)


def public_dict(cfg: BaseModel) -> dict:
    """The config as plain data with storage credentials redacted (safe to log and to write)."""
    def scrub(obj):
        if isinstance(obj, dict):
            return {k: (redact(v) if k == "storage_options" else scrub(v)) for k, v in obj.items()}
        if isinstance(obj, list):
            return [scrub(v) for v in obj]
        return obj

    return scrub(cfg.model_dump(mode="json"))
