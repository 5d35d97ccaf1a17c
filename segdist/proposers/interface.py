"""What every proposal model looks like to its callers (the job's workers, ``segdist show``,
``segdist bench``, the demo): the :class:`Proposer` protocol and its input check."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from segdist.proposals.types import ImageProposals


@runtime_checkable
class Proposer(Protocol):
    """A loaded proposal model: built once (in a Ray actor's constructor), then called on batches.

    name: the preset (``model.name``); it is recorded with every proposal. weights_sha256: sha256
    of the weights file's bytes (None for random weights or no weights). device: where it runs, as
    a string ("cpu", "cuda:0").

    ``__call__(images, image_ids)``: images are decoded uint8 ``H x W x 3`` RGB arrays (any sizes),
    with their dataset ids; returns one :class:`ImageProposals` per image in input order: at most
    ``model.proposals`` each, sorted by score (probabilities, descending), boxes COCO xywh in the
    image's pixels, masks as COCO RLE of the image's size (or None for box-only proposers).
    Deterministic: the same images give the same bytes whatever the batching.
    """

    name: str
    weights_sha256: str | None
    device: str

    def __call__(self, images: Sequence[np.ndarray], image_ids: Sequence[int]
                 ) -> list[ImageProposals]: ...


def check_images(images: Sequence[np.ndarray], image_ids: Sequence[int]) -> None:
    """Raise ValueError unless there is one id per image and every image is uint8 H x W x 3."""
    if len(images) != len(image_ids):
        raise ValueError(f"{len(images)} images but {len(image_ids)} image ids")
    for im, iid in zip(images, image_ids):
        if not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
            got = f"{im.dtype} {im.shape}" if isinstance(im, np.ndarray) else type(im).__name__
            raise ValueError(f"image {iid}: expected uint8 H x W x 3 RGB, got {got}")
