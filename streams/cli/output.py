"""What the CLI's commands share: one JSON line per answer, and `--wait` for a task or saga to
end."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Collection
from typing import Any


def out(obj: object) -> None:
    """One JSON line on stdout."""
    sys.stdout.write(json.dumps(obj, separators=(", ", ": ")) + "\n")


def wait_ended(
    read: Callable[[], dict[str, Any] | None],
    terminal: Collection[str],
    timeout: float,
    every_s: float = 0.3,
) -> tuple[dict[str, Any] | None, bool]:
    """Read a status until its `status` is one of `terminal` or `timeout` passed: (the last
    state read, whether it ended)."""
    deadline = time.monotonic() + timeout
    while True:
        state = read()
        if state is not None and state["status"] in terminal:
            return state, True
        if time.monotonic() > deadline:
            return state, False
        time.sleep(every_s)
