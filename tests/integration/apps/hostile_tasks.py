"""A task queue that misbehaves on request, for the hostile task tests; named by
REFOLD_TEST_QUEUE (unique per test).

The handler appends one JSON line per call to REFOLD_TEST_TASK_LOG (which tasks ran, at which
attempt). Task data steers it: `raise` names a BaseException to raise (`SystemExit`,
`KeyboardInterrupt`); `result` a result it returns that cannot be written (`circular`: a dict
that holds itself, `tuple-key`, `nan`, `huge`: 2 MB of JSON); `own_result` the same, as each task's
`task.result`. `split` makes `split()` answer a dict instead of a list of them (`"nan"`:
a list whose second part holds a NaN). Tasks with one `group` merge.
"""

from __future__ import annotations

import json
import os
from typing import Any

from refold.tasks import Task, TaskQueue

__all__ = ["Hostile"]


def _unwritable(kind: str) -> Any:
    if kind == "circular":
        loop: dict[str, Any] = {}
        loop["self"] = loop
        return loop
    if kind == "tuple-key":
        return {(1, 2): "a key that is not a string"}
    if kind == "nan":
        return {"ratio": float("nan")}
    if kind == "huge":
        return {"blob": "x" * (2 * 1024 * 1024)}
    return {"kind": kind}


class Hostile(TaskQueue):
    name = os.environ.get("REFOLD_TEST_QUEUE", "hostile")
    merge_key = "group"
    merge_window_ms = 50
    max_attempts = 2
    timeout_s = float(os.environ.get("REFOLD_TEST_TIMEOUT_S", "8"))
    queued_timeout_s = 40.0
    retry_backoff_s = 0.2

    def split(self, data: dict[str, Any]) -> Any:
        if data.get("split") == "nan":
            return [{"part": 1}, {"part": 2, "ratio": float("nan")}]
        return {"not": "a list"} if data.get("split") else None

    def handle(self, batch: list[Task]) -> Any:
        path = os.environ.get("REFOLD_TEST_TASK_LOG")
        if path:
            with open(path, "a") as log:
                log.write(json.dumps({"tasks": [[t.id, t.attempt] for t in batch]}) + "\n")
        data = batch[0].data
        if data.get("raise") == "SystemExit":
            raise SystemExit(3)
        if data.get("raise") == "KeyboardInterrupt":
            raise KeyboardInterrupt
        if data.get("own_result"):
            for task in batch:
                task.result = _unwritable(data["own_result"])
            return None
        if data.get("result"):
            return _unwritable(data["result"])
        return {"handled": len(batch)}
