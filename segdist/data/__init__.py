"""Datasets: where images and ground truth come in (COCO, PASCAL VOC, synthetic)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from segdist.data.records import Dataset, ImageRecord

if TYPE_CHECKING:
    from segdist.config import DatasetConfig

__all__ = ["Dataset", "ImageRecord", "load_dataset"]


def load_dataset(cfg: "DatasetConfig") -> Dataset:
    """The dataset a validated ``DatasetConfig`` names (COCO instances file or VOC split).

    COCO: ``load_coco(cfg.annotations, cfg.images, ...)``; VOC: ``load_voc(cfg.root, cfg.split,
    cfg.image_set, ...)``; both with ``cfg.storage_options``, ``cfg.limit`` and ``cfg.image_ids``.
    """
    if cfg.format == "coco":
        from segdist.data.coco import load_coco

        return load_coco(cfg.annotations, cfg.images, storage_options=cfg.storage_options,
                         limit=cfg.limit, image_ids=cfg.image_ids)
    from segdist.data.voc import load_voc

    return load_voc(cfg.root, split=cfg.split, image_set=cfg.image_set,
                    storage_options=cfg.storage_options, limit=cfg.limit, image_ids=cfg.image_ids)
