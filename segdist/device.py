"""Where models run: the device a config names, and the autocast context of a precision."""

from __future__ import annotations

import contextlib

import torch

from segdist.errors import ConfigError

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str, field: str = "model.device") -> torch.device:
    """"auto" -> cuda when available else cpu; "cuda" without a CUDA device is a ConfigError
    naming the config ``field`` it came from."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{field} is 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for a precision ("fp32" = disabled, "bf16", "fp16") on ``device``."""
    dtype = _AUTOCAST.get(precision)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


# The profile (``segdist bench --profile``) runs on the CPU but must describe the GPU path: where
# code branches on the device (RLE backend, BatchNorm folding), it asks :func:`gpu_path`, which the
# profile can force to True.
# A process-wide flag (not a context variable), so threads the code under profile starts see it.
_ASSUME_GPU = [False]


def gpu_path(device: torch.device | str) -> bool:
    """Whether code on ``device`` takes its GPU branch: a CUDA device, or any device while
    :func:`assume_gpu_path` is active (the profile)."""
    return torch.device(device).type == "cuda" or _ASSUME_GPU[0]


@contextlib.contextmanager
def assume_gpu_path():
    """Within this context every device takes its GPU branch (see :func:`gpu_path`)."""
    before, _ASSUME_GPU[0] = _ASSUME_GPU[0], True
    try:
        yield
    finally:
        _ASSUME_GPU[0] = before
