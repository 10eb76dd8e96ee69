"""A task queue for the task tests, named by REFOLD_TEST_QUEUE (unique per test).

The handler appends one JSON line per call to REFOLD_TEST_TASK_LOG (its side-effect log, the
tests' oracle of what ran): the process, and each task's id, attempt and merge key. Task data
steers it: `fail` raises Retry every time, `hang_once` sleeps past the timeout on attempt 1,
`qty` over 10 is split into parts of at most 10, `until_cancelled` runs until
`task.cancelled()` says so (and logs that it was told), `progress: n` takes n steps of `step_s`
reporting `task.progress(i, n, "step i")` after each, `own_result` sets the task's own result.
"""

from __future__ import annotations

import json
import os
import time

from refold.tasks import Retry, Task, TaskQueue

__all__ = ["Shipping"]


def _write(path: str | None, line: dict) -> None:
    if path:
        with open(path, "a") as log:
            log.write(json.dumps(line) + "\n")


class Shipping(TaskQueue):
    name = os.environ.get("REFOLD_TEST_QUEUE", "shipping")
    merge_key = "product_id"
    merge_window_ms = 200
    merge_max = 5
    max_attempts = 3
    timeout_s = float(os.environ.get("REFOLD_TEST_TIMEOUT_S", "8"))
    retry_backoff_s = 0.2

    def split(self, data: dict) -> list[dict] | None:
        qty = int(data.get("qty", 0))
        if qty <= 10:
            return None
        return [{**data, "qty": min(10, qty - start)} for start in range(0, qty, 10)]

    def handle(self, batch: list[Task]) -> dict:
        line = {
            "pid": os.getpid(),
            "at": time.time(),
            "tasks": [[t.id, t.attempt, t.data.get("product_id"), t.parent_id] for t in batch],
        }
        path = os.environ.get("REFOLD_TEST_TASK_LOG")
        _write(path, line)
        for t in batch:
            if t.data.get("until_cancelled"):  # a long task that stops when told
                deadline = time.monotonic() + 30
                while not t.cancelled() and time.monotonic() < deadline:
                    time.sleep(0.1)
                _write(path, {"told": t.id, "cancelled": t.cancelled()})
        for t in batch:
            for step in range(1, int(t.data.get("progress", 0)) + 1):
                time.sleep(float(t.data.get("step_s", 1.0)))
                t.progress(step, t.data["progress"], f"step {step}")
            if t.data.get("own_result"):
                t.result = {"task_id": t.id}
        if any(t.data.get("fail") for t in batch):
            raise Retry("this task always fails")
        if any(t.data.get("hang_once") and t.attempt == 1 for t in batch):
            time.sleep(self.timeout_s + 4)
        return {"handled": len(batch)}
