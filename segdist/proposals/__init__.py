"""Proposals: the per-image data model, its file formats (COCO-JSON, Parquet) and the reading API."""

from segdist.proposals.types import ImageProposals

__all__ = ["ImageProposals"]
