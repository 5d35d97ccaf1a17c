"""Datasets: where images and ground truth come in (COCO, PASCAL VOC, synthetic)."""

from segdist.data.records import Dataset, ImageRecord

__all__ = ["Dataset", "ImageRecord"]
