"""What a task submit answers, and when: `Accepted` (the 202's body), `Pending` (its records'
acknowledgements, or the error its claim ended with), `Remembered` (a submit this client
answered, for read-your-writes). Used by `refold.kafka.task_log.TaskClient`."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, Message
from refold.core.errors import TaskError


@dataclass(frozen=True, slots=True)
class Accepted:
    """The answer to a submit: the same for a repeat of the task id."""

    task_id: str
    queue: str
    status: str = "accepted"
    repeated: bool = False

    @property
    def status_url(self) -> str:
        return f"/tasks/{self.queue}/{self.task_id}"

    def to_json(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "status": self.status, "status_url": self.status_url}


@dataclass(slots=True)
class Remembered:
    """A submit this client answered: its `accepted` status event, where it landed (partition
    -1: not yet acknowledged, or another node appends it) and when, so a status read right
    after the 202 can wait for it or answer it (read-your-writes); and, while its records are
    in flight, their Pending (a repeat meanwhile is answered with it)."""

    event: dict[str, Any]
    topic: str
    partition: int
    offset: int
    at_ms: int
    pending: Pending | None = None


class Pending:
    """The acknowledgements one submit waits for (its intake record and its `accepted` status).

    Set from the producer's delivery callbacks, on the client's poll thread; `wait` blocks a
    thread, `on_done` calls back (on the poll thread) for callers with an event loop."""

    __slots__ = ("_callbacks", "_done", "_left", "_lock", "answer", "errors", "exc")

    def __init__(self, answer: Accepted, records: int) -> None:
        self.answer = answer
        self.errors: list[str] = []
        self.exc: TaskError | None = None  # the answer instead (TaskConflict: the id is taken)
        self._left = records
        self._done = records == 0
        self._callbacks: list[Callable[[Pending], None]] = []
        # A plain lock, not a Condition: one is made per submit (a Condition was a tenth of a
        # bulk submitter's CPU, py-spy); `wait` makes its own Event, only when it must wait.
        self._lock = threading.Lock()

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        """A delivery report of one of its records."""
        self.ack(None if err is None else f"{msg.topic()}: {err.str()}")

    def ack(self, error: str | None) -> None:
        with self._lock:
            if error is not None:
                self.errors.append(error)
            self._left -= 1
            if self._left > 0:
                return
            self._done = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)

    def fail(self, error: str, exc: TaskError | None = None) -> None:
        """Done now, with `error` (its records were never sent); `result` raises `exc`."""
        with self._lock:
            self.errors.append(error)
            self.exc = exc
            self._left = 0
            self._done = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)

    def on_done(self, callback: Callable[[Pending], None]) -> None:
        with self._lock:
            if not self._done:
                self._callbacks.append(callback)
                return
        callback(self)

    @property
    def done(self) -> bool:
        return self._done

    def result(self) -> Accepted:
        """The answer once acknowledged; TaskError if Kafka refused a record, or the error its
        claim ended with (TaskConflict: the id was claimed for another body)."""
        if self.exc is not None:
            raise self.exc
        if self.errors:
            raise TaskError(f"task {self.answer.task_id!r} not acknowledged: {self.errors}")
        return self.answer

    def wait(self, timeout: float = 30.0) -> Accepted:
        if not self._done:
            done = threading.Event()
            self.on_done(lambda _: done.set())
            if not done.wait(timeout):
                raise TaskError(f"task {self.answer.task_id!r} not acknowledged in {timeout:g} s")
        return self.result()


def follow(repeat: Pending, first: Pending) -> None:
    """End a repeat's Pending as its first submit's ended."""
    if first.exc is not None:
        repeat.fail("; ".join(first.errors), first.exc)
    else:
        repeat.ack("; ".join(first.errors) or None)
