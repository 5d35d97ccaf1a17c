"""The DeepMask/SharpMask proposer: decoded images in, :class:`ImageProposals` out."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from segdist.proposals.types import ImageProposals
from segdist.proposers.dense.pipeline import Batch, finish, run_levels
from segdist.proposers.dense.pyramid import STRIDE, pyramid_levels
from segdist.proposers.dense.settings import InferenceSettings
from segdist.proposers.interface import check_images


class DenseProposer:
    """A DeepMask or SharpMask (eval mode, on ``device``) run over whole images by the pipeline.

    A call takes a window of decoded images of any sizes. Images of the same size go through the
    network together, as many at a time as the memory budget lets the largest pyramid level run
    untiled (at most ``batch_size``); then selection, masks, paste-back and RLE run for all images
    of the window together, in slabs sized by the budget (:mod:`.pipeline`). The result of an image
    does not depend on the window or the batch it ran in. ``model`` is the network (for inspection).
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

    def batch_cap(self, height: int, width: int) -> int:
        """Images of this size per network batch: as many as fit the trunk's half of the memory
        budget at the largest pyramid level (at least 1, at most ``batch_size``)."""
        pad = self.model.cfg.i_sz // 2
        levels = pyramid_levels(height, width, self.settings)
        if not levels:
            return self.batch_size
        px = max((lv.height + 2 * pad) * (lv.width + 2 * pad) for lv in levels)
        per_image = px * int(getattr(self.model, "activation_bytes_per_px", 512))
        fit = self.settings.memory_budget_mb * 2 ** 20 // 2 // per_image
        return int(max(1, min(self.batch_size, fit)))

    def kept_bytes(self, height: int, width: int) -> int:
        """Bytes stage 1 keeps per image until stage 2 (score and embedding maps, extras maps)."""
        pad, f = self.model.cfg.i_sz // 2, self.model.cfg.f_sz
        fc = getattr(getattr(self.model, "cfg", None), "fc_dim", 512)
        extras = sum(step * step * 64 for step, _ in getattr(self.model, "extras_layout", ()))
        total = 0
        for lv in pyramid_levels(height, width, self.settings):
            gh = math.ceil((lv.height + 2 * pad) / STRIDE)
            gw = math.ceil((lv.width + 2 * pad) / STRIDE)
            cells = (gh - f + 1) * (gw - f + 1)
            total += 4 * (cells * (fc + 1) + gh * gw * extras)
        return 2 * total  # the maps, and their flat copies while candidates are gathered

    def __call__(self, images: Sequence[np.ndarray], image_ids: Sequence[int]) -> list[ImageProposals]:
        """Proposals per image, in input order (see :class:`segdist.proposers.Proposer`)."""
        check_images(images, image_ids)
        out: list[ImageProposals | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(im.shape[:2], []).append(i)
        # Stage 2 runs for as many images as the budget's other half holds the maps of.
        room = self.settings.memory_budget_mb * 2 ** 20 // 2
        pending: list[Batch] = []
        held = 0
        for (h, w), members in groups.items():
            cap, per_image = self.batch_cap(h, w), self.kept_bytes(h, w)
            for s in range(0, len(members), cap):
                part = members[s:s + cap]
                kept = per_image * len(part)
                if pending and held + kept > room:
                    self._finish(pending, out)
                    pending, held = [], 0
                batch = torch.from_numpy(np.stack([images[i] for i in part])).to(self._device)
                batch = batch.permute(0, 3, 1, 2).contiguous()                 # B x 3 x H x W
                levels = run_levels(self.model, batch, self.settings)
                del batch
                pending.append(Batch(part, [int(image_ids[i]) for i in part], h, w, levels))
                held += kept
        if pending:
            self._finish(pending, out)
        return out  # type: ignore[return-value]

    def _finish(self, batches: list[Batch], out: list[ImageProposals | None]) -> None:
        """Stage 2 of ``batches`` (slots = input positions), written into ``out``."""
        slots = [s for b in batches for s in b.slots]
        local = {s: i for i, s in enumerate(slots)}
        renumbered = [Batch([local[s] for s in b.slots], b.image_ids, b.height, b.width, b.levels)
                      for b in batches]
        results = finish(self.model, renumbered, self.settings, self.name, len(slots))
        for s, res in zip(slots, results):
            out[s] = res
