"""The dispatcher of one task queue: intake records into work items, merged and split, pushed in
Kafka transactions with the intake offsets.

One dispatcher owns each intake partition (the consumer group `<app id>.tasks.<queue>.dispatch`,
inside `refold worker`). Tasks to merge share an intake partition (their intake key is the merge
key's value), so one dispatcher sees them all. The steps, in order:

1. collect intake records for `merge_window_ms` from the first one (a tumbling window);
2. plan (`refold.core.tasks.plan_batches`): split what `split` divides into parts (each its own
   work item, with `parent_id`), merge the rest by merge-key value, at most `merge_max` and
   MAX_BATCH_BYTES of data each (a work item is one record);
3. in one Kafka transaction: every work item, a `dispatched` status per task (and per parent,
   with its parts), and the intake offsets after the window (`send_offsets_to_transaction`);
4. commit, on a thread of its own while the next window fills (step 1 again): the commit's
   round trips no longer hold the records that arrive meanwhile. The next transaction begins
   only once that commit has returned; if it failed, the transaction is aborted, the window
   collected meanwhile is dropped, and the consumer goes back to the committed offsets, which
   reads both windows again, after a pause (0.5 s, doubling to 30 s while transactions keep
   failing: one the broker refuses every time, such as a work item over the work topic's
   max.message.bytes, would otherwise be tried again at once, with a warning each time). A
   rebalance waits for a commit in flight first, so no commit spans
   one. A crash before the commit returns aborts everything (read_committed readers never see
   it, and the intake records are read again from the committed offsets); after it, nothing is
   read again. So a task is neither dropped nor dispatched twice by the dispatcher; the batch
   ids are a function of the intake positions, so a redone window writes the same ids.

A partition revoked in the middle of a window loses its buffered records: they were not
committed, so its next owner reads them again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, TopicPartition
from refold.core.config import Config
from refold.core.errors import DecodeError, TaskError
from refold.core.serde import Codec
from refold.core.tasks import STATUS, SUBMITTED, WORK_ITEM, Plan, Task, TaskQueue, plan_batches
from refold.engine.transactions import (
    RETRY_LOG_EVERY,
    Backoff,
    failure_kind,
    stable_instance_id,
)
from refold.kafka import clients
from refold.kafka.task_log import Acks, TaskLog, status_data

log = logging.getLogger(__name__)

TXN_TIMEOUT_MS = 10_000
#: The transactional producer's retry backoff (see __init__).
RETRY_BACKOFF_MS = 5
#: Transactions that keep failing are tried again after 0.5 s, doubling up to this.
RETRY_CAP_S = 30.0


@dataclass(slots=True)
class DispatcherStats:
    state: str = "starting"  # starting | running | stopped | failed
    error: str | None = None
    tasks: int = 0
    batches: int = 0
    parts: int = 0
    transactions: int = 0
    aborts: int = 0
    poison: int = 0


class Dispatcher:
    """Moves one queue's intake to its work topic; run() until stop()."""

    def __init__(self, config: Config, codec: Codec, queue: TaskQueue) -> None:
        self.config = config
        self.queue = queue
        self.stats = DispatcherStats()
        self._log = TaskLog(config, codec, source=f"refold://dispatcher/{queue.name}")
        self._codec = codec
        self._stop = threading.Event()
        group = config.group("tasks", queue.name, "dispatch")
        instance = stable_instance_id(config.data_dir / "tasks" / queue.name / "dispatcher")
        self._consumer = clients.consumer(
            config,
            group,
            defaults={"session.timeout.ms": 10_000},
            required={"auto.offset.reset": "earliest"},
        )
        self._producer = clients.producer(
            config,
            # retry.backoff.ms: a transaction begun right after the last one's commit is often
            # answered CONCURRENT_TRANSACTIONS (its markers are still being written) and retried
            # after this backoff: librdkafka's 100 ms default held every window that long.
            defaults={"linger.ms": 1, "retry.backoff.ms": RETRY_BACKOFF_MS},
            transactional_id=f"{group}.{instance}",
            required={"transaction.timeout.ms": TXN_TIMEOUT_MS, "message.timeout.ms": 9_000},
        )
        self._window: list[Message] = []
        self._aborts = Backoff(first=0.5, cap=RETRY_CAP_S)  # transactions failing now
        # The last window's commit while the next window fills: its thread, and the error it
        # ended with, if any (see _settle).
        self._commit: tuple[threading.Thread, list[BaseException]] | None = None

    def run(self) -> None:
        try:
            self._producer.init_transactions(30)
            plain = clients.producer(self.config)
            self._log.register(plain)
            plain.flush(10)
            self._consumer.subscribe(
                [self.queue.intake_topic], on_revoke=self._on_revoke, on_lost=self._on_revoke
            )
            self.stats.state = "running"
            while not self._stop.is_set():
                if self._collect():
                    self._dispatch()
                elif self._commit is not None and not self._commit[0].is_alive():
                    self._settle()  # idle: a failed commit is redone now, not at the next record
            self._settle()
        except Exception as exc:
            log.exception("dispatcher %s failed", self.queue.name)
            self.stats.state = "failed"
            self.stats.error = f"{type(exc).__name__}: {exc}"
        finally:
            if self.stats.state != "failed":
                self.stats.state = "stopped"
            if self._commit is not None:
                self._commit[0].join(60)
            self._consumer.close()

    def stop(self) -> None:
        self._stop.set()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # No commit spans a rebalance: the one in flight ends first. Its outcome is settled by
        # the next _dispatch (a failure then drops that window and reads again from the
        # committed offsets, as the new assignment does anyway).
        if self._commit is not None:
            self._commit[0].join()
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        self._window = [m for m in self._window if (m.topic(), m.partition()) not in revoked]

    def _collect(self) -> bool:
        """Fill the window: wait for a first record, then take records for merge_window_ms."""
        first = self._consumer.poll(0.1)
        if first is None:
            return bool(self._window)
        self._window.append(first)
        deadline = time.monotonic() + self.queue.merge_window_ms / 1000
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._window.extend(self._consumer.consume(1000, min(left, 0.05)))
        return True

    def _dispatch(self) -> None:
        msgs = [m for m in self._window if m.error() is None]
        self._window = []
        if not self._settle():
            return  # the last commit failed: these records are read again after it
        if not msgs:
            return
        tasks, texts = self._decode(msgs)
        first = msgs[0]
        prefix = f"{first.topic()}-{first.partition()}-{first.offset()}"
        try:
            self._transact(msgs, plan_batches(self.queue, tasks, prefix, texts), texts)
        except (KafkaException, TaskError) as exc:
            self._recover(exc)

    def _decode(self, msgs: list[Message]) -> tuple[list[Task], dict[str, str]]:
        """The tasks, and each one's data as the JSON text of its intake record (a whole
        task's work item carries that text: no json.dumps of what json.loads just read)."""
        tasks: list[Task] = []
        texts: dict[str, str] = {}
        decode = self._codec.decode
        for msg in msgs:
            try:
                type_name, data = decode(msg.value())
                if type_name != SUBMITTED:
                    raise DecodeError(f"{type_name} is not a task submission")
                text = data["data"]
                tasks.append(Task(data["task_id"], data["key"], json.loads(text)))
                texts[data["task_id"]] = text
            except (DecodeError, ValueError, KeyError) as exc:
                # Only TaskClient writes intake; a stranger's record is skipped, and says so.
                self.stats.poison += 1
                log.error(
                    "dispatcher %s: skipping %s[%d]@%d: %s",
                    self.queue.name, msg.topic(), msg.partition(), msg.offset(), exc,
                )  # fmt: skip
        return tasks, texts

    def _transact(self, msgs: list[Message], plan: Plan, texts: dict[str, str]) -> None:
        produce, p = self._log.produce, self._producer
        work_topic, status_topic = self.queue.work_topic, self.queue.status_topic
        acks = Acks()
        p.begin_transaction()
        for batch in plan.batches:
            batch_id = batch.batch_id
            work = [_work_task(t, None if t.parent_id else texts.get(t.id)) for t in batch.tasks]
            produce(p, work_topic, batch_id, WORK_ITEM, {"batch_id": batch_id, "tasks": work}, acks)
            for task, raw in zip(batch.tasks, work, strict=True):
                event = status_data(
                    task.id,
                    "dispatched",
                    attempt=1,
                    batch_id=batch_id,
                    parent_id=task.parent_id,
                    key=task.key,
                    data=raw["data"] if task.parent_id else None,
                )
                produce(p, status_topic, task.id, STATUS, event, acks)
        for parent, parts in plan.parents.items():
            event = status_data(parent, "dispatched", attempt=1, parts=list(parts))
            produce(p, status_topic, parent, STATUS, event, acks)
        nxt: dict[tuple[str, int], int] = {}
        for msg in msgs:
            tp = (msg.topic(), msg.partition())
            nxt[tp] = max(nxt.get(tp, 0), msg.offset() + 1)
        offsets = [TopicPartition(t, part, o) for (t, part), o in nxt.items()]
        # The offsets go to the transaction while its records are in flight, and the commit
        # flushes them (it fails if any record failed): no wait for the records' own
        # acknowledgements first, one round trip less per dispatch.
        p.send_offsets_to_transaction(offsets, self._consumer.consumer_group_metadata(), 30)
        failed: list[BaseException] = []

        def commit() -> None:
            try:
                p.commit_transaction(30)
            except BaseException as exc:  # settled on the dispatcher's thread (_settle)
                failed.append(exc)
                return
            if acks.errors:  # not expected: a commit fails when one of its records failed
                log.error("dispatcher %s: committed with errors: %s", self.queue.name, acks.errors)
            stats = self.stats
            stats.transactions += 1
            stats.batches += len(plan.batches)
            stats.tasks += sum(len(b.tasks) for b in plan.batches if not b.tasks[0].parent_id)
            stats.parts += sum(len(parts) for parts in plan.parents.values())
            stats.tasks += len(plan.parents)

        thread = threading.Thread(target=commit, name=f"commit-{self.queue.name}", daemon=True)
        self._commit = (thread, failed)
        thread.start()

    def _settle(self) -> bool:
        """Wait for the last window's commit; False if it failed, when the transaction is
        aborted and the consumer rewound to the committed offsets (the caller drops what it
        collected since: it is read again)."""
        if self._commit is None:
            return True
        thread, failed = self._commit
        thread.join()
        self._commit = None
        if not failed:
            aborted = self._aborts.succeeded()
            if aborted:
                log.info(
                    "dispatcher %s: a transaction committed after %d aborted",
                    self.queue.name,
                    aborted,
                )
            return True
        self._window = []
        self._recover(failed[0], "commit failed: ")
        return False

    def _recover(self, exc: BaseException, what: str = "") -> None:
        """Abort and read the window again from the committed intake offsets, after a pause:
        0.5 s doubling to RETRY_CAP_S while transactions keep failing (back to 0.5 s once one
        commits). Logged: the first failure of each kind, then every RETRY_LOG_EVERY-th
        (`Backoff`); every abort is counted."""
        pause, log_it = self._aborts.failed(failure_kind(exc))
        if log_it:
            log.warning(
                "dispatcher %s: transaction aborted (%d in a row, trying again in %.1fs; "
                "logged once per error and every %dth): %s%s",
                self.queue.name,
                self._aborts.failures,
                pause,
                RETRY_LOG_EVERY,
                what,
                exc,
            )
        self.stats.aborts += 1
        try:
            self._producer.abort_transaction(30)
        except KafkaException as abort:
            if abort.args[0].fatal():
                raise TaskError(f"dispatcher {self.queue.name}: cannot abort: {abort}") from abort
        assignment = self._consumer.assignment()
        for tp in self._consumer.committed(assignment, timeout=30):
            if tp.offset < 0:
                tp.offset = OFFSET_BEGINNING
            self._consumer.seek(tp)
        self._stop.wait(pause)


def _work_task(task: Task, text: str | None = None) -> dict[str, Any]:
    """A task of a work item; `text`: its data's JSON text when known (else encoded here)."""
    return {
        "task_id": task.id,
        "key": task.key,
        "data": text if text is not None else json.dumps(task.data),
        "attempt": task.attempt,
        "parent_id": task.parent_id,
    }
