"""Datasets: where images and ground truth come in (COCO, LVIS, PASCAL VOC, image folders,
synthetic)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from segdist.data.records import Dataset, ImageRecord

if TYPE_CHECKING:
    from segdist.config import DatasetConfig

__all__ = ["Dataset", "ImageRecord", "load_dataset"]


def load_dataset(cfg: "DatasetConfig") -> Dataset:
    """The dataset a validated ``DatasetConfig`` names.

    COCO and LVIS: ``load_coco(cfg.annotations, cfg.images, ...)``; VOC: ``load_voc(cfg.root,
    cfg.split, cfg.image_set, ...)``; an image collection: ``load_images(cfg.images,
    cfg.image_list, ...)``; all with ``cfg.storage_options``, ``cfg.limit`` and ``cfg.image_ids``.
    """
    common = {"storage_options": cfg.storage_options, "limit": cfg.limit,
              "image_ids": cfg.image_ids}
    if cfg.format in ("coco", "lvis"):
        from segdist.data.coco import load_coco

        return load_coco(cfg.annotations, cfg.images, coco_url_layout=cfg.coco_url_layout,
                         **common)
    if cfg.format == "images":
        from segdist.data.images import load_images

        return load_images(cfg.images, cfg.image_list, extensions=cfg.extensions, glob=cfg.glob,
                           **common)
    from segdist.data.voc import load_voc

    return load_voc(cfg.root, split=cfg.split, image_set=cfg.image_set, **common)
