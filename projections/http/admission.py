"""Admission of `POST /commands/{aggregate}`: under overload a command is refused at once with
429 and `Retry-After`, instead of joining a backlog that makes every answer seconds late.

The backlog is what this worker is appending or has appended and has no result for yet (the
commands in flight); the drain rate is the most results that came back in one second over the
last `PEAK_WINDOW_S`: what this worker has shown it can decide. A command is refused when the
backlog would take longer than `REFOLD_COMMAND_MAX_QUEUE_S` (default 0.25 s) to drain at that
rate, and never while it is below `MIN_BACKLOG` (a cold start has no rate yet). The peak, not
the current rate: under overload the current rate is what was admitted, so a bound on it
refuses more and more of what the worker could decide (seen: 87% refused at 3,000/s offered,
380/s admitted where 1,300/s were decided unrefused). `Retry-After` is the backlog's drain
time, 1 to `MAX_RETRY_AFTER_S` seconds. An entry whose result has not come back after
`FORGET_S` is dropped, so a lost result cannot close the door for good. The query server's
event loop admits; a result closes its entry on the results index's own thread, under the
backlog's lock, without waking the loop (one cross-thread wake-up per command less).

The drain rate says what the processor can decide, not what the event loop can take in: under
overload the loop itself falls behind (appends, answers, refusals, the GIL shared with the
processor), and a request then waits unread in its socket, a refusal as long as an admission
(seen: 429s answered in 150-850 ms at 3,000/s offered, though refused at once when read). So a
command is also refused while the loop runs late (`LoopLag`: a timer's lateness, smoothed over
about 50 ms) by more than `REFOLD_COMMAND_MAX_LAG_S` (default 0.04 s) with at least
`LAG_MIN_BACKLOG` in flight: refusing costs the loop a fraction of admitting, so it catches up
and what arrives next is answered, 429 or not, within about that lag. A lone pause (a
collection, a long batch) does not refuse anything: it moves the smoothed lag by a fifth.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable

MAX_QUEUE_S = float(os.environ.get("REFOLD_COMMAND_MAX_QUEUE_S", "0.25"))
MIN_BACKLOG = 256
MAX_LAG_S = float(os.environ.get("REFOLD_COMMAND_MAX_LAG_S", "0.04"))
LAG_MIN_BACKLOG = 64
LAG_TICK_S = 0.01
LAG_WEIGHT = 0.2  # of each new lateness in the smoothed lag
#: The longest `Retry-After` given. The drain rate right after a cold start or a stall is tiny
#: (a few results in the window), so backlog / rate alone asked a burst's callers to come back
#: minutes later (seen in bench.commands: 300 open at ~2/s -> "Retry-After: 150").
MAX_RETRY_AFTER_S = 5.0
PEAK_WINDOW_S = 10  # seconds of per-second result counts kept for the peak
FORGET_S = 60.0


class LoopLag:
    """How late an event loop runs what is ready: a timer every `LAG_TICK_S` notes how long
    after its due time it ran (the wait of anything that became ready with it, a request on a
    socket included); `lag_s` is that lateness smoothed (exponentially, `LAG_WEIGHT`)."""

    def __init__(self) -> None:
        self.lag_s = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._due = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> LoopLag:
        """Start sampling `loop` (call on its thread)."""
        self._loop = loop
        self._due = loop.time() + LAG_TICK_S
        self._handle = loop.call_at(self._due, self._tick)
        return self

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()

    def _tick(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        self.lag_s += LAG_WEIGHT * (max(0.0, now - self._due) - self.lag_s)
        self._due = now + LAG_TICK_S
        self._handle = loop.call_at(self._due, self._tick)


class Backlog:
    """One aggregate's commands in flight through this worker (thread-safe)."""

    def __init__(
        self,
        max_queue_s: float = MAX_QUEUE_S,
        min_backlog: int = MIN_BACKLOG,
        lag: LoopLag | None = None,
        max_lag_s: float = MAX_LAG_S,
    ) -> None:
        self.max_queue_s = max_queue_s
        self.min_backlog = min_backlog
        self.lag = lag
        self.max_lag_s = max_lag_s
        #: refusals because the loop ran late (of `refused`)
        self.refused_late = 0
        self._open: dict[str, tuple[float, Callable[[], None]]] = {}
        self._done: deque[list[int]] = deque()  # [second, results in it], over the peak window
        self._lock = threading.Lock()
        self.refused = 0

    def __len__(self) -> int:
        return len(self._open)

    def rate(self, now: float) -> float:
        """The most results that came back in one second over the last `PEAK_WINDOW_S`."""
        with self._lock:
            return self._rate(now)

    def _rate(self, now: float) -> float:
        done = self._done
        while done and done[0][0] <= now - PEAK_WINDOW_S:
            done.popleft()
        return float(max((n for _, n in done), default=0))

    def refuse(self, now: float | None = None) -> float | None:
        """None: admit. Else the seconds the caller should wait before trying again."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._forget(now)
            backlog = len(self._open)
            rate = self._rate(now) if backlog >= self.min_backlog else 0.0
        lag = self.lag
        if lag is not None and lag.lag_s > self.max_lag_s and backlog >= LAG_MIN_BACKLOG:
            self.refused += 1
            self.refused_late += 1
            return 1.0
        if backlog < self.min_backlog:
            return None
        if rate > 0 and backlog / rate <= self.max_queue_s:
            return None
        self.refused += 1
        if rate <= 0:
            return 1.0
        return min(MAX_RETRY_AFTER_S, max(1.0, math.ceil(backlog / rate)))

    def opened(self, command_id: str, cancel: Callable[[], None]) -> None:
        with self._lock:
            self._open.setdefault(command_id, (time.monotonic(), cancel))

    def closed(self, command_id: str, now: float | None = None) -> None:
        second = int(time.monotonic() if now is None else now)
        with self._lock:
            if self._open.pop(command_id, None) is None:
                return
            done = self._done
            if done and done[-1][0] == second:
                done[-1][1] += 1
            else:
                done.append([second, 1])

    def dropped(self, command_id: str) -> None:
        """`command_id` was not appended after all: no longer in flight, no result to count."""
        with self._lock:
            entry = self._open.pop(command_id, None)
        if entry is not None:
            entry[1]()

    def watch(self, command_id: str, watch: Watch) -> None:
        """Count `command_id` in flight until the results index has its result (which may
        come at once, on this thread, or later on the index's thread)."""
        with self._lock:
            if command_id in self._open:
                return
            self._open[command_id] = (time.monotonic(), _nothing)
        cancel = watch(command_id, lambda _result: self.closed(command_id))
        with self._lock:
            entry = self._open.get(command_id)
            if entry is not None:
                self._open[command_id] = (entry[0], cancel)

    def _forget(self, now: float) -> None:
        if not self._open:
            return
        oldest_at = next(iter(self._open.values()))[0]
        if now - oldest_at <= FORGET_S:
            return
        for command_id, (at, cancel) in list(self._open.items()):
            if now - at <= FORGET_S:
                break  # insertion order is time order
            del self._open[command_id]
            cancel()


Watch = Callable[[str, Callable[[dict], None]], Callable[[], None]]


def _nothing() -> None:
    """The cancel of a watch not yet made."""
