"""Streaming building blocks shared by the exports: proposals in id order, and pickles written
item by item.

A pickle of ``{"ids": [...], "boxes": [...]}`` for 120,000 images is GBs; building the dict first
would hold it all in memory. :func:`dump_streaming` writes the same bytes a plain ``pickle.dump``
of the finished dict would decode to, from generators: each container is pickled through
``__reduce__`` with an *iterator* of items (pickle's APPENDS/SETITEMS batches), and the pickler
runs without a memo (``fast`` mode), so nothing written stays referenced. Readers use plain
``pickle.load``.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, Any

import numpy as np

from segdist.proposals.store import ProposalStore
from segdist.proposals.types import ImageProposals


class StreamedList:
    """Pickles as a ``list`` of the items an iterable factory yields (consumed once, on dump)."""

    def __init__(self, items: Callable[[], Iterable[Any]]):
        self._items = items

    def __reduce__(self):
        return (list, (), None, iter(self._items()))


class StreamedDict:
    """Pickles as a ``dict`` of the (key, value) pairs an iterable factory yields."""

    def __init__(self, items: Callable[[], Iterable[tuple[Any, Any]]]):
        self._items = items

    def __reduce__(self):
        return (dict, (), None, None, iter(self._items()))


def dump_streaming(obj: Any, f: IO[bytes]) -> None:
    """Pickle ``obj`` (which may contain StreamedList/StreamedDict) to ``f`` without a memo.

    Protocol 4 (Python >= 3.4). The C pickler flushes each 64 KiB frame to ``f`` as it fills, so
    memory stays at one batch of items. Objects must not be self-referential (no memo).
    """
    pickler = pickle.Pickler(f, protocol=4)
    pickler.fast = True  # no memo: written arrays are freed; our data has no shared references
    pickler.dump(obj)


def empty_proposals(image_id: int, height: int = 0, width: int = 0) -> ImageProposals:
    return ImageProposals(image_id, height, width, [], np.zeros((0, 4)), None, "none")


def union_images(store: ProposalStore, extra_ids: Sequence[int] = (), *, masks: bool = True,
                 top_k: int | None = None) -> Iterator[ImageProposals]:
    """The store's images in ascending id order, with empty proposals for ``extra_ids`` that the
    store lacks (dataset images without proposals), each cut to ``top_k``. Streams chunk by chunk."""
    extra = sorted(set(int(i) for i in extra_ids) - set(store.image_ids()))
    k = 0
    for p in store.iter_images(masks=masks):
        while k < len(extra) and extra[k] < p.image_id:
            yield empty_proposals(extra[k])
            k += 1
        yield p if top_k is None else p.top(top_k)
    for image_id in extra[k:]:
        yield empty_proposals(image_id)
