"""Downstream consumption: a PyTorch loader over proposals and exports for other tools.

- ``loader``: ``ProposalDataset`` (image, GT, top-k proposals per image) for training loops.
- ``detectron2``, ``mmdet``, ``original``: exports, streamed chunk by chunk.

A small Fast R-CNN box head trained on our proposals (the end-to-end example) is
``examples/fast_rcnn.py``.
"""
