"""The ``segdist`` command line: one module per subcommand under ``segdist.commands``.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
Command modules import their heavy dependencies inside ``add_arguments``/``run``, so importing them
all (for their ``HELP``, the one source of each command's help line) leaves ``segdist --help``
free of torch and ray. A :class:`~segdist.errors.SegdistError` (or a storage client's own error,
in the words of :mod:`segdist.storage_errors`) becomes one clear message on stderr and exit code 2.

Signals: SIGTERM (what ``timeout``, Kubernetes and Slurm send) is handled as Ctrl-C: it raises
KeyboardInterrupt in the main thread, so the running command unwinds the same way (a job stops its
workers and writes no manifest), and the CLI prints one line and exits 128 + the signal's number
(130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading

from segdist import __version__
from segdist.errors import SegdistError

# command name -> module under segdist.commands
COMMANDS = {
    "demo": "demo",
    "sample-data": "sample_data",
    "generate": "generate",
    "submit": "submit",
    "jobs": "jobs",
    "evaluate": "evaluate",
    "train": "train",
    "export": "export",
    "show": "show",
    "convert-t7": "convert_t7",
    "bench": "bench",
}


class _Interrupts:
    """SIGTERM and SIGINT raise KeyboardInterrupt while a command runs (handlers put back after);
    ``received`` says which signal it was (KeyboardInterrupt itself does not: Ray's waits turn
    whatever a handler raised into a plain KeyboardInterrupt)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received = signal.SIGINT  # a KeyboardInterrupt raised without a handler: Ctrl-C
        self._previous: dict[int, object] = {}

    # Python ignores (prints and drops) an exception raised while a finaliser runs; a signal that
    # lands there (Ray's ObjectRefGenerator.__del__ is a common spot) is delivered again shortly
    # after, once the finaliser has returned, instead of being lost.
    REDELIVER_AFTER_S = 0.02

    def _interrupt(self, signum: int, frame) -> None:
        self.received = signum
        if _inside_finaliser(frame):
            threading.Timer(self.REDELIVER_AFTER_S, os.kill, (os.getpid(), signum)).start()
            return
        raise KeyboardInterrupt

    def __enter__(self) -> "_Interrupts":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._interrupt)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _inside_finaliser(frame) -> bool:
    """Whether ``frame`` runs inside a ``__del__`` (where a raised exception would be dropped)."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _load(name: str):
    return importlib.import_module(f"segdist.commands.{COMMANDS[name]}")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segdist",
        description="Dataset-scale object proposals (DeepMask, SharpMask, Mask R-CNN) on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"segdist {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name in COMMANDS:
        mod = _load(name)
        if name == chosen:  # only the chosen command's arguments (they may import more)
            p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
        else:
            sub.add_parser(name, help=mod.HELP, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0 if args.command is None else 2
    with _Interrupts() as interrupts:
        try:
            return int(args._run(args) or 0)
        except SegdistError as exc:
            print(f"segdist {args.command}: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            name = signal.Signals(interrupts.received).name
            print(f"segdist {args.command}: interrupted ({name})", file=sys.stderr)
            return 128 + interrupts.received
        except Exception as exc:
            # A storage client's own error (botocore, aiohttp, gcsfs) that no call site translated:
            # still one line saying what to check, not a traceback.
            from segdist.storage_errors import from_storage_library, translate

            if isinstance(exc, OSError) or not from_storage_library(exc):
                raise
            print(f"segdist {args.command}: error: {translate(exc, 'the store', 'use')}",
                  file=sys.stderr)
            return 2


if __name__ == "__main__":  # python -m segdist.cli, as python -m segdist
    raise SystemExit(main())
