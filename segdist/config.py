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
import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import (BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, ValidationInfo,
                      field_serializer, field_validator, model_validator)
from pydantic_core import PydanticCustomError

from segdist.errors import ConfigError
from segdist.imageio import DEFAULT_MAX_PIXELS
from segdist.ray_connect import DEFAULT_CONNECT_TIMEOUT_S
from segdist.storage import read_bytes, redact

T = TypeVar("T", bound=BaseModel)


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


# -- the model section ---------------------------------------------------------------------------
# Which fields a family has lives with the family (segdist.proposers); here are the fields every
# family shares, the weights reference they all parse, and the dispatch from model.name to the
# family's config class (through the registry, so a registered proposer validates like a built-in).

EXECUTION_ONLY = {"execution_only": True}
"""``json_schema_extra`` of a field that changes how a run executes but not the bytes it writes:
a resumed run may change it (move from a CPU laptop to a GPU cluster, change its batch size)."""


def execution_only_fields(model: type[BaseModel] | BaseModel) -> frozenset[str]:
    """Names of the fields of a config class (or instance) declared with :data:`EXECUTION_ONLY`."""
    cls = model if isinstance(model, type) else type(model)
    return frozenset(name for name, f in cls.model_fields.items()
                     if isinstance(f.json_schema_extra, dict)
                     and f.json_schema_extra.get("execution_only"))


WEIGHT_KINDS = ("random", "torchvision", "checkpoint", "t7", "state-dict")
_FILE_KINDS = ("checkpoint", "t7", "state-dict")


@dataclass(frozen=True)
class WeightsRef:
    """Which weights a model loads, parsed once from ``model.weights`` at validation.

    kind: "random" (seeded random init, no file), "torchvision" (a torchvision weights enum member,
    ``uri`` is its name, e.g. DEFAULT), "checkpoint" (a segdist safetensors checkpoint), "t7" (an
    original Torch7 model.t7, converted on load) or "state-dict" (a plain state-dict file:
    safetensors or torch.save, loaded with weights_only=True). uri: the file's URI (any fsspec URI)
    or the enum member's name; None for random. explicit: it was written with its ``kind:`` prefix
    (kept when the reference is written back, so a config round-trips).
    """

    kind: str
    uri: str | None = None
    explicit: bool = False

    @property
    def is_file(self) -> bool:
        return self.kind in _FILE_KINDS

    def with_uri(self, uri: str) -> "WeightsRef":
        return WeightsRef(self.kind, uri, self.explicit)

    def text(self) -> str | None:
        """As written in a config (None for random): what run records and manifests show."""
        if self.kind == "random":
            return None
        return f"{self.kind}:{self.uri}" if self.explicit else self.uri

    def __str__(self) -> str:
        return self.text() or "random"


RANDOM_WEIGHTS = WeightsRef("random")

_KIND_FORMS = {
    "random": "leave it unset (or write 'random') for seeded random weights",
    "torchvision": "a torchvision weights enum member as its upper-case name (DEFAULT) or "
                   "torchvision:NAME",
    "checkpoint": "a segdist checkpoint as checkpoint:URI",
    "t7": "an original model.t7 as a URI ending in .t7 or t7:URI",
    "state-dict": "a plain state-dict file as state-dict:URI",
}


def weights_forms(kinds: tuple[str, ...] = WEIGHT_KINDS, file_kind: str | None = None) -> str:
    """How to write each of ``kinds`` in ``model.weights`` (``file_kind``: what a bare path or
    URI means for the family, if it loads files)."""
    forms = "; ".join(_KIND_FORMS[k] for k in kinds)
    if file_kind in kinds and file_kind != "t7":
        forms += f"; a bare path or URI (with a '/' or a '.') is a {file_kind}"
    return forms


def parse_weights(text: str | None, *, file_kind: str) -> WeightsRef:
    """The :class:`WeightsRef` a ``model.weights`` string names (ValueError says how to write it).

    ``file_kind``: what a bare path or URI is for the model's family ("checkpoint" for DeepMask/
    SharpMask, "state-dict" for Mask R-CNN); a bare URI ending in ``.t7`` is always "t7".
    """
    if text is None or text == "random":
        return RANDOM_WEIGHTS
    head, sep, rest = text.partition(":")
    if sep and head in WEIGHT_KINDS and head != "random":
        if not rest:
            raise ValueError(f"{text!r} names no {head} after the prefix {head}:")
        return WeightsRef(head, rest, explicit=True)
    if text.isidentifier() and text.upper() == text:
        return WeightsRef("torchvision", text)
    if "/" in text or "." in text:
        return WeightsRef("t7" if text.lower().endswith(".t7") else file_kind, text)
    raise ValueError(f"{text!r} is ambiguous (a file name without a folder, or an enum name?); "
                     f"model.weights takes: {weights_forms(file_kind=file_kind)}")


class ModelConfig(_Strict):
    """The model section's fields every proposer family shares.

    A family (``segdist.proposers``) subclasses it with its own fields and narrows ``name`` to its
    presets; a ``model:`` section validates into the class of its ``name``'s family (see
    :func:`model_config`), so a field of another family is refused naming the field and the family.
    Class variables: FAMILY (shown in errors), WEIGHT_KINDS (the weights kinds it loads),
    FILE_WEIGHTS (the kind a bare path or URI in ``weights`` means).
    """

    FAMILY: ClassVar[str] = "custom"
    WEIGHT_KINDS: ClassVar[tuple[str, ...]] = WEIGHT_KINDS
    FILE_WEIGHTS: ClassVar[str] = "state-dict"

    name: str = "sharpmask-zoom"
    weights: WeightsRef = RANDOM_WEIGHTS
    proposals: int = Field(default=1000, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", json_schema_extra=EXECUTION_ONLY)
    batch_size: int = Field(default=4, ge=1, json_schema_extra=EXECUTION_ONLY)
    memory_budget_mb: int = Field(default=1024, ge=16, json_schema_extra=EXECUTION_ONLY)
    storage_options: dict[str, Any] = Field(default_factory=dict)  # for a weights file's URI

    @field_validator("weights", mode="plain")
    @classmethod
    def _parse_weights(cls, v: Any, info: ValidationInfo) -> WeightsRef:
        ref = v if isinstance(v, WeightsRef) else None
        if ref is None:
            if v is not None and not isinstance(v, str):
                raise ValueError("must be a string or null")
            ref = parse_weights(v, file_kind=cls.FILE_WEIGHTS)
        if ref.kind not in cls.WEIGHT_KINDS:
            raise ValueError(f"{ref.kind} weights do not fit the {cls.FAMILY} family (model.name "
                             f"{info.data.get('name')!r}), which takes: "
                             f"{weights_forms(cls.WEIGHT_KINDS, cls.FILE_WEIGHTS)}")
        return ref

    @field_serializer("weights")
    def _weights_text(self, ref: WeightsRef) -> str | None:
        return ref.text()

    def weights_help(self) -> str:
        """Where to get this model's weights file and how to pass it, for errors about a missing
        one ("" when the family has nothing to add; Segment Anything names its official file)."""
        return ""


def _family_error(field: str, value: Any, family: str, name: Any, fields: list[str]) -> dict:
    return {"type": PydanticCustomError(
        "family_field", "not a setting of the {family} family (model.name {name}){hint} its "
        "settings: {fields}", {"family": family, "name": repr(name), "fields": ", ".join(fields),
                               "hint": did_you_mean(field, fields) or ";"}),
        "loc": (field,), "input": value}


def _model_section(v: Any) -> Any:
    """A model section (a mapping) validated into its family's config class, found through the
    registry ``segdist.proposers.PROPOSERS`` from ``name``."""
    if isinstance(v, ModelConfig) or not isinstance(v, Mapping):
        return v  # an instance is already validated; anything else fails ModelConfig's validation
    from segdist.proposers import PROPOSERS, config_class  # registered proposers validate too

    name = v.get("name", ModelConfig.model_fields["name"].default)
    if name not in PROPOSERS:
        names = ", ".join(repr(n) for n in PROPOSERS)
        raise ValidationError.from_exception_data("ModelConfig", [{
            "type": PydanticCustomError("unknown_proposer", "must be one of {names}", {"names": names}),
            "loc": ("name",), "input": name}])
    cls = config_class(name)
    unknown = [k for k in v if k not in cls.model_fields]
    if unknown:
        raise ValidationError.from_exception_data("ModelConfig", [
            _family_error(k, v[k], cls.FAMILY, name, list(cls.model_fields)) for k in unknown])
    return cls.model_validate(v)


class _ModelSection(_Strict):
    model: SerializeAsAny[ModelConfig]

    _family = field_validator("model", mode="before")(_model_section)


def model_config(**fields: Any) -> ModelConfig:
    """A model section from keyword fields, validated into its family's config class; ConfigError
    naming the field (``model.x``), the bad value and what is allowed."""
    return validate(_ModelSection, {"model": fields}, "model settings").model


OUTPUT_URI_PLACEHOLDER = "SET-ME"


class OutputConfig(_Strict):
    uri: str
    formats: list[Literal["coco-json", "parquet"]] = Field(default_factory=lambda: ["coco-json", "parquet"])
    chunk_size: int = Field(default=500, ge=1)
    gzip: bool = False
    storage_options: dict[str, Any] = Field(default_factory=dict)
    # A local output path on a cluster of more than one node is refused (each node would write to
    # its own disk) unless this says the path is on a filesystem every node shares (NFS, Lustre).
    shared_filesystem: bool = False

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
    # How long a cluster to join (--address / RAY_ADDRESS) may take to answer before the run stops
    # with an error naming the address (segdist.ray_connect.check_cluster).
    connect_timeout_s: float = Field(default=DEFAULT_CONNECT_TIMEOUT_S, gt=0)
    # How long a transient storage error (connection, throttling, 5xx, timeout) is retried, per
    # file, with exponential backoff, before the read or write counts as failed: a worker keeps
    # its computed chunk in memory meanwhile, the driver its run record and manifest.
    storage_retry_s: float = Field(default=300.0, ge=0)


class JobConfig(_Strict):
    """``segdist generate`` config: dataset in, proposals out (``model`` is the model section
    validated into its family's config class)."""

    dataset: DatasetConfig
    # SerializeAsAny: dumps write the family's fields, not only ModelConfig's.
    model: SerializeAsAny[ModelConfig] = Field(default_factory=lambda: _model_section({}))
    output: OutputConfig
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)

    _family = field_validator("model", mode="before")(_model_section)


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


# Pydantic's messages name its own types ("a valid dictionary or instance of OutputConfig", "a
# valid tuple"); a config file has sections, lists and values.
_PLAIN_MESSAGES = {
    "model_type": "must be a section of settings (key: value lines), not a single value",
    "model_attributes_type": "must be a section of settings (key: value lines), not a single value",
    "dict_type": "must be a mapping (key: value lines)",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "set_type": "must be a list",
}


def _section_fields(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """The field names of the section at ``loc`` under ``model`` (None when it is not a plain
    section: a list item, a model section validated by family, a mapping of anything)."""
    cls: Any = model
    for part in loc:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return None
        if part not in cls.model_fields:
            # The model section is validated into its family's class: the family with the field.
            cls = next((sub for sub in _subclasses(cls) if part in sub.model_fields), None)
            if cls is None:
                return None
        cls = _section_class(cls.model_fields[part].annotation)
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return list(cls.model_fields)
    return None


def _subclasses(cls: type) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]


def _section_class(annotation: Any) -> Any:
    """The BaseModel class inside ``X``, ``X | None`` or ``SerializeAsAny[X]`` (else None)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _section_class(arg)
        if found is not None:
            return found
    origin = getattr(annotation, "__origin__", None)
    return _section_class(origin) if origin is not None and origin is not annotation else None


def did_you_mean(name: str, allowed: list[str]) -> str:
    """``"; did you mean 'x'?"`` for the allowed name nearest to ``name``, or ``""``."""
    close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _format_error(exc: ValidationError, source: str, model: type[BaseModel] | None = None) -> str:
    lines = [f"invalid config {source}:"]
    for err in exc.errors():
        # Union members and validator wrappers appear in locations as tags ("function-after[...]",
        # "int"); a config field name is a plain identifier (or a list index).
        loc_parts = tuple(p for p in err["loc"] if isinstance(p, int) or p.isidentifier())
        loc = ".".join(str(p) for p in loc_parts) or "(top level)"
        msg = err["msg"]
        if err["type"] == "literal_error":
            allowed = err.get("ctx", {}).get("expected", "")
            msg = f"must be one of {allowed}"
        elif err["type"] == "extra_forbidden":
            fields = _section_fields(model, loc_parts[:-1]) if model is not None else None
            hint = did_you_mean(str(loc_parts[-1]), fields) if fields else ""
            msg = "unknown field" + (hint or (f"; the section's fields: {', '.join(fields)}"
                                              if fields else " (check the spelling; see configs/ "
                                              "for examples)"))
        elif err["type"] == "value_error":
            msg = str(err.get("ctx", {}).get("error", msg))
        elif err["type"] in _PLAIN_MESSAGES:
            msg = _PLAIN_MESSAGES[err["type"]]
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        line = f"  {loc}: {msg}{shown}"
        if line not in lines:
            lines.append(line)
    return "\n".join(lines)


def validate(model: type[T], raw: dict, source: str = "<dict>") -> T:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source, model)) from None


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
