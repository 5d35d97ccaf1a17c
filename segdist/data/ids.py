"""Image ids from names: a hash of the name into [1e10, 2**53), the same on every machine.

Used where a dataset has no ids of its own: files of an image folder (their relative paths) and
VOC images whose names fit neither VOC pattern. The range stays clear of COCO ids (< 1e7 in
practice) and of the two VOC patterns ([0, 1e6) and [1e9, 1e10)), and below 2**53 so that float64
consumers (JSON readers, pandas) keep every id exact.

Why a hash and not a position in the sorted list: a position changes for every file that sorts
after a newly added one, a hash of the name does not, so proposals already computed keep their ids
when a folder grows (docs/datasets.md).
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterable

HASH_ID_BASE = 10**10
HASH_ID_SPAN = 2**53 - HASH_ID_BASE


def hashed_id(name: str) -> int:
    """``1e10 + (first 8 bytes of sha256(NFC(name)), big-endian) mod (2**53 - 1e10)``.

    The name is Unicode-normalised (NFC) first, so a folder copied between file systems that store
    accents decomposed (macOS) or composed (Linux) gives the same ids. Not Python's salted ``hash``.
    """
    key = unicodedata.normalize("NFC", name).encode("utf-8")
    digest = hashlib.sha256(key).digest()
    return HASH_ID_BASE + int.from_bytes(digest[:8], "big") % HASH_ID_SPAN


def assign_ids(names: Iterable[str]) -> dict[str, int]:
    """Distinct ids for distinct names: :func:`hashed_id`, with collisions resolved by probing.

    Names are visited in sorted order; a name whose id is taken by an earlier name gets
    ``hashed_id(name + "\\x00" + k)`` for the first k = 1, 2, ... that is free. So the result is a
    pure function of the set of names, and a name's id differs from ``hashed_id(name)`` only when
    another name of the set collides with it and sorts first (about n**2 / 1.8e16 for n names:
    5.6e-5 for a million files).
    """
    ids: dict[str, int] = {}
    taken: set[int] = set()
    for name in sorted(set(names)):
        image_id, k = hashed_id(name), 0
        while image_id in taken:
            k += 1
            image_id = hashed_id(f"{name}\x00{k}")
        taken.add(image_id)
        ids[name] = image_id
    return ids
