"""Admission of `POST /commands/{aggregate}`: under overload a command is refused at once with
429 and `Retry-After`, instead of joining a backlog that makes every answer seconds late.

The backlog is what this worker appended and has no result for yet; the drain rate is how many
of its results came back over the last seconds. A command is refused when the backlog would
take longer than `REFOLD_COMMAND_MAX_QUEUE_S` (default 1 s) to drain at that rate, and never
while the backlog is below `MIN_BACKLOG` (a cold start has no rate yet); `Retry-After` is the
backlog's drain time, 1 to `MAX_RETRY_AFTER_S` seconds. An entry whose result
has not come back after `FORGET_S` is dropped, so a lost result cannot close the door for good.
All of it runs on the query server's event loop; results arrive through the results index's
watch callbacks, handed to the loop.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections import deque
from collections.abc import Callable

MAX_QUEUE_S = float(os.environ.get("REFOLD_COMMAND_MAX_QUEUE_S", "1.0"))
MIN_BACKLOG = 256
#: The longest `Retry-After` given. The drain rate right after a cold start or a stall is tiny
#: (a few results in the window), so backlog / rate alone asked a burst's callers to come back
#: minutes later (seen in bench.commands: 300 open at ~2/s -> "Retry-After: 150").
MAX_RETRY_AFTER_S = 5.0
RATE_WINDOW_S = 3.0
FORGET_S = 60.0


class Backlog:
    """One aggregate's commands in flight through this worker (event-loop thread only)."""

    def __init__(self, max_queue_s: float = MAX_QUEUE_S, min_backlog: int = MIN_BACKLOG) -> None:
        self.max_queue_s = max_queue_s
        self.min_backlog = min_backlog
        self._open: dict[str, tuple[float, Callable[[], None]]] = {}
        self._done: deque[float] = deque()  # when results came back, over the rate window
        self.refused = 0

    def __len__(self) -> int:
        return len(self._open)

    def rate(self, now: float) -> float:
        """Results per second over the last `RATE_WINDOW_S`."""
        while self._done and now - self._done[0] > RATE_WINDOW_S:
            self._done.popleft()
        return len(self._done) / RATE_WINDOW_S

    def refuse(self, now: float | None = None) -> float | None:
        """None: admit. Else the seconds the caller should wait before trying again."""
        now = time.monotonic() if now is None else now
        self._forget(now)
        backlog = len(self._open)
        if backlog < self.min_backlog:
            return None
        rate = self.rate(now)
        if rate > 0 and backlog / rate <= self.max_queue_s:
            return None
        self.refused += 1
        if rate <= 0:
            return 1.0
        return min(MAX_RETRY_AFTER_S, max(1.0, math.ceil(backlog / rate)))

    def opened(self, command_id: str, cancel: Callable[[], None]) -> None:
        self._open.setdefault(command_id, (time.monotonic(), cancel))

    def closed(self, command_id: str) -> None:
        entry = self._open.pop(command_id, None)
        if entry is not None:
            self._done.append(time.monotonic())

    def watch(self, loop: asyncio.AbstractEventLoop, command_id: str, watch: Watch) -> None:
        """Count `command_id` in flight until the results index has its result."""
        if command_id in self._open:
            return

        def done(_result: dict) -> None:  # on the results index's thread, or here at once
            loop.call_soon_threadsafe(self.closed, command_id)

        self.opened(command_id, watch(command_id, done))

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
