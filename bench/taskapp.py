"""The task queue of the task benchmark, for `refold worker` and `refold task-worker`
subprocesses: a no-op handler, named and windowed by the bench (BENCH_TASK_QUEUE,
BENCH_TASK_WINDOW_MS, BENCH_TASK_MERGE_MAX)."""

from __future__ import annotations

import os

from refold.tasks import Task, TaskQueue

__all__ = ["NoOp"]


class NoOp(TaskQueue):
    name = os.environ.get("BENCH_TASK_QUEUE", "bench-noop")
    merge_key = "product_id"
    merge_window_ms = int(os.environ.get("BENCH_TASK_WINDOW_MS", "50"))
    merge_max = int(os.environ.get("BENCH_TASK_MERGE_MAX", "100"))
    max_attempts = 3
    timeout_s = 60
    queued_timeout_s = 600

    def handle(self, batch: list[Task]) -> dict[str, int] | None:
        return None
