"""The driver's live progress: a tqdm bar on a terminal, a log line every so often elsewhere
(Ray Jobs capture stdout/stderr into a log file, where a redrawn bar would be noise)."""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("segdist.job")


class JobProgress:
    """Images and chunks done, images/s, ETA and error counts for one run.

    ``images_skipped``/``chunks_skipped`` were committed by an earlier run: they count as done but
    not toward the rate.
    """

    def __init__(self, images_total: int, chunks_total: int, images_skipped: int = 0,
                 chunks_skipped: int = 0, enabled: bool = True, log_every: float = 30.0):
        self.images_total = images_total
        self.chunks_total = chunks_total
        self.images_done = images_skipped
        self.chunks_done = chunks_skipped
        self._skipped = images_skipped
        self.image_errors = 0
        self.chunk_errors = 0
        self.chunks_failed = 0
        self._t0 = time.monotonic()
        self._last_log = self._t0
        self._log_every = log_every
        tty = enabled and sys.stderr.isatty()
        self._bar = tqdm(total=images_total, initial=images_skipped, unit="img", dynamic_ncols=True,
                         desc="proposals", disable=not tty, smoothing=0.1) if tty else None
        self._logging = enabled and not tty
        self._refresh()

    def rate(self) -> float:
        dt = time.monotonic() - self._t0
        return (self.images_done - self._skipped) / dt if dt > 0 else 0.0

    def _refresh(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(
                f"chunks {self.chunks_done}/{self.chunks_total}, bad images {self.image_errors}, "
                f"failed attempts {self.chunk_errors}, failed chunks {self.chunks_failed}",
                refresh=True)

    def chunk_done(self, images: int, failed_images: int) -> None:
        self.chunks_done += 1
        self.images_done += images + failed_images
        self.image_errors += failed_images
        if self._bar is not None:
            self._bar.update(images + failed_images)
        self._refresh()

    def attempt_failed(self, final: bool) -> None:
        self.chunk_errors += 1
        self.chunks_failed += int(final)
        self._refresh()

    def tick(self) -> None:
        if not self._logging:
            return
        now = time.monotonic()
        if now - self._last_log < self._log_every:
            return
        self._last_log = now
        rate = self.rate()
        left = self.images_total - self.images_done
        eta = f"{left / rate:.0f} s" if rate > 0 else "?"
        log.info("progress: %d/%d images, %d/%d chunks, %.2f images/s, ETA %s, bad images %d, "
                 "failed attempts %d", self.images_done, self.images_total, self.chunks_done,
                 self.chunks_total, rate, eta, self.image_errors, self.chunk_errors)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
