"""The driver's live progress: a tqdm bar on a terminal, a log line every so often elsewhere
(Ray Jobs capture stdout/stderr into a log file, where a redrawn bar would be noise; a terminal
that reports zero columns, as some CI runners' do, cannot hold a bar either).

While the bar is up, log lines bound for its terminal go above it (the bar is cleared, the line
written, the bar redrawn) instead of being glued onto the bar's line.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import IO

from tqdm import tqdm

log = logging.getLogger("segdist.job")


def terminal_columns(stream: IO) -> int:
    """Columns of the terminal ``stream`` writes to; 0 when it is not a terminal or reports none."""
    try:
        if not stream.isatty():
            return 0
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


class _AboveTheBar(logging.Handler):
    """Wraps a console handler: its records are written with the bars on its stream cleared first
    and redrawn after (``tqdm.external_write_mode``)."""

    def __init__(self, inner: logging.StreamHandler):
        super().__init__(inner.level)
        self.inner = inner

    def emit(self, record: logging.LogRecord) -> None:
        with tqdm.external_write_mode(file=self.inner.stream):
            self.inner.emit(record)


def _same_stream(handler: logging.Handler, stream: IO) -> bool:
    other = getattr(handler, "stream", None)
    if other is stream:
        return True
    try:
        return other is not None and os.path.sameopenfile(other.fileno(), stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False


class _LogAboveBar:
    """For a bar's lifetime, every logger's console handlers on the bar's stream are wrapped in
    :class:`_AboveTheBar` (and put back after)."""

    def __init__(self, stream: IO):
        self.swapped: list[tuple[logging.Logger, logging.Handler, logging.Handler]] = []
        loggers = [logging.getLogger()] + [
            lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
        for lg in loggers:
            for i, h in enumerate(lg.handlers):
                if isinstance(h, logging.StreamHandler) and _same_stream(h, stream):
                    wrapper = _AboveTheBar(h)
                    lg.handlers[i] = wrapper
                    self.swapped.append((lg, h, wrapper))

    def restore(self) -> None:
        for lg, original, wrapper in self.swapped:
            lg.handlers = [original if h is wrapper else h for h in lg.handlers]
        self.swapped = []


class JobProgress:
    """Images and chunks done, images/s, ETA and error counts for one run.

    ``images_skipped``/``chunks_skipped`` were committed by an earlier run: they count as done but
    not toward the rate. ``stream``: where the bar goes (a bar only when it is a terminal with
    columns; else, when ``enabled``, a log line every ``log_every`` seconds).
    """

    def __init__(self, images_total: int, chunks_total: int, images_skipped: int = 0,
                 chunks_skipped: int = 0, enabled: bool = True, log_every: float = 30.0,
                 stream: IO | None = None):
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
        stream = sys.stderr if stream is None else stream
        bar = enabled and terminal_columns(stream) > 0
        self._bar = tqdm(total=images_total, initial=images_skipped, unit="img", dynamic_ncols=True,
                         desc="proposals", smoothing=0.1, file=stream) if bar else None
        self._log_above = _LogAboveBar(stream) if bar else None
        self._logging = enabled and not bar
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
        if self._log_above is not None:
            self._log_above.restore()
