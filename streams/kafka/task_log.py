"""Task queues on Kafka: their topics, the records of task events, share-group settings, and the
client that submits and cancels tasks (`TaskClient`, used by `POST /tasks`, the CLI and Python).

Every task record is a refold event (Avro single-object encoded, CloudEvents headers): intake
records `refold.tasks.TaskSubmitted`, work items `refold.tasks.WorkItem`, status events
`refold.tasks.TaskStatus` keyed by task id, so `refold tail` and the projection runtime read them
like any other event.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType
from refold.core import envelope
from refold.core.config import Config
from refold.core.envelope import Headers
from refold.core.errors import DecodeError, InputError, TaskConflict, TaskError
from refold.core.serde import Codec
from refold.core.tasks import (
    STATUS,
    SUBMITTED,
    WORK_ITEM,
    Submission,
    TaskQueue,
    fingerprint,
    intake_key,
    submission_from_json,
)
from refold.kafka import clients
from refold.kafka.log import read_to_end, topic_partitions
from refold.kafka.registry import SchemaRegistry, codec_for
from refold.kafka.task_answers import Accepted, Pending, Remembered, follow
from refold.kafka.topics import Topics, TopicSpec, compacted_topic, dead_letter_topic, event_topic

log = logging.getLogger(__name__)

#: How long a share-group worker holds a work item before the broker hands it to another.
RECORD_LOCK_MS = 60_000
#: Claim rounds in flight at once, each taking every id queued when it starts. Measured, 64 POSTs
#: in flight, load avg 20-40: one round at a time ~525/s, 4 ~750/s; another pair, 8: ~610/s, 4:
#: ~530/s (a round is 15-25 ms there: produce, acks=all, read back by the index).
CLAIM_ROUNDS = 4
#: Deliveries of one work item before the broker archives it (a worker crashing on it each time).
DELIVERY_LIMIT = 5


def task_topics(queue: TaskQueue) -> list[TopicSpec]:
    """The topics of a queue: intake, work and status (kept forever), dead tasks, cancels, and
    the task-id claims (never compacted: the first claim of an id wins)."""
    window = str(queue.id_retention_ms)
    return [
        event_topic(queue.intake_topic, queue.partitions),
        event_topic(queue.work_topic, queue.work_partitions),
        event_topic(queue.status_topic, queue.partitions),
        dead_letter_topic(queue.dead_topic),
        compacted_topic(queue.cancel_topic),
        TopicSpec(
            queue.claims_topic,
            queue.partitions,
            {"cleanup.policy": "delete", "retention.ms": window},
        ),
    ]


def ensure_task_topics(topics: Topics, queues: Mapping[str, TaskQueue]) -> list[str]:
    specs = [spec for queue in queues.values() for spec in task_topics(queue)]
    topics.ensure(specs)
    return [s.name for s in specs]


def work_group(config: Config, queue: TaskQueue) -> str:
    """The share group of a queue's task workers."""
    return config.group("tasks", queue.name, "work")


def configure_share_group(config: Config, group: str, *, lock_ms: int = RECORD_LOCK_MS) -> None:
    """Set the share group's configs refold relies on: start at the earliest work item, read
    only committed dispatches, the record lock, and the delivery limit."""
    settings = {
        "share.auto.offset.reset": "earliest",
        "share.isolation.level": "read_committed",
        "share.record.lock.duration.ms": str(lock_ms),
        "share.delivery.count.limit": str(DELIVERY_LIMIT),
    }
    entries = [
        ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET)
        for name, value in settings.items()
    ]
    resource = ConfigResource(ResourceType.GROUP, group, incremental_configs=entries)
    admin = clients.admin(config)  # held until the answer came: a dropped client cancels it
    try:
        for future in admin.incremental_alter_configs([resource]).values():
            future.result(30)
    except KafkaException as exc:
        raise TaskError(
            f"cannot configure share group {group!r}: {exc}",
            hint="share groups need Kafka 4.2+ with share.version enabled",
        ) from exc


def intake_holds(
    config: Config, codec: Codec, queue: TaskQueue, submission: Submission, since_ms: int
) -> bool:
    """Whether the queue's intake topic holds a submission of this task written at or after
    `since_ms` (the time its id was claimed, less a margin). Reads the intake from there to
    its end, decoding only records with the task's intake key: a check for the rare repeat
    whose first claimer may have died before appending, not for every submit."""
    consumer = clients.consumer(config, config.group("tasks", queue.name, "intake-check"))
    try:
        parts = topic_partitions(consumer, queue.intake_topic)
        asked = [TopicPartition(queue.intake_topic, p, since_ms) for p in parts]
        found = consumer.offsets_for_times(asked, 10)
        starts = {(tp.topic, tp.partition): tp.offset for tp in found if tp.offset >= 0}
        key = intake_key(queue, submission).encode()
        for batch in read_to_end(consumer, starts):
            for msg in batch:
                if msg.key() != key:
                    continue
                with contextlib.suppress(DecodeError, KeyError, TypeError):
                    type_name, data = codec.decode(msg.value())
                    if type_name == SUBMITTED and data["task_id"] == submission.task_id:
                        return True
        return False
    finally:
        consumer.close()


def status_data(task_id: str, status: str, **fields: Any) -> dict[str, Any]:
    """A TaskStatus event's data; JSON values (`data`, `result`) must already be text."""
    return {"task_id": task_id, "status": status, **fields}


class TaskLog:
    """Encodes task events with their envelope; the writer schemas are registered once."""

    def __init__(self, config: Config, codec: Codec, source: str | None = None) -> None:
        self.config = config
        self.codec = codec
        self.source = source or f"refold://{socket.gethostname()}"
        self._registry = SchemaRegistry(config, codec.catalog)
        self._ids = uuid.uuid4().hex[:20] + "-"
        self._seq = itertools.count()
        self._templates: tuple[int, dict[str, Headers]] = (-1, {})

    def register(self, producer: Producer) -> None:
        """Make the task schemas durable in the registry topic (a plain producer, not in a
        transaction) before any task record references them."""
        for type_name in (SUBMITTED, WORK_ITEM, STATUS):
            self._registry.ensure_registered(self.codec.writer_for(type_name), producer)

    def record(self, type_name: str, data: dict[str, Any]) -> tuple[bytes, Headers]:
        # Event ids: a random prefix per TaskLog and a counter (uuid4 per record read
        # os.urandom each time: a quarter of the intake's encoding time, measured).
        headers = self._template(type_name)
        headers[envelope.ID_SLOT] = (envelope.ID, f"{self._ids}{next(self._seq):x}".encode())
        return self.codec.encode(type_name, data), headers

    def _template(self, type_name: str) -> Headers:
        """A copy of the envelope of `type_name` records written this millisecond: the
        envelope's `time` is formatted once per ms and type, not per record (formatting it
        was a sixth of a bulk submitter's CPU, py-spy). Its microseconds are those of the
        first record of the ms; the record timestamps, which the status fold reads, are
        librdkafka's own. Safe from several threads (a race builds a template twice)."""
        now_ms = int(time.time() * 1000)
        at, cache = self._templates
        if at != now_ms:
            cache = {}
            self._templates = (now_ms, cache)
        found = cache.get(type_name)
        if found is None:
            found = envelope.template(type_name, source=self.source)
            cache[type_name] = found
        return list(found)

    def produce(
        self,
        producer: Producer,
        topic: str,
        key: str,
        type_name: str,
        data: dict[str, Any],
        on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
    ) -> None:
        value, headers = self.record(type_name, data)
        while True:
            try:
                producer.produce(topic, value, key, headers=headers, on_delivery=on_delivery)
                if isinstance(on_delivery, Acks):
                    on_delivery.track()
                return
            except BufferError:
                producer.poll(0.05)


class Acks:
    """Delivery reports of a group of records: `wait` raises TaskError unless all arrived.

    Records produced through `TaskLog.produce` (or announced with `track`) are counted, and
    `wait` waits for those alone: a flush would wait for every record in flight, and with
    several threads producing on one producer, it waited behind the others' records."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self._sent = 0
        self._acked = 0
        self._lock = threading.Condition()  # reports arrive on whichever thread polls

    def track(self) -> None:
        """One more record to wait for (called after a successful produce)."""
        self._sent += 1

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        with self._lock:
            self._acked += 1
            if err is not None:
                self.errors.append(f"{msg.topic()}: {err.str()}")
            if self._acked >= self._sent:
                self._lock.notify_all()

    def wait(self, producer: Producer, what: str, timeout: float = 30.0) -> None:
        if self._sent == 0:
            remaining = producer.flush(timeout)
        else:
            deadline = time.monotonic() + timeout
            while self._acked < self._sent and time.monotonic() < deadline:
                producer.poll(0.002)
            remaining = self._sent - self._acked
        if self.errors or remaining:
            raise TaskError(f"{what} not acknowledged: {self.errors or f'{remaining} pending'}")

    def wait_served(self, what: str, timeout: float = 30.0) -> None:
        """`wait` where another thread polls the producer: sleeps until the reports are in
        (each waiter spinning on poll() woke up 500 times a second, and took the GIL each time,
        from handler threads that need it)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._acked < self._sent:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            remaining = self._sent - self._acked
        if self.errors or remaining > 0:
            raise TaskError(f"{what} not acknowledged: {self.errors or f'{remaining} pending'}")


#: Looks a task id up in the status projection: its state, or None when unknown.
Lookup = Callable[[str, str], dict[str, Any] | None]
#: Claims a new task id for this intake node: True when its claim won (append the task), False
#: when another node's claim of the same body did (a repeat); TaskConflict for another body.
Claim = Callable[[str, Submission], bool]
#: What a claim says of one submission: True (append it), False (a repeat: append nothing), the
#: TaskError to answer it with (TaskConflict), or a check that may read the log, run off the
#: claims threads, which answers True or False or raises the TaskError.
Verdict = bool | TaskError | Callable[[], bool]
#: Claims new task ids of one queue together (one round trip): a Verdict per submission.
ClaimMany = Callable[[str, Sequence[Submission]], Sequence[Verdict]]


#: A new id waiting for its claim: its queue, submission, Pending and remembered event.
_Claiming = tuple[TaskQueue, Submission, Pending, Remembered]


class TaskClient:
    """Submits and cancels tasks of the given queues. A submit is durable (acks=all, idempotent
    producer) before it returns; `known` (queue, task id) -> state makes a repeated task id
    return the first answer and queue nothing.

    Submits from many threads (or many `submit_nowait`s) share the producer's batches: each
    waits for its own records' delivery reports, served by a poll thread, not for a flush of
    everything in flight (one round trip per submit, measured: 99 tasks/s from 8 threads)."""

    def __init__(
        self,
        config: Config,
        queues: Mapping[str, TaskQueue],
        *,
        codec: Codec | None = None,
        known: Lookup | None = None,
        claim: Claim | None = None,
        claim_many: ClaimMany | None = None,
    ) -> None:
        self.queues = dict(queues)
        self.log = TaskLog(config, codec or codec_for(config))
        self._known = known
        self._claim_many = claim_many
        if claim_many is None and claim is not None:
            self._claim_many = lambda queue, subs: [_one(claim, queue, s) for s in subs]
        # New ids waiting for their claims: claimed together by a claims thread, one round
        # trip for all queued while it was busy (group commit; CLAIM_ROUNDS threads).
        self._claiming: list[_Claiming] = []
        self._claims_ready = threading.Condition(threading.Lock())
        self._claimers: list[threading.Thread] = []
        self._checks: ThreadPoolExecutor | None = None  # verdicts that read the log (rare)
        self._producer = clients.producer(config, defaults={"linger.ms": 1})
        self._lock = threading.Lock()  # the id checks and appends, not the claims or waits
        # The submits made here, until the projection has surely folded them.
        self._recent: dict[tuple[str, str], Remembered] = {}
        self._registered = False
        self._closed = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="task-client-acks", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._closed.is_set():
            self._producer.poll(0.05)

    def register(self) -> None:
        """Register the task schemas now (else the first submit does it)."""
        with self._lock:
            self._register()

    def queue(self, name: str) -> TaskQueue:
        try:
            return self.queues[name]
        except KeyError:
            known = ", ".join(sorted(self.queues)) or "none"
            raise InputError(f"unknown task queue {name!r}; known: {known}") from None

    def prepare(self, queue: str, obj: Any) -> Submission:
        """Check an intake request without sending anything (InputError if bad)."""
        self.queue(queue)
        return submission_from_json(obj)

    def submit(self, queue: str, submission: Submission, timeout: float = 30.0) -> Accepted:
        """Append the task to the intake topic and its `accepted` status; a known id appends
        nothing and answers as the first time (TaskConflict when its body differs)."""
        return self.submit_nowait(queue, [submission])[0].wait(timeout)

    def submit_many(
        self, queue: str, submissions: Sequence[Submission], timeout: float = 30.0
    ) -> list[Accepted]:
        """`submit` for many tasks at once: every one is durable when this returns."""
        return [p.wait(timeout) for p in self.submit_nowait(queue, submissions)]

    def submit_nowait(self, queue: str, submissions: Sequence[Submission]) -> list[Pending]:
        """Append the tasks and return at once (nothing acknowledged yet); each answer is
        final when its Pending is done. A repeat of an id in flight here is done with the first
        one; TaskConflict for an id seen before with another body. With a `claim` (a worker's
        intake, a CLI), each new id is claimed first, on a claims thread, together with the
        others waiting (its Pending then ends with the claim's error, if any: TaskConflict
        when another body claimed the id); the tasks are appended once claimed. Never blocks
        on Kafka after the first call (which registers the schemas)."""
        q = self.queue(queue)
        out: list[Pending] = []
        claims: list[_Claiming] = []
        for submission in submissions:
            with self._lock:
                self._register()
                pending, fresh = self._reserve(q, submission)
            if fresh is not None:
                if self._claim_many is None:
                    self._append(q, submission, pending, fresh)
                else:
                    claims.append((q, submission, pending, fresh))
            out.append(pending)
        if claims:
            with self._claims_ready:
                self._claiming.extend(claims)
                if not self._claimers:
                    for i in range(CLAIM_ROUNDS):
                        thread = threading.Thread(
                            target=self._claim_rounds, name=f"task-client-claims-{i}", daemon=True
                        )
                        thread.start()
                        self._claimers.append(thread)
                self._claims_ready.notify()
        return out

    def _claim_rounds(self) -> None:
        """A claims thread: claim everything queued in one round trip, settle each, repeat."""
        assert self._claim_many is not None
        while True:
            with self._claims_ready:
                while not self._claiming and not self._closed.is_set():
                    self._claims_ready.wait(0.5)
                if not self._claiming:
                    return
                batch, self._claiming = self._claiming, []
            for q, items in _by_queue(batch):
                subs = [submission for _q, submission, _p, _f in items]
                try:
                    verdicts = list(self._claim_many(q.name, subs))
                except Exception as exc:  # every task of the round answers it (a 503)
                    log.warning("claims of %d task ids failed", len(subs), exc_info=True)
                    verdicts = [TaskError(f"could not be claimed: {exc}")] * len(subs)
                for (_q, submission, pending, fresh), verdict in zip(items, verdicts, strict=True):
                    try:
                        self._settle(q, submission, pending, fresh, verdict)
                    except Exception as exc:  # this task answers 503; the thread goes on
                        log.exception("task %s/%s: not appended", q.name, submission.task_id)
                        pending.fail(str(exc), TaskError(f"not appended: {exc}"))

    def _settle(
        self,
        q: TaskQueue,
        submission: Submission,
        pending: Pending,
        fresh: Remembered,
        verdict: Verdict,
    ) -> None:
        """Act on a claim: append (won), answer as a repeat (another node appends), or end
        the Pending with the claim's error (and forget the id: not ours); a check first runs
        on a thread of its own, so it holds up no other claim."""
        task_id = submission.task_id
        if callable(verdict):
            if self._checks is None:
                self._checks = ThreadPoolExecutor(2, thread_name_prefix="task-client-checks")
            answer = _run(verdict)
            self._checks.submit(lambda: self._settle(q, submission, pending, fresh, answer()))
            return
        if isinstance(verdict, TaskError):
            with self._lock:
                if self._recent.get((q.name, task_id)) is fresh:
                    del self._recent[(q.name, task_id)]
            pending.fail(f"task {task_id!r}: {verdict}", verdict)
        elif verdict:
            self._append(q, submission, pending, fresh)
        else:  # another node's claim of the same body: it appends; answered as a repeat
            pending.answer = Accepted(task_id, q.name, repeated=True)
            fresh.pending = None
            pending.ack(None)
            pending.ack(None)

    def _reserve(self, q: TaskQueue, submission: Submission) -> tuple[Pending, Remembered | None]:
        """The answer to a task id seen before (done, or done with the first one in flight),
        or a new Pending and its remembered `accepted` event, reserved against repeats."""
        task_id = submission.task_id
        first = self._first(q.name, submission)
        if first is not None:
            if first.pending is not None and not first.pending.done:
                repeat = Pending(Accepted(task_id, q.name, repeated=True), 1)
                first.pending.on_done(lambda done: follow(repeat, done))
                return repeat, None
            if first.pending is None or not first.pending.errors:
                return Pending(Accepted(task_id, q.name, repeated=True), 0), None
            # refused the first time: this one appends again
        if len(self._recent) > 100_000:
            self._recent.clear()
        data = submission.data_json
        accepted = status_data(task_id, "accepted", key=submission.key, data=data)
        pending = Pending(Accepted(task_id, q.name), 2)
        fresh = Remembered(accepted, q.status_topic, -1, -1, int(time.time() * 1000), pending)
        self._recent[(q.name, task_id)] = fresh
        return pending, fresh

    def _append(
        self, q: TaskQueue, submission: Submission, pending: Pending, fresh: Remembered
    ) -> None:
        task_id = submission.task_id
        intake = {"task_id": task_id, "key": submission.key, "data": submission.data_json}
        self.log.produce(
            self._producer, q.intake_topic, intake_key(q, submission), SUBMITTED, intake, pending
        )

        def on_status(err: KafkaError | None, msg: Message) -> None:
            if err is None:
                fresh.partition, fresh.offset = msg.partition(), msg.offset()
            pending(err, msg)

        self.log.produce(self._producer, q.status_topic, task_id, STATUS, fresh.event, on_status)

    def remembered(self, queue: str, task_id: str) -> Remembered | None:
        """The `accepted` event of a task this client submitted (recently), if it did."""
        return self._recent.get((queue, task_id))

    def _first(self, queue: str, submission: Submission) -> Remembered | None:
        """What is known of a task id seen before (submitted here, or in the status projection:
        then with no Pending); TaskConflict when its body differs."""
        task_id = submission.task_id
        recent = self._recent.get((queue, task_id))
        state = recent.event if recent is not None else None
        if state is None and self._known is not None:
            state = self._known(queue, task_id)
        if state is None:
            return None
        data = state.get("data")
        if isinstance(data, str):
            data = json.loads(data)  # an event's data travels as text
        if data is not None and fingerprint(state.get("key") or task_id, data) != (
            submission.fingerprint
        ):
            raise TaskConflict(
                f"task id {task_id!r} was submitted before with another body; "
                f"first: key {state.get('key')!r}, data {json.dumps(data)[:200]}",
                hint="use a new task id for another task",
            )
        return recent or Remembered(state, "", -1, -1, 0)

    def cancel(self, queue: str, task_ids: Sequence[str]) -> None:
        """Record the cancels where task workers look before running a task (durably first),
        then the `cancelled` statuses. A split task is cancelled with its parts."""
        q = self.queue(queue)
        with self._lock:
            self._register()
            acks = Acks()
            for task_id in task_ids:
                value, headers = self.log.record(STATUS, status_data(task_id, "cancelled"))
                self._producer.produce(
                    q.cancel_topic, value, task_id, headers=headers, on_delivery=acks
                )
                acks.track()
            acks.wait(self._producer, f"cancel of {list(task_ids)}")
            for task_id in task_ids:
                event = status_data(task_id, "cancelled")
                self.log.produce(self._producer, q.status_topic, task_id, STATUS, event, acks)
            acks.wait(self._producer, f"cancel of {list(task_ids)}")

    def _register(self) -> None:
        if not self._registered:
            self.log.register(self._producer)
            self._registered = True

    def close(self) -> None:
        self._closed.set()
        with self._claims_ready:
            self._claims_ready.notify_all()
        for thread in self._claimers:
            thread.join(30)  # they settle what was queued first
        if self._checks is not None:
            self._checks.shutdown(wait=True)
        self._producer.flush(30)
        self._poller.join(5)


def _run(check: Callable[[], bool]) -> Callable[[], bool | TaskError]:
    """A check whose TaskError is its answer."""

    def run() -> bool | TaskError:
        try:
            return check()
        except TaskError as exc:
            return exc
        except Exception as exc:  # a broker that does not answer the check: a 503, logged
            log.warning("task id check failed", exc_info=True)
            return TaskError(f"could not be checked: {exc}")

    return run


def _one(claim: Claim, queue: str, submission: Submission) -> bool | TaskError:
    """A one-at-a-time `Claim` as a verdict of ClaimMany."""
    try:
        return claim(queue, submission)
    except TaskError as exc:
        return exc


def _by_queue(batch: list[_Claiming]) -> list[tuple[TaskQueue, list[_Claiming]]]:
    out: dict[str, tuple[TaskQueue, list[_Claiming]]] = {}
    for item in batch:
        out.setdefault(item[0].name, (item[0], []))[1].append(item)
    return list(out.values())
