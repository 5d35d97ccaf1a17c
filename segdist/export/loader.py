"""PyTorch access to precomputed proposals: one sample per image with its GT and top-k proposals.

``ProposalDataset(proposals_uri, dataset)`` is a map-style ``torch.utils.data.Dataset`` over the
images of a COCO-format :class:`~segdist.data.records.Dataset`. A sample (a dict) holds:

- ``image_id`` (int), ``uri`` (str), ``height``/``width`` (int): the dataset record's size, else
  (an image folder lists none) the size the proposals were written with (Parquet metadata,
  COCO-JSON masks, the job's ``images.json`` beside box-only COCO-JSON), else the decoded image's;
  0 only for box-only COCO results without an ``images.json``, read with ``load_images=False``;
- ``image``: uint8 Tensor[3, H, W] RGB (only with ``load_images=True``; decoded with
  :func:`segdist.imageio.read_image`);
- ``gt``: ``boxes`` float32 Tensor[M, 4] **xyxy** in pixels, ``labels`` int64[M] (COCO
  category ids), ``iscrowd`` bool[M], ``masks`` :class:`LazyMasks` (M masks, decoded on request);
- ``proposals``: ``boxes`` float32 Tensor[K, 4] **xyxy** in pixels (``x2 = x + w``), ``scores``
  float32[K] descending, ``masks`` :class:`LazyMasks` or None (box-only proposals), ``labels``
  int64[K] or None.

Proposals pass :class:`ProposalFilter` (score threshold, then minimum box side, then top-k, the
order Detectron2 applies). Random access goes through ``ProposalStore.get``, which on Parquet reads
only the row group holding the image. The dataset object is picklable and opens files lazily in
each process, so it works with ``DataLoader(num_workers > 0)``; use :func:`collate` (images differ
in size and proposal count).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from segdist.data.records import Dataset
from segdist.errors import SegdistError
from segdist.export.boxes import xywh_to_xyxy
from segdist.proposals.store import ProposalStore, open_proposals
from segdist.proposals.types import ImageProposals


@dataclass(frozen=True)
class ProposalFilter:
    """Which proposals of an image to keep.

    Attributes:
        top_k: keep at most this many (the highest-scoring), None = all.
        min_size: drop boxes whose width or height (pixels) is below this.
        score_threshold: drop proposals with score below this.
    """

    top_k: int | None = None
    min_size: float = 0.0
    score_threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.top_k is not None and self.top_k < 0:
            raise SegdistError(f"top_k must be >= 0 (or None for all), got {self.top_k}")
        if self.min_size < 0:
            raise SegdistError(f"min_size must be >= 0 pixels, got {self.min_size}")

    def keep(self, p: ImageProposals) -> np.ndarray:
        """int64 indices (in rank order) of the proposals that pass."""
        ok = p.scores >= self.score_threshold
        if self.min_size > 0:
            ok &= (p.boxes[:, 2] >= self.min_size) & (p.boxes[:, 3] >= self.min_size)
        idx = np.nonzero(ok)[0]
        return idx if self.top_k is None else idx[: self.top_k]

    def apply(self, p: ImageProposals) -> ImageProposals:
        """The filtered proposals (rank order kept)."""
        idx = self.keep(p)
        if len(idx) == len(p):
            return p
        return ImageProposals(
            p.image_id, p.height, p.width, p.scores[idx], p.boxes[idx],
            None if p.counts is None else [p.counts[i] for i in idx], p.model,
            None if p.labels is None else p.labels[idx])


class LazyMasks:
    """Masks of one image kept as COCO RLE until asked for.

    Items are compressed RLE ``bytes`` or COCO segmentations (polygons, uncompressed or compressed
    RLE dicts) of an image of size (height, width). Picklable; decoding costs H*W bytes per mask.
    """

    def __init__(self, items: Sequence[Any], height: int, width: int):
        self.items = list(items)
        self.height = int(height)
        self.width = int(width)

    def __len__(self) -> int:
        return len(self.items)

    def rles(self, indices: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """pycocotools compressed RLE dicts of the chosen masks (all by default)."""
        from segdist.data.masks import segmentation_to_rle

        chosen = self.items if indices is None else [self.items[i] for i in indices]
        return [segmentation_to_rle(item, self.height, self.width) for item in chosen]

    def decode(self, indices: Sequence[int] | None = None) -> torch.Tensor:
        """bool Tensor[K, H, W] of the chosen masks (all by default)."""
        from pycocotools import mask as mask_utils

        rles = self.rles(indices)
        if not rles:
            return torch.zeros((0, self.height, self.width), dtype=torch.bool)
        m = mask_utils.decode(rles)  # H x W x K, Fortran order
        return torch.from_numpy(np.ascontiguousarray(m.transpose(2, 0, 1))).bool()

    def __getitem__(self, i: int) -> torch.Tensor:
        """bool Tensor[H, W] of mask ``i``."""
        return self.decode([i])[0]


def collate(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """DataLoader ``collate_fn`` that keeps the per-image samples as a list."""
    return batch


class ProposalDataset(torch.utils.data.Dataset):
    """Map-style dataset of (image, GT, filtered proposals) per image; see the module docstring.

    Args:
        proposals: a proposals URI (any layout ``open_proposals`` reads) or an open store.
        dataset: the images and their COCO-format GT.
        top_k, min_size, score_threshold: the :class:`ProposalFilter`.
        load_images: decode each image (else only its ``uri`` is given).
        storage_options: fsspec options for the proposals URI (images use the dataset's).
        missing: what to do with dataset images that have no entry in the proposals:
            "error" (default), "skip" them, or give them "empty" proposals.
    """

    def __init__(self, proposals: str | ProposalStore, dataset: Dataset, *,
                 top_k: int | None = 1000, min_size: float = 0.0, score_threshold: float = 0.0,
                 load_images: bool = True, storage_options: Mapping[str, Any] | None = None,
                 missing: Literal["error", "skip", "empty"] = "error"):
        self.store = (proposals if isinstance(proposals, ProposalStore)
                      else open_proposals(proposals, storage_options))
        self.filter = ProposalFilter(top_k, min_size, score_threshold)
        self.load_images = load_images
        self.image_storage_options = dict(dataset.storage_options)
        have = set(self.store.image_ids())
        absent = [r.image_id for r in dataset.images if r.image_id not in have]
        if absent and missing == "error":
            raise SegdistError(
                f"{len(absent)} of {len(dataset)} images of dataset {dataset.name!r} have no "
                f"proposals in {self.store.uri} (e.g. {absent[:5]}); were they generated for this "
                "dataset? Pass missing='skip' or 'empty' to go on without them.")
        self.records = [r for r in dataset.images if missing != "skip" or r.image_id in have]
        self._absent = set(absent)
        self._position = {r.image_id: k for k, r in enumerate(self.records)}
        self._anns: dict[int, list[dict[str, Any]]] = {r.image_id: [] for r in self.records}
        for a in dataset.coco_gt.get("annotations", []):
            if a["image_id"] in self._anns:
                self._anns[a["image_id"]].append(a)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def image_ids(self) -> list[int]:
        return [r.image_id for r in self.records]

    def index_of(self, image_id: int) -> int:
        """Position of an image id in this dataset (for ``dataset[i]``)."""
        if image_id not in self._position:
            raise SegdistError(f"image {image_id} is not in this ProposalDataset")
        return self._position[image_id]

    def proposals(self, image_id: int) -> ImageProposals:
        """The filtered proposals of one image (boxes still COCO xywh), as the reading API gives."""
        if image_id in self._absent:
            r = self.records[self.index_of(image_id)]
            return ImageProposals(image_id, r.height, r.width, [], np.zeros((0, 4)), [], "none")
        return self.filter.apply(self.store.get(image_id))

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        p = self.proposals(record.image_id)
        rgb = None
        if self.load_images:
            from segdist.imageio import read_image

            rgb = read_image(record.uri, self.image_storage_options)  # H x W x 3 uint8
        # An image folder lists no sizes (0 x 0); the worker wrote the size it decoded with the
        # proposals, so the image is decoded for its size only when they lack it too.
        height, width = record.height, record.width
        if not (height and width):
            height, width = p.height, p.width
        if not (height and width) and rgb is not None:
            height, width = rgb.shape[:2]
        sample: dict[str, Any] = {
            "image_id": record.image_id, "uri": record.uri,
            "height": int(height), "width": int(width),
            "gt": self._gt(record.image_id, height, width),
            "proposals": {
                "boxes": torch.from_numpy(xywh_to_xyxy(p.boxes)),
                "scores": torch.from_numpy(p.scores.copy()),
                "masks": None if p.counts is None else LazyMasks(p.counts, p.height, p.width),
                "labels": None if p.labels is None else torch.from_numpy(p.labels.astype(np.int64)),
            },
        }
        if rgb is not None:
            sample["image"] = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
        return sample

    def _gt(self, image_id: int, height: int, width: int) -> dict[str, Any]:
        anns = self._anns.get(image_id, [])
        boxes = xywh_to_xyxy(np.asarray([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4))
        return {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.as_tensor([int(a["category_id"]) for a in anns], dtype=torch.int64),
            "iscrowd": torch.as_tensor([bool(a.get("iscrowd", 0)) for a in anns], dtype=torch.bool),
            "masks": LazyMasks([a.get("segmentation", []) for a in anns], height, width),
        }
