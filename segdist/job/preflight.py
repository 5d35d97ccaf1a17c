"""Checks a job makes before it starts any worker, so that a wrong URI fails in seconds, not after
a cluster has spun up and loaded models."""

from __future__ import annotations

from segdist import storage
from segdist.config import OUTPUT_URI_PLACEHOLDER, DatasetConfig, ModelConfig, OutputConfig
from segdist.data.records import Dataset
from segdist.errors import ConfigError, SegdistError, StorageError
from segdist.storage_errors import from_storage_library, translate


def check_output(output: OutputConfig) -> None:
    """Raise StorageError unless something can be written under ``output.uri``."""
    storage.check_writable(output.uri, output.storage_options)


def load_checked_dataset(cfg: DatasetConfig) -> Dataset:
    """Load the dataset's index and check that its first image exists.

    Raises a SegdistError that names the dataset location when the annotations cannot be read, the
    dataset is empty, or its first image is missing (a wrong ``dataset.images`` folder).
    """
    from segdist.data import load_dataset  # the loaders import pycocotools; keep --help fast

    where = {"voc": cfg.root, "images": cfg.image_list or cfg.images}.get(cfg.format,
                                                                          cfg.annotations)
    try:
        dataset = load_dataset(cfg)
    except SegdistError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise StorageError(f"cannot read the {cfg.format} dataset at {where}: "
                           f"{type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # a storage client's own error (no credentials, no endpoint)
        if not from_storage_library(exc):
            raise
        raise translate(exc, where, "read the dataset at") from exc
    if len(dataset) == 0:
        fields = ("dataset.extensions, dataset.glob" if cfg.format == "images"
                  else "dataset.split")
        skipped = "".join(f", {n} {reason}" for reason, n in sorted(dataset.skipped.items()))
        raise ConfigError(f"the {cfg.format} dataset at {where} has no images{skipped} "
                          f"(check {fields}, dataset.image_ids and dataset.limit)")
    if cfg.format == "images" and not cfg.image_list:
        return dataset  # every image was just listed: it exists
    first = dataset.images[0]
    try:
        found = storage.exists(first.uri, dataset.storage_options)
    except (OSError, ValueError) as exc:
        raise StorageError(f"cannot reach the dataset's first image {first.uri}: {exc}") from exc
    if not found:
        hint = {"voc": "dataset.root",
                "images": "dataset.image_list and dataset.images (the base of relative lines)"
                }.get(cfg.format, "dataset.images")
        raise StorageError(f"the dataset's first image {first.uri} (id {first.image_id}) does not "
                           f"exist; check {hint}")
    return dataset


def check_weights(model: ModelConfig) -> None:
    """Raise unless ``model.weights`` needs no file (random, a torchvision enum member, which the
    builder resolves and checks) or names a file that exists.

    Every worker would otherwise fail to load the model, on every node, minutes into the run.
    """
    ref = model.weights
    if not ref.is_file:
        return
    if OUTPUT_URI_PLACEHOLDER in ref.uri:
        raise ConfigError(
            f"model.weights is still the placeholder {ref.uri!r}: convert the original model once "
            "(segdist convert-t7 URL_OF_model.t7 s3://your-bucket/models/NAME.safetensors, see "
            "docs/t7.md) or train one (segdist train), then --set model.weights=THAT_URI")
    try:
        found = storage.exists(ref.uri, model.storage_options)
    except (OSError, ValueError) as exc:
        raise StorageError(f"cannot reach model.weights {ref.uri}: {exc}") from exc
    if not found:
        hint = model.weights_help()
        raise StorageError(f"model.weights {ref.uri} does not exist; "
                           f"{hint or 'check the URI'}")


def check_output_shared(output: OutputConfig, nodes: int) -> None:
    """Refuse a local output path on a cluster of ``nodes`` > 1 nodes, unless
    ``output.shared_filesystem`` says every node mounts it: each node's workers would otherwise
    write their chunks to their own disk, and the output would be scattered and incomplete."""
    if nodes <= 1 or output.shared_filesystem or not storage.is_local(output.uri):
        return
    raise ConfigError(
        f"output.uri {output.uri} is a local path, but the Ray cluster has {nodes} nodes: each "
        "would write its chunks to its own disk. Write to an object store (s3://..., gs://...), "
        "or set output.shared_filesystem=true if the path is on a filesystem every node mounts "
        "(NFS, Lustre, ...)")
