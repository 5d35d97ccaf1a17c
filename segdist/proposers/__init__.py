"""Proposal models behind one interface: ``from segdist.proposers import PROPOSERS, Proposer,
build_proposer``.

``PROPOSERS`` maps a preset name (``model.name``) to its builder, ``(config) -> Proposer``. A
builder's parameter annotation names the config class its ``model:`` section validates into (a
:class:`~segdist.config.ModelConfig` subclass; ModelConfig itself when unannotated), so
registering a proposer is one dict entry::

    PROPOSERS["my-proposer"] = build_my_proposer   # def build_my_proposer(config: MyConfig) -> ...

Config validation, the CLI's choices and ``segdist bench`` read the names from here. The job's
driver looks the builder up once and ships it to its workers with their settings (Ray pickles it:
by reference when its module is importable on the workers, by value when it was defined in
``__main__``), so a proposer registered in the driver's process runs on the cluster.

Families: :mod:`.dense` (DeepMask, SharpMask), :mod:`.maskrcnn` (torchvision's Mask R-CNN),
:mod:`.sliding_window` (a no-network baseline), :mod:`.sam` (Segment Anything 1 and 2, on the
official packages of the optional extras). Importing this package does not import torch.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from segdist.config import ModelConfig
from segdist.errors import ConfigError
from segdist.proposers import dense, maskrcnn, sam, sliding_window
from segdist.proposers.interface import Proposer, check_images

Builder = Callable[[ModelConfig], Proposer]

PROPOSERS: dict[str, Builder] = {
    **{name: dense.build for name in dense.PRESETS},
    **{name: maskrcnn.build for name in maskrcnn.PRESETS},
    "sliding-window": sliding_window.build,
    **{name: sam.build_sam for name in sam.SAM_PRESETS},
    **{name: sam.build_sam2 for name in sam.SAM2_PRESETS},
}

__all__ = ["PROPOSERS", "Builder", "Proposer", "build_proposer", "check_images", "config_class"]


def config_class(name: str) -> type[ModelConfig]:
    """The config class of preset ``name``: the annotation of its builder's first parameter
    (ModelConfig when there is none). The builder may be a function, a ``functools.partial`` or a
    callable object; a string annotation is evaluated in the builder's module, as ``inspect`` does."""
    builder = PROPOSERS[name]
    param = next(iter(inspect.signature(builder).parameters.values()), None)
    hint = inspect.Parameter.empty if param is None else param.annotation
    if isinstance(hint, str):
        try:
            hint = eval(hint, _module_globals(builder))  # an annotation, evaluated as inspect does
        except Exception as exc:
            raise ConfigError(f"the builder of proposer {name!r} annotates its config as {hint!r}, "
                              f"which does not resolve in its module ({exc})") from None
    return hint if isinstance(hint, type) and issubclass(hint, ModelConfig) else ModelConfig


def _module_globals(builder: Callable) -> dict:
    target = inspect.unwrap(builder)
    while isinstance(target, functools.partial):
        target = inspect.unwrap(target.func)
    if not inspect.isroutine(target):  # a class (its __init__) or a callable object (__call__)
        target = target.__init__ if isinstance(target, type) else type(target).__call__
    return getattr(target, "__globals__", {})


def build_proposer(config: ModelConfig) -> Proposer:
    """The proposer ``config`` names, ready to call (its builder loads weights, picks the device)."""
    try:
        builder = PROPOSERS[config.name]
    except KeyError:
        raise ConfigError(f"model.name {config.name!r} is not a registered proposer; "
                          f"choose one of {list(PROPOSERS)}") from None
    return builder(config)
