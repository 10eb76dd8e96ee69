"""The reconciler of one task queue: re-drives tasks whose status never came back, with backoff,
up to `max_attempts`; then the task is dead and goes to the queue's dead-letter topic.

It runs inside `refold worker` beside the queue's status projection and reads that projection's
store (the fold of the status topic), every `interval_s`. Only tasks in the status partitions
this worker owns are its business, so two workers never both re-drive a task. The decision
itself is pure (`refold.core.task_status.next_step`). What a re-drive writes: a work item with
the task alone at attempt n+1, then a `retrying` status event. A crash between the two is healed
by the next sweep (the status is still the old one, so the task is re-driven again: handlers are
idempotent). The sweep remembers the attempts it re-drove until the fold shows them, so a task
is not re-driven twice in a row while its `retrying` event is being folded.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from refold.core.config import Config
from refold.core.serde import Codec
from refold.core.task_status import next_step
from refold.core.tasks import STATUS, WORK_ITEM, TaskQueue
from refold.engine.frozen import Serving
from refold.engine.timetravel import murmur2_partition
from refold.kafka import clients
from refold.kafka.task_log import Acks, TaskLog, status_data

log = logging.getLogger(__name__)

PAGE = 1000


@dataclass(slots=True)
class ReconcilerStats:
    state: str = "starting"
    error: str | None = None
    redriven: int = 0
    dead: int = 0
    sweeps: int = 0


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
        runner = self._runner()
        owned = {p for topic, p in runner.stats.assigned if topic == self.queue.status_topic}
        if not owned:
            return
        after: str | None = None
        acks = Acks()
        while True:
            page = runner.store.scan("", after, PAGE)
            for task_id, state in page:
                if murmur2_partition(task_id.encode(), self._partitions) in owned:
                    self._reconcile(task_id, state, now_ms, acks)
            if len(page) < PAGE:
                break
            after = page[-1][0]
        acks.wait(self._producer, f"reconciliation of queue {self.queue.name!r}")
        self.stats.sweeps += 1

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
            "data": _json(state.get("data")),
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
            data=_json(state.get("data")),
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


def _json(value: Any) -> str:
    return json.dumps(value if value is not None else {})
