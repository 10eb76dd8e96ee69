"""The reconciler of one task queue: re-drives tasks whose status never came back, with backoff,
up to `max_attempts`; then the task is dead and goes to the queue's dead-letter topic.

It runs inside `refold worker` beside the queue's status projection and reads that projection's
store (the fold of the status topic), every `interval_s`. A tick costs O(due tasks), not O(all
tasks): an index keeps the open tasks of the owned partitions by the time `next_step` may first
act on them (`due_ms`), fed by the runner's commit hook with the keys it changed, and rebuilt by
one scan of the store when the runner or its partitions change. Only tasks in the status
partitions this worker owns are its business, so two workers never both re-drive a task. The
decision itself is pure (`refold.core.task_status.next_step`). What a re-drive writes: a work
item with the task alone at attempt n+1, then a `retrying` status event. A crash between the two
is healed by the next sweep after a restart (the status is still the old one, so the task is
re-driven again: handlers are idempotent). The sweep remembers the attempts it re-drove until the
fold shows them, so a task is not re-driven twice in a row while its `retrying` event is being
folded (it looks again every RECHECK_MS).
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from refold.core.config import Config
from refold.core.serde import Codec
from refold.core.task_status import due_ms, next_step, task_data_json
from refold.core.tasks import STATUS, WORK_ITEM, TaskQueue
from refold.engine.frozen import Serving
from refold.engine.runtime import ProjectionRunner
from refold.engine.timetravel import murmur2_partition
from refold.kafka import clients
from refold.kafka.task_log import Acks, TaskLog, status_data

log = logging.getLogger(__name__)

PAGE = 1000
#: A task acted on (or skipped while our last write is being folded) is looked at again after
#: this, unless the fold moves it first.
RECHECK_MS = 1000


@dataclass(slots=True)
class ReconcilerStats:
    state: str = "starting"
    error: str | None = None
    redriven: int = 0
    dead: int = 0
    sweeps: int = 0
    open: int = 0  # tasks in the due index


class Reconciler:
    """Sweeps one queue's status store; `runner()` is the status projection's live runner."""

    def __init__(
        self,
        config: Config,
        codec: Codec,
        queue: TaskQueue,
        runner: Callable[[], Serving],
        *,
        partitions: int,
        interval_s: float = 0.25,
    ) -> None:
        self.queue = queue
        self._partitions = partitions  # of the status topic: which keys are this worker's
        self.stats = ReconcilerStats()
        self._runner = runner
        self._interval_s = interval_s
        self._log = TaskLog(config, codec, source=f"refold://reconciler/{queue.name}")
        self._producer = clients.producer(config, defaults={"linger.ms": 1})
        self._stop = threading.Event()
        self._pending: dict[str, tuple[str, int]] = {}  # task id -> (step, attempts then)
        # The due index: open tasks (those `next_step` may act on) by due time, a heap with
        # lazy deletion (an entry counts while it matches `_due`), fed by the status runner's
        # commit hook; rebuilt by one scan when the runner or its partitions change.
        self._due: dict[str, int] = {}
        self._heap: list[tuple[int, str]] = []
        self._changes: set[str] = set()
        self._lock = threading.Lock()
        self._watched: Serving | None = None
        self._owned: set[int] = set()

    def run(self) -> None:
        try:
            self._log.register(self._producer)
            self.stats.state = "running"
            wait = self._interval_s
            while not self._stop.wait(wait):
                started = time.monotonic()
                self.sweep(int(time.time() * 1000))
                # A sweep reads every task in the store (no index of open tasks yet): at most
                # ~10% of the time sweeping, so it does not starve the fold and the intake of
                # the same process (measured: 41% of the worker's samples at 20k tasks).
                wait = max(self._interval_s, 9 * (time.monotonic() - started))
        except Exception as exc:
            log.exception("reconciler %s failed", self.queue.name)
            self.stats.state = "failed"
            self.stats.error = f"{type(exc).__name__}: {exc}"
        finally:
            if self.stats.state != "failed":
                self.stats.state = "stopped"
            self._producer.flush(10)

    def stop(self) -> None:
        self._stop.set()

    def sweep(self, now_ms: int) -> None:
        """One tick: bring the due index up to date, then act on the tasks that are due."""
        runner = self._runner()
        owned = {p for topic, p in runner.stats.assigned if topic == self.queue.status_topic}
        if runner is not self._watched or owned != self._owned:
            self._rebuild(runner, owned)  # a new runner (a swap) or new partitions: scan once
        if not owned:
            return
        self._index_changes(runner.store)
        due: list[str] = []
        heap = self._heap
        while heap and heap[0][0] <= now_ms:
            at, task_id = heapq.heappop(heap)
            if self._due.get(task_id) == at:  # else a stale entry: the task moved on
                due.append(task_id)
        if due:
            acks = Acks()
            states = runner.store.get_many(due)
            for task_id in due:
                state = states.get(task_id)
                if state is None:
                    self._due.pop(task_id, None)
                    continue
                self._reconcile(task_id, state, now_ms, acks)
                # Looked at again in a while unless the fold moves it first (what we wrote
                # being folded, or the task ending).
                self._schedule(task_id, now_ms + RECHECK_MS)
            acks.wait(self._producer, f"reconciliation of queue {self.queue.name!r}")
        self.stats.sweeps += 1
        self.stats.open = len(self._due)

    # -- the due index: open tasks of the owned partitions by due time -----------------------

    def _touched(self, keys: Iterable[str]) -> None:
        """The runner's commit hook (its fold thread): note the keys, index them on the tick."""
        with self._lock:
            self._changes.update(keys)

    def _rebuild(self, runner: Serving, owned: set[int]) -> None:
        if isinstance(self._watched, ProjectionRunner) and self._watched is not runner:
            self._watched.on_commit = None
        if isinstance(runner, ProjectionRunner):
            runner.on_commit = self._touched
        self._watched, self._owned = runner, owned
        self._due.clear()
        self._heap.clear()
        with self._lock:
            self._changes.clear()
        after: str | None = None
        while owned:
            page = runner.store.scan("", after, PAGE)
            for task_id, state in page:
                self._index(task_id, state)
            if len(page) < PAGE:
                break
            after = page[-1][0]
        log.info("%s: reconciler index rebuilt: %d open task(s)", self.queue.name, len(self._due))

    def _index_changes(self, store: Any) -> None:
        with self._lock:
            keys, self._changes = self._changes, set()
        if keys:
            states = store.get_many(list(keys))
            for task_id in keys:
                self._index(task_id, states.get(task_id))

    def _index(self, task_id: str, state: dict[str, Any] | None) -> None:
        at = None if state is None else due_ms(self.queue, state)
        if at is None or not self._mine(task_id):
            self._due.pop(task_id, None)
            self._pending.pop(task_id, None)
            return
        self._schedule(task_id, at)

    def _schedule(self, task_id: str, at: int) -> None:
        if self._due.get(task_id) != at:
            self._due[task_id] = at
            heapq.heappush(self._heap, (at, task_id))
        if len(self._heap) > 4 * len(self._due) + 1000:  # stale entries: compact
            self._heap = [(t, k) for k, t in self._due.items()]
            heapq.heapify(self._heap)

    def _mine(self, task_id: str) -> bool:
        return murmur2_partition(task_id.encode(), self._partitions) in self._owned

    def _reconcile(self, task_id: str, state: dict[str, Any], now_ms: int, acks: Acks) -> None:
        step = next_step(self.queue, state, now_ms)
        attempts = int(state.get("attempts") or 0)
        if step is None:
            self._pending.pop(task_id, None)
            return
        seen = (str(state.get("status")), attempts)
        if self._pending.get(task_id) == seen:
            return  # what we wrote last time is not folded yet
        self._pending[task_id] = seen
        action, error = step
        if action == "dead":
            self._dead(task_id, state, error, acks)
        else:
            self._redrive(task_id, state, attempts + 1, acks)

    def _redrive(self, task_id: str, state: dict[str, Any], attempt: int, acks: Acks) -> None:
        q, p = self.queue, self._producer
        batch_id = f"{task_id}-attempt-{attempt}"
        work = {
            "task_id": task_id,
            "key": state.get("key") or task_id,
            "data": task_data_json(state),
            "attempt": attempt,
            "parent_id": state.get("parent_id"),
        }
        self._log.produce(
            p, q.work_topic, batch_id, WORK_ITEM, {"batch_id": batch_id, "tasks": [work]}, acks
        )
        event = status_data(task_id, "retrying", attempt=attempt, batch_id=batch_id)
        self._log.produce(p, q.status_topic, task_id, STATUS, event, acks)
        self.stats.redriven += 1
        log.info("%s: re-driving task %s (attempt %d)", q.name, task_id, attempt)

    def _dead(self, task_id: str, state: dict[str, Any], error: str, acks: Acks) -> None:
        q, p = self.queue, self._producer
        attempts = int(state.get("attempts") or 0)
        dead = status_data(
            task_id,
            "dead",
            attempt=attempts,
            error=error,
            key=state.get("key"),
            data=task_data_json(state),
            parent_id=state.get("parent_id"),
        )
        self._log.produce(p, q.dead_topic, task_id, STATUS, dead, acks)
        acks.wait(p, f"dead letter of task {task_id!r}")  # the dead letter first, durably
        self._log.produce(
            p,
            q.status_topic,
            task_id,
            STATUS,
            status_data(task_id, "dead", attempt=attempts, error=error),
            acks,
        )
        parent = state.get("parent_id")
        if parent:
            part = status_data(parent, "part-dead", part_id=task_id, error=error)
            self._log.produce(p, q.status_topic, parent, STATUS, part, acks)
        self.stats.dead += 1
        log.warning("%s: task %s is dead after %d attempt(s): %s", q.name, task_id, attempts, error)
