"""`refold task-worker`: pull work items of one queue through a Kafka share group (KIP-932)
and run the queue's handler on them, reporting every status.

`consumers` share consumers per process (2 by default), in the group `<app id>.tasks.<queue>.work`,
whose configs refold sets through the admin client (earliest, read_committed, record lock,
delivery limit). The records of a poll run on one pool of `concurrency` handler threads shared
by the consumers, and each is acknowledged (by its consumer's thread: the client is not
thread-safe) as soon as its handler and statuses are done; a consumer's next poll waits until
every record of its last one is acknowledged (explicit mode), and meanwhile the other consumer
polls: with one, a work item committed during that wait sat until it ended (POST -> `running`
p99 116-223 ms at 800 tasks/s against 93-101 ms with two, four alternating pairs). Why a shared
pool, not a consumer per handler thread: a share fetch acquires a whole batch of records for its
consumer (`max.poll.records` did not limit it, measured), so with a consumer per thread, the
records fetched with a slow handler's item waited behind it, past `timeout_s`, and the
reconciler re-drove them. Per work item, in order:

1. catch the queue's cancels up to their end (once for the items of a poll, after the poll
   returned them): a task cancelled before the poll that took it never runs;
2. `running` for each task (not awaited), then `handle(batch)`;
3. `succeeded` (with the result: the task's own `task.result`, else the batch's return value)
   or `failed` (with the error and attempt) for each task, `cancelled` instead for a task whose
   handler was told it is cancelled, and for a part the `part-succeeded` event its parent
   folds; wait until Kafka acknowledged them (a handler's `task.progress(...)` reports go out
   as `progress` events while it runs);
4. ACCEPT the work item. Retries are the reconciler's (with backoff, counted in the status log),
   so a failed attempt is accepted too, once its `failed` status is durable.

RELEASE hands an item back at once: when its statuses could not be written, or when the worker
stops with it in hand. REJECT is for an item that is not a work item (poison). A worker killed
between 3 and 4 leaves its item locked until the record lock expires; the broker then hands it
to another worker, which runs it again: the first `succeeded` counts, handlers are idempotent.
Share-group acknowledgements are not transactional; the reconciler closes that gap.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    AcknowledgeType,
    KafkaError,
    KafkaException,
    Message,
    ShareConsumer,
    TopicPartition,
)
from refold.core.config import Config
from refold.core.errors import DecodeError, TaskError
from refold.core.serde import Codec
from refold.core.tasks import STATUS, WORK_ITEM, Task, TaskQueue
from refold.kafka import clients
from refold.kafka.task_log import (
    Acks,
    TaskLog,
    configure_share_group,
    status_data,
    work_group,
)
from refold.kafka.topics import Topics

log = logging.getLogger(__name__)

#: The longest pause before a failed share consumer is replaced (they double from 1 s).
RESTART_MAX_S = 30.0


@dataclass(slots=True)
class TaskWorkerStats:
    items: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    released: int = 0
    rejected: int = 0
    restarts: int = 0  # share consumers replaced after they failed


@dataclass(slots=True)
class Handled:
    """A batch whose handler ran: its statuses are produced, their acknowledgements pending."""

    batch_id: str
    acks: Acks
    ended: Counter[str]


class Cancels:
    """The ids in a queue's cancel topic, read to its end on demand (shared by the threads).

    The partitions stay paused between catch-ups: a consumer fetching an idle partition holds a
    long-poll fetch on the connection, and the end-offsets query then waits behind it (0.5 s,
    `fetch.wait.max.ms`, measured per work item before this)."""

    def __init__(self, config: Config, queue: TaskQueue) -> None:
        self._topic = queue.cancel_topic
        self._consumer = clients.consumer(config, config.group("tasks", queue.name, "cancels"))
        self._lock = threading.Lock()
        self.ids: set[str] = set()
        self._next: dict[int, int] = {}
        self._started = -1.0  # when the last catch-up began (monotonic)

    def catch_up(self, since: float | None = None) -> None:
        """Read the cancels to their end. With `since` (a time.monotonic()), a catch-up that
        started at or after it is enough: the items of one poll share one catch-up instead of
        each paying its end-offsets round trip (measured: most of a no-op item's time)."""
        with self._lock:
            if since is not None and self._started >= since:
                return
            self._started = time.monotonic()
            if not self._next:
                md = self._consumer.list_topics(self._topic, timeout=10).topics[self._topic]
                parts = [TopicPartition(self._topic, p, OFFSET_BEGINNING) for p in md.partitions]
                self._consumer.assign(parts)
                self._consumer.pause(parts)
                self._next = {p: 0 for p in md.partitions}
            # Every partition's end in one ListOffsets request (timestamp -1: the latest
            # offset; the last stable one, read_committed): a watermark query per partition
            # was a round trip each, in a row, while the poll's other items waited on the lock
            # (6 partitions: 1.0-18.8 ms against 0.15-3.4 ms for one request, measured).
            asked = [TopicPartition(self._topic, p, OFFSET_END) for p in self._next]
            for end in self._consumer.offsets_for_times(asked, timeout=10):
                if end.error is not None:
                    raise KafkaException(end.error)
                if self._next[end.partition] < end.offset:
                    self._read(TopicPartition(self._topic, end.partition), end.offset)

    def _read(self, tp: TopicPartition, high: int) -> None:
        self._consumer.resume([tp])
        try:
            while self._next[tp.partition] < high:
                msg = self._consumer.poll(1.0)
                if msg is None or msg.error() is not None:
                    continue
                self._next[msg.partition()] = msg.offset() + 1
                if msg.key():
                    self.ids.add(msg.key().decode())
        finally:
            self._consumer.pause([tp])

    def __contains__(self, task_id: object) -> bool:
        return task_id in self.ids

    def check(self, task_id: str) -> bool:
        """Whether `task_id` is cancelled now (what `Task.cancelled()` asks while it runs)."""
        self.catch_up()
        return task_id in self.ids

    def close(self) -> None:
        self._consumer.close()


class TaskWorker:
    """Runs a queue's handler on work items pulled through its share group."""

    def __init__(
        self,
        config: Config,
        codec: Codec,
        queue: TaskQueue,
        *,
        concurrency: int = 1,
        consumers: int = 2,
    ) -> None:
        if concurrency < 1:
            raise TaskError(f"--concurrency must be at least 1, not {concurrency}")
        if consumers < 1:
            raise TaskError(f"--consumers must be at least 1, not {consumers}")
        self.config = config
        self.queue = queue
        self.concurrency = concurrency
        self.consumers = consumers
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix=f"task-{queue.name}")
        self.stats = TaskWorkerStats()
        self._log = TaskLog(config, codec, source=f"refold://task-worker/{queue.name}")
        self._codec = codec
        self._producer = clients.producer(config, defaults={"linger.ms": 1})
        self._cancels = Cancels(config, queue)
        self._stop = threading.Event()
        self._stats_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.group = work_group(config, queue)

    def start(self) -> None:
        self._check_topics()
        configure_share_group(self.config, self.group)
        self._log.register(self._producer)
        self._cancels.catch_up()
        loops = [(self._loop, f"task-worker-{i}") for i in range(self.consumers)]
        for target, name in (*loops, (self._poll, "task-worker-acks")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            self._threads.append(thread)
            thread.start()

    def _check_topics(self) -> None:
        """TaskError naming the topics a worker needs that do not exist. Without this check
        the schema registration waited 30 s, then the cancel reader failed with librdkafka's
        "Invalid argument or configuration" and a hint to check that the broker runs."""
        topics = Topics(self.config)
        topics.broker_count()  # unreachable: the CLI says so, with its own hint
        q = self.queue
        wanted = (self.config.schemas_topic, q.work_topic, q.status_topic, q.cancel_topic)
        missing = [topic for topic in wanted if not topics.exists(topic)]
        if missing:
            raise TaskError(
                f"task queue {q.name!r}: topic(s) {', '.join(missing)} do not exist",
                hint="run `refold topics ensure` with this app (REFOLD_APP), or start its "
                "`refold worker`, which creates them",
            )

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._producer.flush(10)
        self._cancels.close()

    def _loop(self) -> None:
        """One share consumer's rounds, until stopped. A consumer that failed is closed and
        replaced after a pause (1 s, doubling to RESTART_MAX_S while they keep failing): a task
        worker whose consumers had all failed ran on idle, and its queue's tasks went dead as
        "no status" on the reconciler's timeouts. Items the failed consumer held are released
        when their record lock ends, and delivered again (handlers are idempotent)."""
        pause = 1.0
        while not self._stop.is_set():
            consumer = clients.share_consumer(self.config, self.group)
            try:
                self._consume(consumer)
                return
            except Exception:
                with self._stats_lock:
                    self.stats.restarts += 1
                log.exception(
                    "task worker of %s: a share consumer failed; a new one in %.0f s",
                    self.queue.name,
                    pause,
                )
            finally:
                _close(consumer)
            self._stop.wait(pause)
            pause = min(pause * 2, RESTART_MAX_S)

    def _consume(self, consumer: ShareConsumer) -> None:
        """Poll, hand each item to the handler pool, acknowledge in order; until stopped."""
        pool = self._pool
        consumer.subscribe([self.queue.work_topic])
        while not self._stop.is_set():
            msgs = [m for m in consumer.poll(0.5) if _ok(m)]
            polled = time.monotonic()
            futures = [pool.submit(self._run_safely, msg, polled) for msg in msgs]
            # Acknowledged in offset order: the preview client loses acknowledgements given
            # out of order (a bare loop that ACCEPTs each poll's records shuffled had 1,492
            # of 3,000 records delivered again when their lock expired; in order, none), so
            # each round acknowledges the finished prefix of the poll. The handler threads
            # do not wait for their statuses' acknowledgements: this thread does, in order,
            # so the items of a poll share their round trips (one wait per item on each of
            # `concurrency` threads held a no-op queue to concurrency / round trip).
            acked = 0
            while acked < len(futures):
                wait([futures[acked]])  # the oldest unacknowledged item
                while acked < len(futures) and futures[acked].done():
                    verdict = self._settle(futures[acked].result())
                    consumer.acknowledge(msgs[acked], verdict)
                    acked += 1
                consumer.commit_async()

    def _poll(self) -> None:
        """Serve the producer's delivery reports (the statuses' acknowledgements), until the
        loops that wait for them have ended."""
        loops = self._threads[: self.consumers]
        while not self._stop.is_set() or any(loop.is_alive() for loop in loops):
            self._producer.poll(0.05)

    def _settle(self, outcome: int | Handled) -> int:
        """The acknowledgement of an item: its handler's verdict, or ACCEPT once the statuses
        of its batch are acknowledged by Kafka (RELEASE when they could not be written)."""
        if not isinstance(outcome, Handled):
            return outcome
        try:
            outcome.acks.wait_served(f"status of batch {outcome.batch_id}")
        except TaskError as exc:
            log.warning("%s: releasing %s: %s", self.queue.name, outcome.batch_id, exc)
            self._count("released")
            return AcknowledgeType.RELEASE
        for status, n in outcome.ended.items():
            self._count(status, n)
        self._count("items")
        return AcknowledgeType.ACCEPT

    def _run_safely(self, msg: Message, polled: float) -> int | Handled:
        try:
            return self._run(msg, polled)
        except Exception:  # a bug of ours must not stop the worker: another may succeed
            log.exception("%s: releasing %s@%d", self.queue.name, msg.topic(), msg.offset())
            self._count("released")
            return AcknowledgeType.RELEASE

    def _run(self, msg: Message, polled: float) -> int | Handled:
        """One work item, steps 1-3 (the wait for its statuses is the caller's, `_settle`):
        the acknowledgement it earns, or its Handled batch."""
        if self._stop.is_set():
            return AcknowledgeType.RELEASE
        try:
            type_name, item = self._codec.decode(msg.value())
            if type_name != WORK_ITEM:
                raise DecodeError(f"{type_name} is not a work item")
            tasks = [_task(t, self._cancels.check, self._progress) for t in item["tasks"]]
        except (DecodeError, ValueError, KeyError) as exc:
            log.error("%s: rejecting %s@%d: %s", self.queue.name, msg.topic(), msg.offset(), exc)
            self._count("rejected")
            return AcknowledgeType.REJECT
        try:
            cancels = self._cancels
            cancels.catch_up(since=polled)
            batch = [t for t in tasks if t.id not in cancels and t.parent_id not in cancels]
            self._count("cancelled", len(tasks) - len(batch))
            # A part of a task cancelled before it was split: the cancel named the parent only
            # (its parts did not exist yet), so the part's own `cancelled` is written here.
            orphans = [t for t in tasks if t.id not in cancels and t.parent_id in cancels]
            if orphans:
                self._cancel_parts(item["batch_id"], orphans)
            if batch:
                return self._handle(item["batch_id"], batch)
        except (KafkaException, TaskError) as exc:
            log.warning("%s: releasing %s: %s", self.queue.name, item["batch_id"], exc)
            self._count("released")
            return AcknowledgeType.RELEASE
        self._count("items")
        return AcknowledgeType.ACCEPT

    def _cancel_parts(self, batch_id: str, parts: list[Task]) -> None:
        q, acks = self.queue, Acks()
        for task in parts:
            event = status_data(task.id, "cancelled", attempt=task.attempt, batch_id=batch_id)
            self._log.produce(self._producer, q.status_topic, task.id, STATUS, event, acks)
        acks.wait_served(f"cancelled statuses of batch {batch_id}")

    def _handle(self, batch_id: str, batch: list[Task]) -> Handled:
        q, p, produce = self.queue, self._producer, self._log.produce
        acks = Acks()
        for task in batch:
            running = status_data(task.id, "running", attempt=task.attempt, batch_id=batch_id)
            produce(p, q.status_topic, task.id, STATUS, running, acks)
        try:
            result = q.handle(batch)
            outcome: dict[str, Any] = {"status": "succeeded", "result": result}
        except BaseException as exc:  # user code: any exception fails the attempt, with the
            # reason; a SystemExit or KeyboardInterrupt too (on a handler thread, only a handler
            # raises one; let through, it ended the consumer thread that took the item's
            # outcome, so two such tasks left the task worker running with no consumer)
            error = f"{type(exc).__name__}: {exc}"
            log.info("%s: batch %s failed: %s", q.name, batch_id, traceback.format_exc(limit=3))
            outcome = {"status": "failed", "error": error}
        ended: Counter[str] = Counter()
        for task in batch:
            event = self._ended(task, batch_id, _outcome(task, outcome), acks)
            ended[event["status"]] += 1
            if task.parent_id and event["status"] == "succeeded":
                part = status_data(task.parent_id, "part-succeeded", part_id=task.id)
                produce(p, q.status_topic, task.parent_id, STATUS, part, acks)
        return Handled(batch_id, acks, ended)

    def _ended(
        self, task: Task, batch_id: str, outcome: dict[str, Any], acks: Acks
    ) -> dict[str, Any]:
        """Produce a task's final status of this attempt; a result over the producer's
        `message.max.bytes` fails the attempt instead, and says so."""
        q, produce = self.queue, self._log.produce
        event = status_data(task.id, attempt=task.attempt, batch_id=batch_id, **outcome)
        try:
            produce(self._producer, q.status_topic, task.id, STATUS, event, acks)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.MSG_SIZE_TOO_LARGE:
                raise
            size = len(event.get("result") or "")
            error = f"result is too large to write ({size} bytes as JSON): {exc.args[0].str()}"
            event = status_data(
                task.id, "failed", attempt=task.attempt, batch_id=batch_id, error=error
            )
            produce(self._producer, q.status_topic, task.id, STATUS, event, acks)
        return event

    def _progress(self, task: Task, report: dict[str, Any]) -> None:
        """A handler's `task.progress(...)`: one `progress` status event, not awaited (the
        batch's statuses flush it; a lost report is only a missing line)."""
        event = status_data(
            task.id,
            "progress",
            attempt=task.attempt,
            progress=json.dumps(report, default=str, allow_nan=False),  # ValueError to the handler
        )
        self._log.produce(
            self._producer, self.queue.status_topic, task.id, STATUS, event, _log_failure
        )

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            setattr(self.stats, name, getattr(self.stats, name) + n)


def _task(raw: dict[str, Any], cancelled: Any, progress: Any) -> Task:
    return Task(
        raw["task_id"], raw["key"], json.loads(raw["data"]), raw["attempt"], raw["parent_id"],
        cancelled, progress,
    )  # fmt: skip


def _outcome(task: Task, batch: dict[str, Any]) -> dict[str, Any]:
    """One task's final status fields: `cancelled` when its handler was told so (whatever it
    returned), else the batch's outcome with the task's own `result` when the handler set one."""
    if task.told_cancelled:
        return {"status": "cancelled"}
    if batch["status"] != "succeeded":
        return batch
    result = task.result if task.result is not None else batch["result"]
    try:
        text = json.dumps(result, default=str, allow_nan=False)  # NaN read back as null
    except (TypeError, ValueError, RecursionError) as exc:  # a loop, keys that are not text, NaN
        return {"status": "failed", "error": f"result is not JSON: {type(exc).__name__}: {exc}"}
    return {"status": "succeeded", "result": text}


def _log_failure(err: KafkaError | None, msg: Message) -> None:
    if err is not None:
        log.warning("progress report on %s not delivered: %s", msg.topic(), err.str())


def _ok(msg: Message) -> bool:
    if msg.error() is not None:
        log.warning("share consumer: %s", msg.error())
        return False
    return True


def _close(consumer: ShareConsumer) -> None:
    try:
        consumer.close()
    except KafkaException:
        log.warning("share consumer close failed", exc_info=True)
