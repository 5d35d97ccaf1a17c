"""Training checkpoints under an output URI: model weights in segdist's format plus a resume state.

Layout under ``OUT`` (any fsspec URI)::

    OUT/checkpoints/step-00004000.safetensors   the model (segdist checkpoint: what `generate` loads)
    OUT/checkpoints/step-00004000.state.pt      optimizer state, step, best metric, history
    OUT/last.json                               {"step", "model", "state"}: written last, so it only
                                                ever names a complete pair
    OUT/best.safetensors, OUT/best.json         best model by the per-patch IoU >= 0.7 share
    OUT/final.safetensors                       the model after the last step
    OUT/metrics.jsonl, OUT/config.yaml          history and the run's config (secrets redacted)

Every file is written with :func:`segdist.storage.atomic_write`. The state file is ``torch.save``
of plain containers and tensors, loaded with ``weights_only=True``.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from segdist.errors import ConfigError, StorageError
from segdist.storage import atomic_write, exists, join, read_bytes, url_to_fs

log = logging.getLogger(__name__)

LAST = "last.json"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def save_weights(model: nn.Module, uri: str, metadata: Mapping[str, Any],
                 storage_options: Mapping[str, Any] | None = None) -> None:
    """Write ``model`` as a segdist checkpoint (safetensors + metadata) to ``uri``, atomically."""
    from segdist.models.checkpoint import save_checkpoint

    save_checkpoint(model, uri, dict(metadata), storage_options=storage_options)


def load_weights_into(model: nn.Module, uri: str,
                      storage_options: Mapping[str, Any] | None = None) -> None:
    """Load the weights of a segdist checkpoint at ``uri`` into ``model`` (strict key match)."""
    from segdist.models.weights import read_state_dict

    state, _ = read_state_dict(uri, storage_options)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint {uri} does not fit the configured model (missing {list(missing)[:3]}, "
            f"unexpected {list(unexpected)[:3]}); it was trained with another model config: use a "
            "new output.uri or the config it was trained with")


def save_state(uri: str, state: dict, storage_options: Mapping[str, Any] | None = None) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(uri, buf.getvalue(), storage_options)


def load_state(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict:
    data = read_bytes(uri, storage_options)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def write_checkpoint(out: str, model: nn.Module, state: dict, metadata: Mapping[str, Any], *,
                     keep: int, storage_options: Mapping[str, Any] | None = None) -> dict:
    """Write the weights and resume state of ``state["step"]``, then point last.json at them.

    Older step checkpoints beyond the newest ``keep`` are deleted afterwards. Returns the
    last.json record.
    """
    step = int(state["step"])
    name = step_name(step)
    model_rel, state_rel = f"checkpoints/{name}.safetensors", f"checkpoints/{name}.state.pt"
    save_weights(model, join(out, model_rel), metadata, storage_options)
    save_state(join(out, state_rel), state, storage_options)
    record = {"step": step, "model": model_rel, "state": state_rel}
    atomic_write(join(out, LAST), json.dumps(record).encode(), storage_options)
    _prune(out, keep, storage_options)
    return record


def read_last(out: str, storage_options: Mapping[str, Any] | None = None) -> dict | None:
    """The last.json record under ``out`` with absolute URIs, or None when there is none."""
    uri = join(out, LAST)
    if not exists(uri, storage_options):
        return None
    try:
        record = json.loads(read_bytes(uri, storage_options))
        return {"step": int(record["step"]), "model": join(out, record["model"]),
                "state": join(out, record["state"])}
    except (ValueError, KeyError, TypeError) as exc:
        raise StorageError(f"{uri} is not a segdist training record ({exc}); remove it or use a "
                           "new output.uri") from None


def _prune(out: str, keep: int, storage_options: Mapping[str, Any] | None) -> None:
    fs, path = url_to_fs(join(out, "checkpoints"), storage_options)
    try:
        names = sorted({p.rsplit("/", 1)[-1].split(".", 1)[0] for p in fs.ls(path, detail=False)})
    except FileNotFoundError:
        return
    steps = [n for n in names if n.startswith("step-")]
    for old in steps[:-keep]:
        for suffix in (".safetensors", ".state.pt"):
            try:
                fs.rm_file(f"{path}/{old}{suffix}")
            except FileNotFoundError:
                pass
            except OSError as exc:  # a leftover old checkpoint is not worth failing training for
                log.warning("could not delete old checkpoint %s%s: %s", old, suffix, exc)
