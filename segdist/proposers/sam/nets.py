"""The official SAM / SAM 2 networks of a preset, with their weights.

Networks come from the official packages only (``segment_anything.sam_model_registry``, sam2's
``build_sam2`` with its packaged Hydra config), so a checkpoint of the official release loads
into exactly the network it was trained as. Weights are seeded random (tests, plumbing) or a
state-dict file from any fsspec URI read by :func:`segdist.models.weights.read_state_dict` (the
official ``.pth`` / ``.pt`` files are plain state dicts, SAM 2's wrapped as ``{"model": ...}``,
which it unwraps; safetensors too; torch files with ``weights_only=True``); the sha256 of the
file's bytes is what the proposer reports. Every failure is one line that says what to install or
to get.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from segdist.config import WeightsRef
from segdist.errors import ConfigError, SegdistError, StorageError

if TYPE_CHECKING:
    import torch

    from segdist.proposers.sam import SamPreset

# What to run when a package is missing (docs/models.md, "Segment Anything: install").
INSTALL = {
    "sam": "pip install 'segdist[sam]' (segment-anything 1.0, a pure wheel)",
    "sam2": "pip install wheel setuptools && SAM2_BUILD_CUDA=0 pip install --no-build-isolation "
            "'segdist[sam2]' (sam2 1.1.0 builds against the installed torch; leave out "
            "SAM2_BUILD_CUDA=0 where a CUDA toolkit is installed)",
}
_PACKAGE = {"sam": ("segment_anything", "segment-anything"), "sam2": ("sam2", "sam2")}


def require(generation: str, name: str):
    """Import the official package of ``generation`` ("sam" or "sam2") for preset ``name``; a
    ConfigError that names the missing package and the install command if it (or one of its
    dependencies) is not installed."""
    module, dist = _PACKAGE[generation]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = exc.name or module
        what = dist if missing.split(".")[0] == module else f"{missing} (needed by {dist})"
        raise ConfigError(f"model.name {name} needs the package {what}, which is not installed; "
                          f"install it with: {INSTALL[generation]}") from None


def construct(preset: "SamPreset", name: str) -> "torch.nn.Module":
    """The preset's network with the official builder's own initialisation, on the CPU, eval mode."""
    if preset.generation == "sam":
        require("sam", name)
        from segment_anything import sam_model_registry

        return sam_model_registry[preset.arch]().eval()
    require("sam2", name)
    from sam2.build_sam import build_sam2

    # apply_postprocessing (the default, as sam2's own from_pretrained uses): single-mask outputs
    # fall back to the best multimask output when unstable.
    return build_sam2(preset.arch, None, device="cpu", mode="eval")


def load_network(name: str, preset: "SamPreset", weights: WeightsRef,
                 storage_options: Mapping[str, Any] | None, *, seed: int, weights_help: str
                 ) -> tuple["torch.nn.Module", str | None]:
    """``(network in eval mode on the CPU, sha256 of the weights file or None)`` for preset
    ``name``: seeded random weights, or the state-dict file ``weights.uri``.

    Raises ConfigError (package missing, file that is not this network's checkpoint) or
    StorageError (file missing or unreadable), each one line ending with ``weights_help``
    (which file to get and how to pass it).
    """
    import torch

    from segdist.models.weights import read_state_dict

    if weights.kind == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return construct(preset, name), None
    model = construct(preset, name)  # the package check comes before a large download
    try:
        state, sha256 = read_state_dict(weights.uri, storage_options)
    except StorageError as exc:  # missing, unreadable, offline (storage errors are translated)
        raise StorageError(f"model.weights: {exc}; {weights_help}") from None
    except SegdistError as exc:  # bytes that are not a state dict
        raise ConfigError(f"model.weights: {exc}; {weights_help}") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensors of other shapes: another network's checkpoint
        raise ConfigError(f"model.weights {weights.uri} is not a {name} checkpoint "
                          f"({str(exc).splitlines()[-1].strip()[:160]}); {weights_help}") from None
    if missing or unexpected:
        raise ConfigError(
            f"model.weights {weights.uri} is not a {name} checkpoint ({len(missing)} missing "
            f"tensors, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}); "
            f"{weights_help}")
    return model.eval(), sha256
