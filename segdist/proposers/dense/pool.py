"""The candidate pool: the windows of one image that can still become proposals, column-wise.

Every column is a tensor with one row per candidate window, so the pool is filtered, merged and
ranked as a whole (no per-candidate Python objects): ``logits`` float32[N] score logits, ``level``
/ ``row`` / ``col`` int64[N] the pyramid level index and embedding cell, ``vecs`` float32[N, fc_dim]
the embedding vectors the mask head needs, ``extras`` a list of float32[N, ...] per-window inputs of
the mask head (SharpMask's horizontal-net windows; empty for DeepMask).

The ranking is (score descending, then level, row, col ascending): the same windows win whatever
the tiling or the order in which levels and tiles were offered.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class CandidatePool:
    """Candidate windows, one row per window in every column (see the module docstring)."""

    logits: torch.Tensor
    level: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    vecs: torch.Tensor
    extras: list[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.logits)

    def take(self, index: torch.Tensor) -> "CandidatePool":
        """The rows ``index`` (int64 indices or a bool mask), in that order."""
        return CandidatePool(self.logits[index], self.level[index], self.row[index],
                             self.col[index], self.vecs[index], [e[index] for e in self.extras])

    def cat(self, other: "CandidatePool") -> "CandidatePool":
        """This pool's rows followed by ``other``'s."""
        return CandidatePool(
            torch.cat([self.logits, other.logits]), torch.cat([self.level, other.level]),
            torch.cat([self.row, other.row]), torch.cat([self.col, other.col]),
            torch.cat([self.vecs, other.vecs]),
            [torch.cat([a, b]) for a, b in zip(self.extras, other.extras)])

    def best(self, cap: int) -> "CandidatePool":
        """The top ``cap`` rows in ranking order (score desc; ties by level, row, col)."""
        # location order first, then a stable sort by score: ties resolve by location
        loc = (self.level * (1 << 20) + self.row) * (1 << 20) + self.col
        order = torch.sort(loc, stable=True).indices
        order = order[torch.sort(self.logits[order], descending=True, stable=True).indices][:cap]
        return self.take(order)

    def floor(self, cap: int) -> float | None:
        """Lowest score logit a new window needs to enter a ranked pool of ``cap`` (None while
        the pool holds fewer)."""
        return None if len(self) < cap else float(self.logits[-1])


def offer(pool: CandidatePool | None, new: CandidatePool, cap: int) -> CandidatePool:
    """The best ``cap`` of ``pool`` (None: empty) and ``new`` together."""
    return (new if pool is None else pool.cat(new)).best(cap)
