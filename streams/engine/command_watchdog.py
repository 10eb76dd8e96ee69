"""A decision that never returns must not block its command partition.

A decider's `decide` (or `initial`, or its fold) that loops or waits forever for one command
held the processor's thread in it: nothing of that partition was decided again, and nothing
said why. Python cannot stop a thread, so the command processor decides each batch in a thread
of its own (`DecideThread`) and waits for it, watching the command being decided
(`refold.engine.decisions.Progress`). One command decided for longer than
REFOLD_DECIDE_TIMEOUT_S (`Config.decide_timeout_s`, 30 s by default; keep it below half the
command consumer's max.poll.interval.ms) is given up (`DecideHung`):

1. the thread is abandoned, left in the call it cannot be taken out of; it holds no Kafka
   client and no store, only copies of states, so nothing it does later is ever committed
   (the batch it was deciding is dropped; it stops at the next command if the call returns);
2. the processor logs where the call is stuck (its stack), counts it (`decide_timeouts`, and
   the threads still stuck: /healthz `stuck_decisions`, /metrics), rewinds to the last
   committed batch and decides it again in a new thread, with that command rejected
   ("decide did not return within N s"): the others are decided once, the partition goes on.

The rejection is kept in memory until committed: a worker killed before that decides the
command again after its restart, and gives it up again after the same time. A restart also
frees a stuck thread (once the command's rejection is committed it is never decided again).
A call that holds the GIL forever (C code that never releases it) stops the whole process; no
thread can watch that.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Generic, TypeVar

from refold.engine.decisions import CommandRecord, Progress

log = logging.getLogger("refold.engine.command_processor")

T = TypeVar("T")


class DecideHung(Exception):
    """One command's decision ran past the timeout: the command, and where the call is."""

    def __init__(self, record: CommandRecord, timeout_s: float, stack: str) -> None:
        super().__init__(f"decide did not return within {timeout_s:g} s")
        self.record = record
        self.timeout_s = timeout_s
        self.stack = stack

    @property
    def reason(self) -> str:
        """What the command's result says."""
        return (
            f"decide did not return within {self.timeout_s:g} s (REFOLD_DECIDE_TIMEOUT_S); "
            "the command processor gave it up"
        )


class _Job(Generic[T]):
    def __init__(self, call: Callable[[], T]) -> None:
        self.call = call
        self.done = threading.Event()
        self.value: T | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.value = self.call()
        except BaseException as exc:  # re-raised in the waiting thread
            self.error = exc
        self.done.set()


class DecideThread:
    """A daemon thread that runs one batch's decision at a time (`run`), watched: the caller
    gets `DecideHung` when one command takes longer than `timeout_s`, and then needs a new
    `DecideThread` (this one is abandoned). Daemon: a stuck thread does not hold the process
    at exit."""

    def __init__(self, name: str, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.progress = Progress()
        self._jobs: queue.SimpleQueue[_Job[object] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            job.run()
            if self.progress.cancelled:  # abandoned while in this job: nobody waits for more
                return

    def run(self, decide: Callable[[Progress], T]) -> T:
        """`decide(progress)` in this thread; its result, or its exception re-raised here."""
        job: _Job[T] = _Job(lambda: decide(self.progress))
        self._jobs.put(job)  # type: ignore[arg-type]
        while not job.done.wait(self._until_due()):
            current = self.progress.current
            if current is not None and time.monotonic() - current[1] >= self.timeout_s:
                self.progress.cancelled = True
                raise DecideHung(current[0], self.timeout_s, self.stack())
        if job.error is not None:
            raise job.error
        return job.value  # type: ignore[return-value]

    def _until_due(self) -> float:
        """How long to wait before looking again: until the current command is due."""
        current = self.progress.current
        if current is None:
            return min(self.timeout_s, 1.0)
        return max(0.01, current[1] + self.timeout_s - time.monotonic())

    def stack(self) -> str:
        """Where the thread is now (for the log)."""
        frame = sys._current_frames().get(self._thread.ident or -1)
        return "".join(traceback.format_stack(frame)) if frame is not None else "(returned)"

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        """Let the thread end once it is idle (a stuck one ends if its call ever returns)."""
        self.progress.cancelled = True
        self._jobs.put(None)
