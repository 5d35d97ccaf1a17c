"""The output's lease: one driver at a time writes an output.

Two drivers running into the same output would each hand out every chunk, overwrite each
other's run record and manifest, and report timings and failures of half the work. So a driver
holds ``OUT/_segdist/lease.json`` while it runs:

- it is **created conditionally**: on S3 a PUT with ``If-None-Match: *``, locally a hard link that
  fails when the name exists (as ``O_EXCL``); elsewhere an existence check then a write (not
  atomic: two drivers starting in the same instant could both get it). A second driver finds it and
  stops with a message naming the holder (host, pid, since when, last heartbeat);
- the holder **refreshes a heartbeat** in it every :data:`HEARTBEAT_S` seconds (a background thread)
  and removes it when the run ends, however it ends;
- a lease is **stale**, and taken over, when its heartbeat is older than :data:`STALE_AFTER_S` (the
  holder died without removing it: SIGKILL, a lost head node), or at once when its holder ran on
  this same machine (same host name and boot id) and that process is gone (or is this process,
  whose earlier run could not remove it, say in a store outage). Heartbeats are
  compared with this machine's clock: clocks more than a few minutes apart would make a live lease
  look stale; NTP keeps them far closer. On S3 the takeover is conditional too (``If-Match`` on the
  stale lease's ETag), so of two drivers taking over the same stale lease only one wins.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from segdist import storage
from segdist.errors import SegdistError, StorageError
from segdist.proposals.layout import LEASE_FILE, STATE_DIR
from segdist.storage_errors import is_missing

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # ten missed heartbeats
_HELD: set[str] = set()  # ids of the leases this process holds now


def lease_uri(out_uri: str) -> str:
    return storage.join(out_uri, STATE_DIR, LEASE_FILE)


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name (field 2) may hold spaces; the fields after its ')' are fixed.
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _holder_gone(lease: Mapping[str, Any]) -> bool:
    """Whether the lease's driver ran on this machine and is no longer running: its process is
    gone, or it is this process and no run here holds the lease (an earlier run that could not
    remove it, e.g. in a store outage)."""
    if lease.get("host") != socket.gethostname() or lease.get("boot_id") != _boot_id() \
            or not isinstance(lease.get("pid"), int):
        return False
    pid = lease["pid"]
    if pid == os.getpid() and lease.get("pid_start") == _process_start(pid):
        return lease.get("id") not in _HELD
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    start = lease.get("pid_start")
    return start is not None and _process_start(pid) not in (None, start)  # pid reused


def describe(lease: Mapping[str, Any]) -> str:
    """``host:pid (since ..., last heartbeat N s ago)`` for messages."""
    try:
        age = (_now() - datetime.fromisoformat(lease["heartbeat"])).total_seconds()
        beat = f"last heartbeat {age:.0f} s ago"
    except (KeyError, TypeError, ValueError):
        beat = "no readable heartbeat"
    return f"{lease.get('holder', '?')} (since {lease.get('acquired', '?')}, {beat})"


def stale_reason(lease: Mapping[str, Any] | None) -> str | None:
    """Why ``lease`` (as read; None if unreadable) no longer holds the output, or None if it does."""
    if lease is None:
        return "the lease file is not valid JSON"
    if _holder_gone(lease):
        return f"its driver {lease.get('holder')} is no longer running on this machine"
    try:
        beat = datetime.fromisoformat(lease["heartbeat"])
        limit = float(lease.get("stale_after_s", STALE_AFTER_S))
    except (KeyError, TypeError, ValueError):
        return "it has no readable heartbeat"
    age = (_now() - beat).total_seconds()
    if age > limit:
        return f"its last heartbeat is {age:.0f} s old (stale after {limit:.0f} s)"
    return None


class Lease:
    """A driver's hold on an output (see the module docstring); use :func:`acquire`."""

    def __init__(self, out_uri: str, storage_options: Mapping[str, Any] | None):
        self.uri = lease_uri(out_uri)
        self.out_uri = out_uri
        self.storage_options = dict(storage_options or {})
        self.id = uuid.uuid4().hex
        self.etag: str | None = None
        self.acquired = _now().isoformat(timespec="seconds")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def body(self) -> bytes:
        pid = os.getpid()
        return json.dumps({
            "holder": f"{socket.gethostname()}:{pid}", "host": socket.gethostname(), "pid": pid,
            "boot_id": _boot_id(), "pid_start": _process_start(pid), "id": self.id,
            "acquired": self.acquired, "heartbeat": _now().isoformat(timespec="seconds"),
            "heartbeat_s": HEARTBEAT_S, "stale_after_s": STALE_AFTER_S,
        }, indent=1).encode()

    def _read(self) -> tuple[dict[str, Any] | None, bool]:
        """(the lease as read or None when unreadable, whether a file is there)."""
        try:
            raw = storage.read_bytes(self.uri, self.storage_options)
        except StorageError as exc:
            if is_missing(exc):
                return None, False
            raise
        try:
            lease = json.loads(raw)
        except ValueError:
            return None, True
        return (lease if isinstance(lease, dict) else None), True

    def take(self) -> None:
        """Create the lease, or take over a stale one; SegdistError naming the holder if a live
        driver holds it."""
        for _ in range(3):  # a lease released or taken over between our calls: look again
            # Looked at before the conditional create, so that a store ignoring the condition
            # (an older S3-compatible server) still refuses all but a same-instant race.
            etag = self._etag()  # before the read: if the lease changes after, If-Match fails
            lease, there = self._read()
            if not there:
                if storage.create_new(self.uri, self.body(), self.storage_options):
                    break
                continue
            why = stale_reason(lease)
            if why is None:
                raise SegdistError(
                    f"{self.out_uri} is being written by another segdist driver: "
                    f"{describe(lease)}. Wait for it to finish or stop it; if that driver is gone, "
                    f"its lease lapses {STALE_AFTER_S:.0f} s after its last heartbeat (at once when "
                    f"it ran on this machine), or remove {self.uri} if you are sure no driver is "
                    "writing there.")
            log.warning("taking over the lease of %s: %s", self.out_uri, why)
            if storage.replace_if(self.uri, self.body(), etag, self.storage_options):
                break
        else:
            raise SegdistError(f"{self.out_uri}: other drivers keep taking its lease ({self.uri}); "
                               "run one driver per output")
        self.etag = self._etag()
        _HELD.add(self.id)

    def _etag(self) -> str | None:
        try:
            return storage.etag_of(self.uri, self.storage_options)
        except StorageError as exc:
            if is_missing(exc):
                return None
            raise

    def start_heartbeat(self) -> None:
        """Refresh the heartbeat every HEARTBEAT_S seconds in a daemon thread until release()."""
        self._thread = threading.Thread(target=self._beat, name="segdist-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                lease, _ = self._read()
                if (lease or {}).get("id") != self.id or not storage.replace_if(
                        self.uri, self.body(), self.etag, self.storage_options):
                    lease, _ = self._read()
                    log.error("the lease of %s was taken over by %s: another driver is writing "
                              "this output", self.out_uri, describe(lease or {}))
                    return
                self.etag = self._etag()
            except StorageError as exc:  # an outage: the next beat tries again
                log.warning("could not refresh the lease of %s: %s", self.out_uri, exc)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still this driver's."""
        self._stop.set()
        _HELD.discard(self.id)
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            lease, there = self._read()
            if there and lease is not None and lease.get("id") == self.id:
                storage.remove(self.uri, self.storage_options)
        except StorageError as exc:
            log.warning("could not remove the lease %s (%s); the next run takes it over once it "
                        "is stale", self.uri, exc)


def acquire(out_uri: str, storage_options: Mapping[str, Any] | None) -> Lease:
    """Take the output's lease and start its heartbeat (see the module docstring)."""
    lease = Lease(out_uri, storage_options)
    lease.take()
    lease.start_heartbeat()
    return lease
