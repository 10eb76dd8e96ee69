"""A task queue that misbehaves on request, for the hostile task tests; named by
REFOLD_TEST_QUEUE (unique per test).

The handler appends one JSON line per call to REFOLD_TEST_TASK_LOG (which tasks ran, at which
attempt). Task data steers it: `raise` names a BaseException to raise (`SystemExit`,
`KeyboardInterrupt`).
"""

from __future__ import annotations

import json
import os

from refold.tasks import Task, TaskQueue

__all__ = ["Hostile"]


class Hostile(TaskQueue):
    name = os.environ.get("REFOLD_TEST_QUEUE", "hostile")
    merge_window_ms = 50
    max_attempts = 2
    timeout_s = float(os.environ.get("REFOLD_TEST_TIMEOUT_S", "8"))
    queued_timeout_s = 40.0
    retry_backoff_s = 0.2

    def handle(self, batch: list[Task]) -> dict:
        path = os.environ.get("REFOLD_TEST_TASK_LOG")
        if path:
            with open(path, "a") as log:
                log.write(json.dumps({"tasks": [[t.id, t.attempt] for t in batch]}) + "\n")
        data = batch[0].data
        if data.get("raise") == "SystemExit":
            raise SystemExit(3)
        if data.get("raise") == "KeyboardInterrupt":
            raise KeyboardInterrupt
        return {"handled": len(batch)}
