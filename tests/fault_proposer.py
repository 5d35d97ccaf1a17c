"""Fault injection for the job's tests: a proposer that kills or stalls its worker process when it
meets a chosen image, or logs every model call, installed in place of a real preset's builder.

It lives in the tests, not in segdist: the job has no fault hook. A test puts
``FaultyBuilder(Fault(...))`` into ``segdist.proposers.PROPOSERS`` under the preset it runs; the
driver ships that builder to its workers (which import this module: tests/ is on their path, see
conftest.py), and the wrapped proposer runs the real one, so the files equal a clean run's.

- ``exit``: the worker process ends itself (``os._exit``) in the model call on that image;
- ``hang``: it stalls forever there (holding the worker's model lock, as a hung GPU call would).
With a ``marker`` path only the attempt that creates the marker fires (exactly one, whatever the
race between workers): the retry goes through.

``calls``: a file every model call appends one JSON line to (``{"pid", "node", "ids"}``: the
worker process, its Ray node, the batch's image ids), and every worker once when it has built
its model (``"ids": []``, ``"built": true``), so a test can count how often each image went
through the model, and find the workers' processes and nodes. ``delay_s`` slows each call
down (a test that kills workers mid-chunk needs chunks that last).

Run as a driver: ``python -c "import fault_proposer; fault_proposer.main()" ACTION ARG [MARKER]
-- segdist CLI arguments...`` installs the fault over ``deepmask`` (ACTION ``exit`` or ``hang``,
ARG the image id; or ACTION ``count``, ARG the calls file, MARKER the delay in seconds) and runs
the CLI.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from segdist.job.worker import _ray_node_id  # the node id the job records, for the calls log
from segdist.proposals.types import ImageProposals
from segdist.proposers import PROPOSERS, dense
from segdist.proposers.dense import DenseConfig


@dataclass(frozen=True)
class Fault:
    action: str  # "exit" or "hang"
    image_id: int
    marker: str | None = None

    def fire(self) -> None:
        if self.marker is not None:
            try:
                # O_EXCL: exactly one attempt wins the marker, however many workers race for it.
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        if self.action == "exit":
            os._exit(17)
        while True:
            time.sleep(3600)


class FaultyProposer:
    """The dense proposer, logging each call (``calls``), then firing ``fault`` after it ran on a
    batch holding the fault's image."""

    def __init__(self, inner, fault: Fault | None, calls: str | None = None, delay_s: float = 0.0):
        self.inner, self.fault, self.calls, self.delay_s = inner, fault, calls, delay_s
        self.name, self.weights_sha256, self.device = inner.name, inner.weights_sha256, inner.device
        self._log(ids=[], built=True)

    def _log(self, **entry) -> None:
        if self.calls is None:
            return
        line = json.dumps({"pid": os.getpid(), "node": _ray_node_id(), **entry})
        # One write of one short line with O_APPEND: lines from many processes never mix.
        fd = os.open(self.calls, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    def __call__(self, images: Sequence[np.ndarray], image_ids: Sequence[int]) -> list[ImageProposals]:
        out = self.inner(images, image_ids)
        self._log(ids=list(map(int, image_ids)))
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fault is not None and self.fault.image_id in image_ids:
            self.fault.fire()
        return out


@dataclass(frozen=True)
class FaultyBuilder:
    """A builder for PROPOSERS: the dense builder's proposer, wrapped (see FaultyProposer)."""

    fault: Fault | None = None
    calls: str | None = None
    delay_s: float = 0.0

    def __call__(self, config: DenseConfig) -> FaultyProposer:
        return FaultyProposer(dense.build(config), self.fault, self.calls, self.delay_s)


def read_calls(path: str) -> list[dict]:
    """The calls logged so far (see the module docstring)."""
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []


def main() -> None:
    """A driver process with a fault installed (see the module docstring)."""
    from segdist.cli import main as cli_main

    argv = sys.argv[1:]
    split = argv.index("--")
    action, arg, *marker = argv[:split]
    if action == "count":
        PROPOSERS["deepmask"] = FaultyBuilder(calls=arg, delay_s=float(marker[0]) if marker else 0.0)
    else:
        PROPOSERS["deepmask"] = FaultyBuilder(Fault(action, int(arg), marker[0] if marker else None))
    sys.exit(cli_main(argv[split + 1:]))
