"""The driver's work queue: chunks to actors, with per-chunk attempts and worker replacement.

Why not ``ray.util.ActorPool``: it does not route around an actor that died, and it cannot say
which chunk was lost with it. Here the driver keeps the queue itself:

- every worker slot holds one :class:`~segdist.job.worker.ChunkWorker` actor and up to ``depth``
  chunks in flight (two by default: one decoding/writing while the other runs the model);
- a chunk whose attempt fails goes back to the queue; after ``max_chunk_attempts`` failed attempts
  it is reported failed and the rest of the job carries on (at once after a permanent storage
  error: no bucket, access denied, no space left; the worker has retried transient ones);
- an actor that died (crash, out of memory, lost node) is killed for good and replaced by a fresh
  actor in the same slot (a replacement costs the same model load as a Ray restart would, and keeps
  the accounting of which chunks were lost exact); a slot gives up after ``max_replacements``
  losses in a row without a committed chunk in between;
- an attempt is counted only for a chunk that had *started* on the worker: each chunk runs as a
  streaming task (:meth:`~segdist.job.worker.ChunkWorker.run_chunk`) whose first item says it
  reached the worker. A chunk sent to a worker that was already dead (killed with the others of its
  node, say, before the driver heard of it) never started: it goes back to the front of the queue
  without an attempt. So a chunk loses one attempt per worker loss it was really running through;
- when an actor dies with several chunks in flight, nobody knows which one killed it: each started
  one gets an attempt counted, and is then retried *solo* (alone on its worker), so an innocent
  chunk loses at most one attempt to a poisonous neighbour.

- with ``chunk_timeout_s``, a worker whose oldest chunk in flight has run that long (a hung GPU or
  read) is killed and replaced the same way; the chunk gets a failed attempt.

Retried chunks rewrite the same deterministic files atomically, so a retry never duplicates output.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayError, RayTaskError

from segdist.errors import SegdistError, StorageError
from segdist.job.plan import ChunkSpec
from segdist.job.state import ChunkRecord
from segdist.job.worker import STARTED, ChunkWorker, WorkerInfo, WorkerSettings

log = logging.getLogger(__name__)


@dataclass
class ChunkFailure:
    """A chunk given up on after its attempts: the last error of each attempt."""

    index: int
    attempts: int
    errors: list[str] = field(default_factory=list)


@dataclass
class DispatchStats:
    workers_started: int = 0
    workers_replaced: int = 0
    attempts_failed: int = 0
    worker_infos: list[WorkerInfo] = field(default_factory=list)


@dataclass
class _Slot:
    number: int
    actor: Any = None
    generation: int = 0
    ready: bool = False
    retired: bool = False
    replacements: int = 0
    inflight: set[int] = field(default_factory=set)
    started: set[int] = field(default_factory=set)  # chunks in flight that reached the worker
    solo: bool = False  # running a chunk that must not share the worker
    order: list[Any] = field(default_factory=list)  # task refs in flight, oldest first
    head_since: float = 0.0  # since when order[0] is the oldest (the one the timeout clocks)


@dataclass
class _Run:
    """The state of one :meth:`Dispatcher.run`: the queue and what each chunk and ref is at."""

    specs: dict[int, ChunkSpec]
    queue: deque[int] = field(default_factory=deque)
    solo: set[int] = field(default_factory=set)  # chunks to retry alone on a worker
    attempts: dict[int, int] = field(default_factory=dict)
    errors: dict[int, list[str]] = field(default_factory=dict)
    done: dict[int, ChunkRecord] = field(default_factory=dict)
    failed: dict[int, ChunkFailure] = field(default_factory=dict)
    info_refs: dict[Any, tuple[_Slot, int]] = field(default_factory=dict)  # ref -> (slot, generation)
    # a chunk's streaming task -> (slot, generation, chunk index)
    task_refs: dict[Any, tuple[_Slot, int, int]] = field(default_factory=dict)
    begun: set[Any] = field(default_factory=set)  # tasks whose chunk reached its worker
    started: float = field(default_factory=time.monotonic)
    last_wait_log: float = 0.0

    def __post_init__(self) -> None:
        self.queue.extend(self.specs)
        self.attempts = {i: 0 for i in self.specs}
        self.errors = {i: [] for i in self.specs}
        self.last_wait_log = self.started


def _short(exc: BaseException) -> str:
    """The first lines of an error, without Ray's long traceback wrapping."""
    if isinstance(exc, RayTaskError) and exc.cause is not None:
        exc = exc.cause
    text = f"{type(exc).__name__}: {exc}".strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[:3])[:500]


class Dispatcher:
    """Runs chunks on a set of ChunkWorker actors until each is committed or has failed.

    Args:
        settings: shipped to every worker's constructor.
        num_workers: actors (slots) to start.
        actor_options: ``ray.remote`` options (num_gpus, num_cpus, runtime_env, ...).
        max_chunk_attempts: attempts before a chunk is reported failed.
        max_replacements: how many dead actors in a row (no chunk committed between) one slot replaces.
        depth: chunks in flight per worker.
        on_first_worker: called with the first worker's WorkerInfo before any chunk is sent (the
            driver checks the model identity there; an exception aborts the run).
        on_done / on_failed_attempt / on_tick: progress callbacks.
        chunk_timeout_s: None, or the seconds a worker's oldest chunk in flight may run before the
            worker is killed and replaced (the chunk gets a failed attempt, the worker's other
            chunks are requeued without one).
    """

    def __init__(self, settings: WorkerSettings, num_workers: int, actor_options: dict[str, Any],
                 max_chunk_attempts: int = 3, max_replacements: int = 3, depth: int = 2,
                 on_first_worker: Callable[[WorkerInfo], None] | None = None,
                 on_done: Callable[[ChunkRecord], None] | None = None,
                 on_failed_attempt: Callable[[int, str, bool], None] | None = None,
                 on_tick: Callable[[], None] | None = None,
                 tick_seconds: float = 0.5, chunk_timeout_s: float | None = None):
        self.settings = settings
        self.num_workers = num_workers
        self.depth = max(1, depth)
        # SPREAD: workers on as many nodes as possible, so a lost node takes few of them (and the
        # decoding and network load is shared), unless the caller placed them itself.
        self.actor_options = {"scheduling_strategy": "SPREAD", **actor_options, "max_restarts": 0,
                              "max_task_retries": 0, "max_concurrency": self.depth}
        self.max_chunk_attempts = max_chunk_attempts
        self.max_replacements = max_replacements
        self.on_first_worker = on_first_worker
        self.on_done = on_done
        self.on_failed_attempt = on_failed_attempt
        self.on_tick = on_tick
        self.tick_seconds = tick_seconds
        self.chunk_timeout_s = chunk_timeout_s
        self.stats = DispatchStats()
        self._remote = ray.remote(ChunkWorker)
        self._slots: list[_Slot] = []
        self._first_checked = False
        self._last_loss = ""

    # -- actors -------------------------------------------------------------------------------
    def _start(self, slot: _Slot, info_refs: dict) -> None:
        slot.actor = self._remote.options(**self.actor_options).remote(self.settings)
        slot.generation += 1
        slot.ready = False
        slot.inflight = set()
        slot.started = set()
        slot.solo = False
        slot.order = []
        self.stats.workers_started += 1
        info_refs[slot.actor.info.remote()] = (slot, slot.generation)

    def _worker_lost(self, slot: _Slot, reason: str, info_refs: dict) -> None:
        """The slot's actor is dead (or useless): kill it for good, replace it if allowed."""
        self._last_loss = reason
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:  # already gone
            pass
        if slot.replacements >= self.max_replacements:
            slot.retired = True
            slot.ready = False
            log.warning("worker %d lost (%s); no replacements left (resources.max_actor_restarts=%d)",
                        slot.number, reason, self.max_replacements)
            return
        slot.replacements += 1
        self.stats.workers_replaced += 1
        log.warning("worker %d lost (%s); starting a replacement (%d of %d)", slot.number, reason,
                    slot.replacements, self.max_replacements)
        self._start(slot, info_refs)

    def shutdown(self) -> None:
        for slot in self._slots:
            if slot.actor is not None:
                try:
                    ray.kill(slot.actor, no_restart=True)
                except Exception:
                    pass

    # -- the loop ----------------------------------------------------------------------------
    def run(self, chunks: Sequence[ChunkSpec]) -> tuple[dict[int, ChunkRecord], dict[int, ChunkFailure]]:
        """Process ``chunks``; returns ``(records by index, failures by index)``.

        Each round: kill timed-out workers, hand out queued chunks, give up on the queue if every
        slot is retired, wait for one result (a worker's info or a chunk's), take it in.
        """
        run = _Run({c.index: c for c in chunks})
        if not run.queue:
            return run.done, run.failed
        self._slots = [_Slot(n) for n in range(min(self.num_workers, len(run.queue)))]
        for slot in self._slots:
            self._start(slot, run.info_refs)
        try:
            while run.queue or run.task_refs:
                if self.chunk_timeout_s is not None:  # after the last results were taken in
                    self._kill_timed_out(run)
                self._hand_out(run)
                if all(s.retired for s in self._slots):
                    self._fail_queue(run)
                    if not run.task_refs:
                        break
                pending = list(run.task_refs) + list(run.info_refs)
                if not pending:
                    break
                ready, _ = ray.wait(pending, num_returns=1, timeout=self.tick_seconds)
                if self.on_tick:
                    self.on_tick()
                if not any(s.ready for s in self._slots) and not ready:
                    self._log_waiting(run)
                for ref in ready:
                    if ref in run.info_refs:
                        self._handle_info(ref, run.info_refs)
                    else:
                        self._take_result(run, ref)
        finally:
            self.shutdown()
        return run.done, run.failed

    def _attempt_failed(self, run: _Run, index: int, error: str, give_up: bool = False) -> None:
        """Count a failed attempt of chunk ``index``: requeue it, or give up after the last (or at
        once with ``give_up``)."""
        run.attempts[index] += 1
        run.errors[index].append(error)
        self.stats.attempts_failed += 1
        final = give_up or run.attempts[index] >= self.max_chunk_attempts
        if final:
            run.failed[index] = ChunkFailure(index, run.attempts[index], list(run.errors[index]))
        else:
            run.queue.append(index)
        if self.on_failed_attempt:
            self.on_failed_attempt(index, error, final)

    def _hand_out(self, run: _Run) -> None:
        """Queued chunks to ready workers with room; a solo chunk only to an idle worker, which
        then takes nothing else."""
        for slot in self._slots:
            while slot.ready and not slot.retired and not slot.solo and run.queue \
                    and len(slot.inflight) < self.depth:
                index = run.queue[0]
                if index in run.solo:
                    if slot.inflight:
                        break
                    slot.solo = True
                run.queue.popleft()
                slot.inflight.add(index)
                ref = slot.actor.run_chunk.options(num_returns="streaming").remote(
                    index, run.specs[index].records, run.attempts[index] + 1)
                run.task_refs[ref] = (slot, slot.generation, index)
                if not slot.order:
                    slot.head_since = time.monotonic()
                slot.order.append(ref)

    def _fail_queue(self, run: _Run) -> None:
        """Every slot is retired: the queued chunks fail (chunks in flight still report)."""
        for index in list(run.queue):
            run.attempts[index] = max(run.attempts[index], 1)
            run.failed[index] = ChunkFailure(index, run.attempts[index], run.errors[index] + [
                "no workers left: every worker died more than "
                f"resources.max_actor_restarts={self.max_replacements} times in a row; "
                f"the last: {self._last_loss}"])
        run.queue.clear()

    def _log_waiting(self, run: _Run) -> None:
        """No worker is ready yet: say so once a minute, with what the cluster has."""
        now = time.monotonic()
        if now - run.last_wait_log > 60:
            run.last_wait_log = now
            log.warning("no worker ready after %.0f s; cluster resources: %s (each worker needs %s)",
                        now - run.started, ray.available_resources(),
                        {k: self.actor_options.get(k) for k in ("num_gpus", "num_cpus")})

    def _take_result(self, run: _Run, ref: Any) -> None:
        """A chunk's task has news: it started, or its record, a failed attempt, or its worker's
        death (an attempt counted only if the chunk had started there)."""
        slot, generation, index = run.task_refs[ref]
        current = generation == slot.generation
        try:
            value = ray.get(next(ref))
        except StopIteration:  # cannot happen (run_chunk yields twice); never hang on it
            value = RuntimeError("the worker's task ended without a chunk record")
        except RayTaskError as exc:  # the chunk failed, the worker is fine
            value = exc
        except RayError as exc:  # the worker died (before or while running the chunk)
            self._lost_with_chunk(run, ref, exc)
            return
        if isinstance(value, str) and value == STARTED:
            run.begun.add(ref)
            if current:
                slot.started.add(index)
            return
        self._finished(run, ref)
        if current and slot.solo and not slot.inflight:
            slot.solo = False
        if isinstance(value, BaseException):
            # A permanent storage error (no bucket, access denied, no space: the worker already
            # retried the transient ones) fails the same way on every attempt: fail fast.
            cause = getattr(value, "cause", value)
            permanent = isinstance(cause, StorageError) and not cause.transient
            self._attempt_failed(run, index, _short(value), give_up=permanent)
            return
        if current:
            # The budget counts consecutive losses: a long run on preemptible nodes may lose many
            # workers over a day, and a slot that makes progress is healthy.
            slot.replacements = 0
        run.solo.discard(index)
        run.done[index] = value
        if self.on_done:
            self.on_done(value)

    def _finished(self, run: _Run, ref: Any) -> None:
        """Forget the task ``ref`` (its chunk is no longer in flight on its slot)."""
        slot, generation, index = run.task_refs.pop(ref)
        run.begun.discard(ref)
        if generation == slot.generation:
            slot.inflight.discard(index)
            slot.started.discard(index)
            if slot.order and slot.order[0] == ref:
                slot.head_since = time.monotonic()
            slot.order = [r for r in slot.order if r != ref]

    def _lost_with_chunk(self, run: _Run, ref: Any, exc: BaseException) -> None:
        """The worker of task ``ref`` died. Its chunk gets an attempt counted only if it had
        started there; a chunk sent to an already dead worker goes back to the front of the queue
        as it was."""
        slot, generation, index = run.task_refs[ref]
        started = ref in run.begun
        if generation == slot.generation:
            # Which chunk killed it is unknown: the chunks that were running there are retried
            # alone (solo), so an innocent one loses at most one attempt to its neighbour.
            lost_with = slot.started | ({index} if started else set())
            if len(lost_with) > 1:
                run.solo.update(lost_with)
            self._finished(run, ref)
            # The other chunks of this actor report as they arrive (each by whether it started).
            self._worker_lost(slot, _short(exc), run.info_refs)
        else:
            self._finished(run, ref)
        if started:
            self._attempt_failed(run, index, _short(exc))
        else:
            log.info("chunk %d was sent to a worker that had died; requeued (no attempt counted)",
                     index)
            run.queue.appendleft(index)

    def _kill_timed_out(self, run: _Run) -> None:
        """Kill and replace each worker whose oldest chunk has run past ``chunk_timeout_s``.

        The worker's oldest chunk gets a failed attempt; the others it held go back to the front
        of the queue without one (they were waiting behind it, not at fault).
        """
        now = time.monotonic()
        for slot in self._slots:
            if not slot.order or now - slot.head_since <= self.chunk_timeout_s:
                continue
            hung = run.task_refs[slot.order[0]][2]
            for ref in slot.order:
                _, _, index = run.task_refs.pop(ref)
                run.begun.discard(ref)
                if index != hung:
                    run.queue.appendleft(index)
            reason = (f"chunk {hung} timed out after {now - slot.head_since:.0f} s "
                      f"(resources.chunk_timeout_s={self.chunk_timeout_s:g})")
            slot.order = []
            slot.inflight = set()
            slot.started = set()
            self._worker_lost(slot, reason, run.info_refs)
            self._attempt_failed(run, hung, reason)

    def _handle_info(self, ref, info_refs: dict) -> None:
        slot, generation = info_refs.pop(ref)
        if generation != slot.generation:
            return
        try:
            info: WorkerInfo = ray.get(ref)
        except RayError as exc:
            self._worker_lost(slot, f"failed to start: {_short(exc)}", info_refs)
            return
        if info.error is not None:
            if info.user_error:
                # A bad model config or weights file fails the same way on every worker: stop now.
                raise SegdistError(f"the model could not be loaded: {info.error}")
            self._worker_lost(slot, f"model load failed: {info.error.splitlines()[0]}", info_refs)
            return
        if not self._first_checked:
            self._first_checked = True
            if self.on_first_worker:
                self.on_first_worker(info)
        self.stats.worker_infos.append(info)
        slot.ready = True
        log.info("worker %d ready on %s (pid %d, device %s)", slot.number, info.host, info.pid, info.device)
