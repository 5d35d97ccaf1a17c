"""The candidates of a window of images, column-wise: every selected embedding cell of every image.

Every column is a tensor with one row per candidate window, so candidates are filtered, merged
and ranked as a whole (no per-candidate Python objects), MaskData-style:

- ``slot`` int64[K]: the image's position in the window (output order);
- ``logits`` float32[K]: score logits; ``vecs`` float32[K, fc_dim]: the embedding vectors the mask
  head reads;
- ``tops``, ``lefts``, ``win_h``, ``win_w`` float64[K]: the window in image pixels (top-left may
  be negative); ``heights``, ``widths`` int64[K]: the image size;
- ``ext_base``, ``ext_stride`` int64[K, n_extras]: where each window of each extras map starts in
  the flat extras buffers, and that map's row stride (SharpMask's horizontal-net windows; no
  columns for DeepMask).

Rows are image-major, each image's in ranking order: score descending, then level, row, col
ascending, the same windows whatever the tiling, the batch or the order images came in.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class Candidates:
    """Candidate windows of a window of images, one row per window (see the module docstring)."""

    slot: torch.Tensor
    logits: torch.Tensor
    vecs: torch.Tensor
    tops: torch.Tensor
    lefts: torch.Tensor
    win_h: torch.Tensor
    win_w: torch.Tensor
    heights: torch.Tensor
    widths: torch.Tensor
    ext_base: torch.Tensor
    ext_stride: torch.Tensor

    def __len__(self) -> int:
        return len(self.logits)

    def take(self, index: torch.Tensor | slice) -> "Candidates":
        """The rows ``index`` (int64 indices, a bool mask or a slice), in that order."""
        return Candidates(*(getattr(self, f.name)[index] for f in fields(self)))

    @staticmethod
    def cat(parts: list["Candidates"]) -> "Candidates":
        """The rows of ``parts`` one after the other."""
        if len(parts) == 1:
            return parts[0]
        return Candidates(*(torch.cat([getattr(p, f.name) for p in parts])
                            for f in fields(Candidates)))
