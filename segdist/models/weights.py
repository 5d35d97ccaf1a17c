"""Reading weight files and torchvision weight enums, with clear errors offline.

Weight files are read from any fsspec URI into memory and parsed either as safetensors or as a
``torch.save`` state dict loaded with ``weights_only=True`` (no pickled code runs). The sha256 of the
file bytes is returned so that proposals can record which weights made them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import torch

from segdist.errors import ConfigError, StorageError
from segdist.storage import read_bytes


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def safetensors_metadata(data: bytes) -> dict[str, str] | None:
    """The ``__metadata__`` dict of a safetensors file's header, or None if ``data`` is not one.

    The format is: 8 bytes little-endian header length N, then N bytes of JSON.
    """
    if len(data) < 8:
        return None
    (n,) = struct.unpack("<Q", data[:8])
    if n <= 1 or 8 + n > len(data) or data[8:9] != b"{":
        return None
    try:
        header = json.loads(data[8:8 + n])
    except ValueError:
        return None
    if not isinstance(header, dict):
        return None
    return dict(header.get("__metadata__") or {})


def parse_state_dict(data: bytes, uri: str) -> dict[str, torch.Tensor]:
    """A state dict from file bytes: safetensors, or torch.save'd (loaded with weights_only=True).

    A dict wrapping the state dict under "state_dict" or "model" (common training checkpoints) is
    unwrapped. Raises ConfigError when the bytes are neither.
    """
    if safetensors_metadata(data) is not None:
        from safetensors.torch import load as st_load

        return dict(st_load(data))
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a non-checkpoint file
        raise ConfigError(
            f"{uri} is neither a safetensors file nor a torch.save'd state dict loadable with "
            f"weights_only=True ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping) and len(obj) <= 3:
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{uri} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj)


def read_state_dict(uri: str, storage_options: Mapping[str, Any] | None = None
                    ) -> tuple[dict[str, torch.Tensor], str]:
    """Read a weights file from any fsspec URI; returns (state_dict, sha256 of the file bytes)."""
    data = read_bytes(uri, storage_options)
    return parse_state_dict(data, uri), sha256_bytes(data)


def hub_cache_file(url: str) -> str:
    """Where torch.hub (and so torchvision's weight enums) caches ``url`` under TORCH_HOME."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def enum_state_dict(weights: Any) -> tuple[dict[str, torch.Tensor], str]:
    """State dict of a torchvision weights enum member (downloads it if not cached).

    Returns (state_dict, sha256 of the cached file). Offline with no cached copy: StorageError that
    says where to put the file or how to pass it as a file instead.
    """
    path = hub_cache_file(weights.url)
    try:
        state = weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError
        raise StorageError(
            f"cannot download torchvision weights {weights} from {weights.url} "
            f"({type(exc).__name__}: {exc}); without network access download that file elsewhere "
            f"and either pass it as a file (model.weights=/path/or/s3/uri/{os.path.basename(path)}) "
            f"or put it at {path}"
        ) from None
    with open(path, "rb") as f:
        digest = sha256_bytes(f.read())
    return dict(state), digest
