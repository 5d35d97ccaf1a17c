"""The driver's progress on a real pseudo-terminal: log lines above the bar (never glued onto it),
and plain progress lines where a bar cannot go (not a terminal, or one of zero columns)."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import select
import struct
import termios

import pytest

from segdist.job.progress import JobProgress, terminal_columns


def _pty(columns: int):
    """(master fd, the terminal as a text stream) of a new pseudo-terminal ``columns`` wide."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    return master, os.fdopen(slave, "w", buffering=1)


def _screen(master: int) -> list[str]:
    """What the terminal shows, line by line: carriage returns overwrite, ANSI erase-line codes
    clear, and only the text the cursor left behind counts."""
    data = b""
    while select.select([master], [], [], 0.2)[0]:
        chunk = os.read(master, 65536)
        if not chunk:
            break
        data += chunk
    lines, line, col = [], [], 0
    text = data.decode(errors="replace").replace("\x1b[K", "\x00K").replace("\x1b[A", "\x00A")
    for ch in text:
        if ch == "\n":
            lines.append("".join(line).rstrip())
            line, col = [], 0
        elif ch == "\r":
            col = 0
        elif ch == "\x00":
            continue
        else:
            if col < len(line):
                line[col] = ch
            else:
                line.append(ch)
            col += 1
    lines.append("".join(line).rstrip())
    return lines


@pytest.fixture
def console():
    """A handler on the root logger writing to a given stream, as the CLI's basicConfig does."""
    handlers = []

    def attach(stream) -> logging.Handler:
        h = logging.StreamHandler(stream)
        h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(h)
        handlers.append(h)
        return h

    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.INFO)
    yield attach
    for h in handlers:
        logging.getLogger().removeHandler(h)
    logging.getLogger().setLevel(level)


def test_log_lines_go_above_the_bar(console):
    master, term = _pty(100)
    try:
        handler = console(term)
        bar = JobProgress(40, 10, enabled=True, stream=term)
        bar.chunk_done(4, 0)
        logging.getLogger("segdist.job.dispatch").warning("worker 0 lost (test); starting a "
                                                          "replacement")
        bar.chunk_done(4, 1)
        bar.close()
        assert logging.getLogger().handlers[-1] is handler  # put back when the bar is gone
        shown = _screen(master)
    finally:
        term.close()
        os.close(master)
    message = "WARNING segdist.job.dispatch: worker 0 lost (test); starting a replacement"
    assert message in shown  # a line of its own: the bar's text is not glued to it
    bars = [line for line in shown if line.startswith("proposals:")]
    assert bars and "9/40" in bars[-1] and "chunks 2/10" in bars[-1] and "bad images 1" in bars[-1]
    assert all(message not in line or line == message for line in shown)


def test_plain_progress_lines_without_a_terminal_width(console, caplog):
    master, term = _pty(0)  # a terminal that reports zero columns
    try:
        assert term.isatty() and terminal_columns(term) == 0
        console(term)
        with caplog.at_level(logging.INFO, logger="segdist.job"):
            bar = JobProgress(40, 10, enabled=True, log_every=0.0, stream=term)
            bar.chunk_done(4, 0)
            bar.tick()
            bar.close()
        shown = _screen(master)
    finally:
        term.close()
        os.close(master)
    assert not any("proposals:" in line for line in shown)  # no bar drawn
    progress = [line for line in shown if "progress: " in line]
    assert len(progress) == 1 and "4/40 images, 1/10 chunks" in progress[0]
    # not a terminal at all (a Ray Job's log): the same lines
    piped = io.StringIO()
    assert terminal_columns(piped) == 0
    with caplog.at_level(logging.INFO, logger="segdist.job"):
        caplog.clear()
        bar = JobProgress(40, 10, enabled=True, log_every=0.0, stream=piped)
        bar.chunk_done(8, 0)
        bar.tick()
        bar.close()
    assert piped.getvalue() == ""
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["progress: 8/40 images"]
