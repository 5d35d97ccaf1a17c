"""Downstream consumption: a PyTorch loader over proposals and exports for other tools.

- ``loader``: ``ProposalDataset`` (image, GT, top-k proposals per image) for training loops.
- ``detectron2``, ``mmdet``, ``original``: exports, streamed chunk by chunk.
- ``fast_rcnn``: a small Fast R-CNN box head trained on our proposals (the end-to-end example).
"""
