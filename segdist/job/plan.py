"""Sharding a dataset into chunks: sorted image ids, chunk i = images [i*size, (i+1)*size).

The plan is a pure function of the (sorted) image list and the chunk size, so every run, every
driver and every retry names the same images by the same chunk index, and the file names
(``chunk-000012``) are deterministic. That is what makes skip-if-committed resumption exact.
"""

from __future__ import annotations

from dataclasses import dataclass

from segdist.data.records import ImageRecord
from segdist.errors import ConfigError


@dataclass(frozen=True)
class ChunkSpec:
    """One unit of work: chunk ``index`` and its images, sorted by id."""

    index: int
    records: tuple[ImageRecord, ...]

    @property
    def image_ids(self) -> list[int]:
        return [r.image_id for r in self.records]

    def __len__(self) -> int:
        return len(self.records)


def plan_chunks(images: list[ImageRecord], chunk_size: int) -> list[ChunkSpec]:
    """Split ``images`` (any order) into chunks of ``chunk_size`` by ascending image id.

    Raises ConfigError for a non-positive chunk size or duplicate image ids (a dataset that lists an
    image twice would otherwise write it twice).
    """
    if chunk_size < 1:
        raise ConfigError(f"output.chunk_size must be >= 1, got {chunk_size}")
    ordered = sorted(images, key=lambda r: r.image_id)
    for a, b in zip(ordered, ordered[1:]):
        if a.image_id == b.image_id:
            raise ConfigError(
                f"the dataset lists image id {a.image_id} twice ({a.file_name}, {b.file_name}); "
                "image ids must be unique")
    return [
        ChunkSpec(i, tuple(ordered[start:start + chunk_size]))
        for i, start in enumerate(range(0, len(ordered), chunk_size))
    ]
