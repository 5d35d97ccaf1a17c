"""Fault injection for the job's own tests: make a worker die or stall at a chosen chunk.

Set ``SEGDIST_TEST_FAULT`` in the driver's environment (the driver forwards it to its actors):

- ``exit@12:/tmp/marker``  the worker process ends itself (``os._exit``) in the middle of chunk 12
  (after the model ran, before the files are written), once: the attempt that creates
  ``/tmp/marker`` dies, so the retry of chunk 12 succeeds.
- ``exit@12``              every attempt at chunk 12 kills its worker (a chunk that keeps failing).
- ``hang@12``              the worker stalls forever at chunk 12 (to interrupt a driver mid-run).
- ``hang@12:/tmp/marker``  the attempt that creates the marker stalls forever, later ones go through
  (a hung worker that ``resources.chunk_timeout_s`` kills and replaces).

This is the only way to kill a worker at a known point of its work from outside without races;
nothing reads the variable unless it is set.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

ENV_VAR = "SEGDIST_TEST_FAULT"


@dataclass(frozen=True)
class Fault:
    action: str  # "exit" or "hang"
    chunk: int
    marker: str | None = None


def parse(value: str | None) -> Fault | None:
    """Parse ``ACTION@CHUNK[:MARKER]``; None when unset or empty. Raises ValueError when malformed."""
    if not value:
        return None
    action, _, rest = value.partition("@")
    chunk, _, marker = rest.partition(":")
    if action not in ("exit", "hang") or not chunk.isdigit():
        raise ValueError(f"{ENV_VAR}={value!r}: expected exit@CHUNK[:MARKER] or hang@CHUNK")
    return Fault(action, int(chunk), marker or None)


def maybe_inject(chunk_index: int) -> None:
    """Called by a worker mid-chunk; acts only if the variable names this chunk."""
    fault = parse(os.environ.get(ENV_VAR))
    if fault is None or fault.chunk != chunk_index:
        return
    if fault.marker is not None:
        try:
            # O_EXCL: exactly one attempt wins the marker, however many workers race for it.
            os.close(os.open(fault.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    if fault.action == "exit":
        os._exit(17)
    while True:
        time.sleep(3600)
