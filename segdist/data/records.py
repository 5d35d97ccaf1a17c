"""The dataset abstraction every stage shares: sorted image records plus COCO-format ground truth."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ImageRecord:
    """One image of a dataset.

    Attributes:
        image_id: integer id (COCO's id; for VOC see ``segdist.data.voc.voc_image_id``).
        file_name: the file's name as the dataset lists it (COCO ``file_name``; VOC ``<name>.jpg``;
            an image folder: the path relative to the folder, ``/``-separated).
        uri: full fsspec URI of the image file.
        height, width: image size in pixels as annotated (before any EXIF rotation is applied the
            decoded image is rotated upright; datasets annotate the upright image). 0 when the
            dataset does not list sizes (an image folder): the worker that decodes the image
            learns it.
    """

    image_id: int
    file_name: str
    uri: str
    height: int
    width: int


@dataclass
class Dataset:
    """Images sorted by id, and the ground truth as a COCO instances dict.

    ``images`` is sorted by ``image_id`` ascending; the job shards it by position (chunk i holds
    images [i*size, (i+1)*size)). ``coco_gt`` is a COCO-format dict (``images``, ``annotations``,
    ``categories``) that pycocotools' ``COCO`` accepts via ``COCO()`` + ``.dataset = ...``.
    ``skipped`` counts the files a loader left out, by reason (an image folder's hidden files,
    files without an image extension, ...); empty for annotated datasets.
    """

    name: str
    images: list[ImageRecord]
    coco_gt: dict[str, Any]
    storage_options: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.images = sorted(self.images, key=lambda r: r.image_id)

    def __len__(self) -> int:
        return len(self.images)

    def by_id(self) -> dict[int, ImageRecord]:
        return {r.image_id: r for r in self.images}
