"""The Celery peer of the task benchmark: one no-op task, Redis as broker and result backend
(BENCH_REDIS_URL), configured for throughput as Celery's docs advise for many short tasks.

What is set, and why (bench/RESULTS.md repeats it):
- `worker_prefetch_multiplier` 64: short tasks, so each worker reserves many at once (the docs'
  advice for short tasks; the default 4 round-trips to Redis far more often);
- `task_acks_late` False (the default): a task is acknowledged when a worker reserves it, the
  fastest mode (acks_late=True would be closer to refold's ack-after-status, and slower);
- results stored in Redis (`task_ignore_result` False): success must be observable per task,
  and the result backend is how a Celery client observes it; `result_expires` one hour; the
  bench sends through `sender`, an app without the backend, so that apply_async does not
  subscribe to each result's channel (it polls the results instead, as a batch client would);
- no task events, no gossip/mingle/heartbeat (`--without-*`), no rate limits;
- pool: solo processes or prefork (the bench runs both and keeps the faster as the peer).
"""

from __future__ import annotations

import os

from celery import Celery

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

app = Celery("bench_tasks", broker=URL, backend=URL)
app.conf.update(
    worker_prefetch_multiplier=int(os.environ.get("BENCH_CELERY_PREFETCH", "64")),
    task_acks_late=False,
    task_ignore_result=False,
    result_expires=3600,
    worker_send_task_events=False,
    task_send_sent_event=False,
    worker_disable_rate_limits=True,
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_hijack_root_logger=False,
)


#: What the bench sends with: the same broker, no result backend. A client app with the Redis
#: backend subscribes to every task's result channel in apply_async (a round trip per task,
#: measured: 89-133 submits/s); the workers still store every result (`app` above has the
#: backend and the task does not ignore results), which is what the bench reads.
sender = Celery("bench_tasks_sender", broker=URL)
sender.conf.update(task_serializer="json", broker_connection_retry_on_startup=True)


@app.task(name="bench.noop")
def noop(product_id: str) -> None:
    return None
