"""A stop event for retry-policy tests: its waits return at once and are recorded."""

from __future__ import annotations

import threading


class RecordedStop(threading.Event):
    """A stop event whose waits return at once, recording how long they would have been."""

    def __init__(self) -> None:
        super().__init__()
        self.pauses: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.pauses.append(timeout or 0.0)
        return self.is_set()
