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

Another installed package adds presets without touching segdist: it publishes its builders under
the ``segdist.proposers`` entry-point group (``my-proposer = "my_package.module:build"`` in its
``pyproject.toml``'s ``[project.entry-points."segdist.proposers"]``). They join ``PROPOSERS`` when
this package is imported, as :class:`PluginBuilder` s that import their module only when a builder
is first needed, so the CLI (``segdist generate``, ``show``, ``bench``) takes them by name.

Families: :mod:`.dense` (DeepMask, SharpMask), :mod:`.maskrcnn` (torchvision's Mask R-CNN),
:mod:`.sliding_window` (a no-network baseline), :mod:`.sam` (Segment Anything 1 and 2, on the
official packages of the optional extras). Importing this package does not import torch.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import logging
from collections.abc import Callable
from typing import Any

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

__all__ = ["PLUGIN_GROUP", "PROPOSERS", "Builder", "PluginBuilder", "Proposer", "build_proposer",
           "check_images", "config_class", "load_plugins"]

PLUGIN_GROUP = "segdist.proposers"

log = logging.getLogger(__name__)


class PluginBuilder:
    """The builder another package publishes as entry point ``name = value`` (``"module:attr"``)
    in :data:`PLUGIN_GROUP`, imported on first use. Pickles as the two strings: a Ray worker
    imports the module itself (the package must be installed there too)."""

    def __init__(self, name: str, value: str):
        self.name, self.value = name, value
        self._builder: Builder | None = None

    def load(self) -> Builder:
        if self._builder is None:
            entry = importlib.metadata.EntryPoint(self.name, self.value, PLUGIN_GROUP)
            try:
                self._builder = entry.load()
            except Exception as exc:  # noqa: BLE001 - whatever the plugin's import raised
                raise ConfigError(
                    f"proposer {self.name!r}: cannot import its builder {self.value} (an "
                    f"{PLUGIN_GROUP!r} entry point): {type(exc).__name__}: {exc}; install or fix "
                    "the package that provides it") from None
        return self._builder

    def __call__(self, config: ModelConfig) -> Proposer:
        return self.load()(config)

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "_builder": None}

    def __repr__(self) -> str:
        return f"PluginBuilder({self.name!r}, {self.value!r})"


def load_plugins() -> list[str]:
    """Register the builders installed packages publish under :data:`PLUGIN_GROUP` (done once on
    import; call again after installing one into a running process). A name segdist or an
    earlier entry point already has is skipped with a warning. Returns the names added."""
    added = []
    for entry in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        have = PROPOSERS.get(entry.name)
        if have is not None:
            if not (isinstance(have, PluginBuilder) and have.value == entry.value):
                log.warning("entry point %s = %s (%s) is ignored: proposer %r exists already",
                            entry.name, entry.value, PLUGIN_GROUP, entry.name)
            continue
        PROPOSERS[entry.name] = PluginBuilder(entry.name, entry.value)
        added.append(entry.name)
    return added


def config_class(name: str) -> type[ModelConfig]:
    """The config class of preset ``name``: the annotation of its builder's first parameter
    (ModelConfig when there is none). The builder may be a function, a ``functools.partial`` or a
    callable object; a string annotation is evaluated in the builder's module, as ``inspect`` does."""
    builder = PROPOSERS[name]
    if isinstance(builder, PluginBuilder):
        builder = builder.load()
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


load_plugins()
