"""The DeepMask/SharpMask proposer: decoded images in, :class:`ImageProposals` out."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from segdist.proposals.types import ImageProposals
from segdist.proposers.dense.pipeline import propose
from segdist.proposers.dense.settings import InferenceSettings
from segdist.proposers.interface import check_images


class DenseProposer:
    """A DeepMask or SharpMask (eval mode, on ``device``) run over whole images by the pipeline.

    Images of the same size go through the network together, up to ``batch_size`` at a time; the
    result does not depend on the batching. ``model`` is the network (for inspection).
    """

    def __init__(self, name: str, model: nn.Module, settings: InferenceSettings, *,
                 device: torch.device, batch_size: int, weights_sha256: str | None):
        self.name = name
        self.model = model
        self.settings = settings
        self.batch_size = batch_size
        self.weights_sha256 = weights_sha256
        self.device = str(device)
        self._device = device

    def __call__(self, images: Sequence[np.ndarray], image_ids: Sequence[int]) -> list[ImageProposals]:
        """Proposals per image, in input order (see :class:`segdist.proposers.Proposer`)."""
        check_images(images, image_ids)
        out: list[ImageProposals | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(im.shape[:2], []).append(i)
        for members in groups.values():
            for s in range(0, len(members), self.batch_size):
                part = members[s:s + self.batch_size]
                batch = torch.from_numpy(np.stack([images[i] for i in part])).to(self._device)
                batch = batch.permute(0, 3, 1, 2).contiguous()                 # B x 3 x H x W
                ids = [image_ids[i] for i in part]
                for i, res in zip(part, propose(self.model, batch, ids, self.settings, self.name)):
                    out[i] = res
        return out  # type: ignore[return-value]
