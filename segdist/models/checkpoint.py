"""segdist checkpoints: one safetensors file whose metadata carries the architecture settings.

Metadata (safetensors ``__metadata__``, string values): ``segdist`` = JSON
``{"format": "segdist-checkpoint", "version": 1, "kind": "deepmask" | "sharpmask",
"config": {DeepMaskConfig fields}, "sharpmask": {"km": 32, "ks": 32} (SharpMask only),
"preset": <model preset or null>, "extra": {...caller metadata...}}``.
Tensors are the model's ``state_dict()`` (for a SharpMask the DeepMask's under ``deepmask.``).
The file is written with :func:`segdist.storage.atomic_write` to any fsspec URI; loading reports the
sha256 of the file bytes, which proposals record as ``weights_sha256``. The t7 converter writes this
format too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from segdist.config import WeightsRef
from segdist.errors import ConfigError
from segdist.models.deepmask import DeepMask, DeepMaskConfig
from segdist.models.sharpmask import SharpMask
from segdist.models.sharpmask import sharpmask as build_sharpmask
from segdist.models.weights import parse_state_dict, safetensors_metadata, sha256_bytes
from segdist.storage import atomic_write, read_bytes

FORMAT = "segdist-checkpoint"
VERSION = 1


@dataclass(frozen=True)
class CheckpointInfo:
    """What a loaded checkpoint was: kind ("deepmask"/"sharpmask"), the DeepMaskConfig, SharpMask
    km/ks (or None), the preset it was saved for (or None), the caller's extra metadata, the sha256
    of the file bytes and its URI."""

    kind: str
    config: DeepMaskConfig
    sharpmask: dict[str, int] | None
    preset: str | None
    extra: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""
    uri: str = ""


def _describe(model: nn.Module) -> tuple[str, DeepMaskConfig, dict[str, int] | None]:
    if isinstance(model, SharpMask):
        return "sharpmask", model.cfg, {"km": model.km, "ks": model.ks}
    if isinstance(model, DeepMask):
        return "deepmask", model.cfg, None
    raise TypeError(f"save_checkpoint takes a DeepMask or SharpMask, got {type(model).__name__}")


def checkpoint_bytes(model: nn.Module, metadata: Mapping[str, Any] | None = None,
                     preset: str | None = None) -> bytes:
    """The checkpoint file's bytes (see the module docstring for the format)."""
    from safetensors.torch import save

    kind, cfg, sm = _describe(model)
    meta = {"format": FORMAT, "version": VERSION, "kind": kind, "config": cfg.to_dict(),
            "sharpmask": sm, "preset": preset, "extra": dict(metadata or {})}
    try:
        header = json.dumps(meta, sort_keys=True)
    except TypeError as exc:
        raise ConfigError(f"checkpoint metadata must be JSON-serialisable: {exc}") from None
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return save(state, metadata={"segdist": header})


def save_checkpoint(model: nn.Module, uri: str, metadata: Mapping[str, Any] | None = None,
                    preset: str | None = None,
                    storage_options: Mapping[str, Any] | None = None) -> str:
    """Write ``model`` (DeepMask or SharpMask) to ``uri`` atomically; returns the file's sha256."""
    data = checkpoint_bytes(model, metadata, preset)
    atomic_write(uri, data, storage_options)
    return sha256_bytes(data)


def build_model(kind: str, cfg: DeepMaskConfig, sharpmask: Mapping[str, int] | None = None
                ) -> nn.Module:
    """An untrained model of a kind named in a checkpoint ("deepmask" or "sharpmask") with the
    architecture ``cfg`` (and, for a SharpMask, its ``{"km", "ks"}``); the one builder by name."""
    if kind == "deepmask":
        return DeepMask(cfg)
    if kind == "sharpmask":
        sm = dict(sharpmask or {})
        return build_sharpmask(deepmask=DeepMask(cfg), km=int(sm.get("km", 32)),
                               ks=int(sm.get("ks", 32)))
    raise ConfigError(f"unknown model kind {kind!r} in checkpoint; expected deepmask or sharpmask")


def read_checkpoint_info(data: bytes, uri: str) -> CheckpointInfo:
    """Parse a checkpoint's metadata; ConfigError if ``data`` is not a segdist checkpoint."""
    meta = safetensors_metadata(data)
    raw = (meta or {}).get("segdist")
    if raw is None:
        raise ConfigError(
            f"{uri} is not a segdist checkpoint (no 'segdist' metadata in a safetensors file); "
            "save models with segdist.models.checkpoint.save_checkpoint, or convert an original "
            "model.t7 with `segdist convert-t7 model.t7 out.safetensors`")
    try:
        d = json.loads(raw)
        if d.get("format") != FORMAT:
            raise ValueError(f"format {d.get('format')!r}")
        if int(d.get("version", 0)) > VERSION:
            raise ValueError(f"version {d.get('version')} is newer than this segdist reads ({VERSION})")
        cfg = DeepMaskConfig.from_dict(d["config"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{uri}: unreadable segdist checkpoint metadata ({exc})") from None
    return CheckpointInfo(kind=d.get("kind", ""), config=cfg, sharpmask=d.get("sharpmask"),
                          preset=d.get("preset"), extra=dict(d.get("extra") or {}),
                          sha256=sha256_bytes(data), uri=uri)


def load_model(uri: str, storage_options: Mapping[str, Any] | None = None
               ) -> tuple[nn.Module, CheckpointInfo]:
    """Read a checkpoint from any fsspec URI: (model in eval mode on the CPU, its info).

    Raises StorageError if it cannot be read and ConfigError if it is not a segdist checkpoint or
    its tensors do not match the architecture in its metadata.
    """
    data = read_bytes(uri, storage_options)
    info = read_checkpoint_info(data, uri)
    model = build_model(info.kind, info.config, info.sharpmask)
    state = parse_state_dict(data, uri)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ConfigError(f"{uri}: tensors do not match a {info.kind} with {info.config}: "
                          f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                          f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    bad = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if bad:
        raise ConfigError(f"{uri}: shape mismatch for {bad[:3]} (expected "
                          f"{[tuple(own[k].shape) for k in bad[:3]]}, got "
                          f"{[tuple(state[k].shape) for k in bad[:3]]})")
    model.load_state_dict(state)
    model.eval()
    return model, info


def load_weights(ref: WeightsRef, storage_options: Mapping[str, Any] | None = None
                 ) -> tuple[nn.Module, CheckpointInfo]:
    """A DeepMask/SharpMask from a weights reference of kind "checkpoint" (:func:`load_model`) or
    "t7" (the original's model.t7, converted on load by :mod:`segdist.models.t7`): (model in eval
    mode on the CPU, what it is, with the sha256 of the file's bytes)."""
    if ref.kind == "checkpoint":
        return load_model(ref.uri, storage_options)
    if ref.kind == "t7":
        from segdist.models.t7 import load_t7

        converted, sha = load_t7(ref.uri, storage_options)
        model = converted.model
        sm = {"km": model.km, "ks": model.ks} if isinstance(model, SharpMask) else None
        return model, CheckpointInfo(kind=converted.kind, config=model.cfg, sharpmask=sm,
                                     preset=None, sha256=sha, uri=ref.uri)
    raise ConfigError(f"model.weights: {ref.kind} weights are not a DeepMask/SharpMask; pass a "
                      "segdist checkpoint or the original's model.t7")
