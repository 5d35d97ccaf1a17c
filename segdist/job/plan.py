"""Sharding a dataset into chunks.

Two plans, both deterministic:

- :func:`plan_chunks` (COCO, LVIS, VOC): sorted image ids, chunk i = images [i*size, (i+1)*size).
  A pure function of the image list and the chunk size, so every run, every driver and every retry
  names the same images by the same chunk index, and the file names (``chunk-000012``) are the
  original release's. That is what makes skip-if-committed resumption exact.
- :func:`plan_incremental` (image folders): the chunks an output already holds keep their images,
  and images that no chunk holds yet go into new chunks. A folder grows: with ids hashed from file
  names a new file sorts anywhere among the old ones, and fixed slices of the sorted ids would
  shift every later chunk, redoing them all. On a fresh output the two plans are the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


def _sorted_unique(images: list[ImageRecord], chunk_size: int) -> list[ImageRecord]:
    if chunk_size < 1:
        raise ConfigError(f"output.chunk_size must be >= 1, got {chunk_size}")
    ordered = sorted(images, key=lambda r: r.image_id)
    for a, b in zip(ordered, ordered[1:]):
        if a.image_id == b.image_id:
            raise ConfigError(
                f"the dataset lists image id {a.image_id} twice ({a.file_name}, {b.file_name}); "
                "image ids must be unique")
    return ordered


def plan_chunks(images: list[ImageRecord], chunk_size: int) -> list[ChunkSpec]:
    """Split ``images`` (any order) into chunks of ``chunk_size`` by ascending image id.

    Raises ConfigError for a non-positive chunk size or duplicate image ids (a dataset that lists an
    image twice would otherwise write it twice).
    """
    ordered = _sorted_unique(images, chunk_size)
    return [
        ChunkSpec(i, tuple(ordered[start:start + chunk_size]))
        for i, start in enumerate(range(0, len(ordered), chunk_size))
    ]


def plan_incremental(images: list[ImageRecord], chunk_size: int,
                     recorded: Mapping[int, Sequence[int]]) -> list[ChunkSpec]:
    """Chunks that keep what an output already holds and add what it does not.

    Args:
        images: the dataset now (any order).
        chunk_size: images per new chunk.
        recorded: chunk index -> the image ids its commit record covers (written or failed), for
            every chunk record the output holds (empty for a fresh output).

    Returns chunks 0..N-1: a recorded chunk keeps its images that are still in the dataset (the
    same ids: the job skips it; fewer: an image was removed, the job redoes it without it); the
    images no record covers, by ascending id, fill the unused indices from the lowest up in
    slices of ``chunk_size``. An index with neither is an empty chunk. Without records this is
    :func:`plan_chunks`, and a run resumed on an unchanged dataset gets that same plan back (the
    remaining images are the uncommitted chunks' own, in order).
    """
    ordered = _sorted_unique(images, chunk_size)
    by_id = {r.image_id: r for r in ordered}
    members: dict[int, list[ImageRecord]] = {}
    placed: set[int] = set()
    for index in sorted(recorded):
        keep = sorted({i for i in recorded[index] if i in by_id and i not in placed})
        placed.update(keep)
        members[index] = [by_id[i] for i in keep]
    rest = [r for r in ordered if r.image_id not in placed]
    free = 0
    for start in range(0, len(rest), chunk_size):
        while free in members:
            free += 1
        members[free] = rest[start:start + chunk_size]
    n = max(members) + 1 if members else 0
    return [ChunkSpec(i, tuple(members.get(i, ()))) for i in range(n)]
