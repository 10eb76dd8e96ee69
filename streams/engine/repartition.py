"""Re-keyed projections across workers: the repartition topic.

A projection whose `key()` names another key than the aggregate id (the bank's `owners`) cannot
be folded by whoever reads a source partition: an owner's accounts live in every partition. So in
a worker it runs in two stages, each a consumer group of its own (Kafka Streams' repartition
topics, for the same reason):

1. the `Repartitioner` reads the source partitions this worker owns (group
   `<app>.<name>.v<version>.repartition`), asks `key()` for each event (None: the key its
   aggregate was last routed to, a link) and writes the event, unchanged, keyed by that key, to
   `_<app>.<name>.v<version>.repartition` (as many partitions as the source, placed by murmur2
   like the publisher places keys), in ONE Kafka transaction with the source offsets it read
   (`send_offsets_to_transaction`, fenced by the group's generation): a crash at any point
   leaves every source event in the repartition topic exactly once for read_committed readers;
2. the projection's runner (`ProjectionRunner(repartitioned=True)`) folds the repartition topic
   like any keyed topic: the owner of the new key's partition holds the whole state, with the
   repartition topic's offsets stored atomically beside it. The event a fold sees is the source
   event (its aggregate key, topic, partition and offset travel in the `refold_source` header).

The links (aggregate id -> key last routed to) are a pure function of a source partition's
prefix, so they need no store of their own: when a source partition is assigned, its links are
recomputed by reading it from offset 0 up to the group's committed offset, asking only `key()`
(the cost of a worker taking over a source partition; kept in memory per owned partition).
Poison events (undecodable, `key()` raising, or re-keyed too large for a Kafka record) go to the
projection's dead-letter topic in the same transaction.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from refold.core import envelope
from refold.core.config import Config
from refold.core.errors import DecodeError
from refold.core.projection import Projection
from refold.core.serde import MAX_EVENT_BYTES, Codec, Event
from refold.engine.membership import fold_group_settings
from refold.engine.runner_consumer import FOLD_CONSUMER_CONF
from refold.engine.runner_stats import TP
from refold.engine.transactions import (
    RETRY_LOG_EVERY,
    Backoff,
    BoundedTransactions,
    Stuck,
    failure_kind,
)
from refold.kafka import clients
from refold.kafka.log import read_to_end
from refold.kafka.topics import Topics, TopicSpec

log = logging.getLogger(__name__)

#: Records routed in one transaction at most (when that many are already fetched): each
#: transaction costs a few round trips, and the fold stage sees nothing of it before its commit.
ROUTE_BATCH = 20_000
#: `<source topic>:<partition>:<offset>:<aggregate key>` of a repartitioned record.
SOURCE_HEADER = "refold_source"
#: Routing transactions that keep failing are tried again after 0.5 s, doubling up to this.
RETRY_CAP_S = 30.0


def repartition_topic(config: Config, name: str, version: int) -> str:
    """The repartition topic of one projection version (each version routes by its own code)."""
    return f"_{config.app_id}.{name}.v{version}.repartition"


def repartition_spec(topic: str, partitions: int) -> TopicSpec:
    """Kept forever, like the event topics: a worker that takes over a partition of it with an
    empty store folds it from offset 0."""
    return TopicSpec(topic, partitions, {"retention.ms": "-1", "cleanup.policy": "delete"})


def routing_group(config: Config, projection: Projection, version: int) -> str:
    """The consumer group that routes a re-keyed version's source partitions."""
    return config.group(projection.name, f"v{version}", "repartition")


def ensure_repartition_topic(config: Config, projection: Projection, version: int) -> str:
    """Create the version's repartition topic if it is missing: as many partitions as the
    source (the largest, for several source topics), so a key's partition number is the same
    in both. Returns its name."""
    topics = Topics(config)
    topic = repartition_topic(config, projection.name, version)
    count = max(topics.partitions(t) for t in projection.topics)
    topics.ensure([repartition_spec(topic, count)])
    return topic


def routed_headers(msg: Message, event: Event) -> list[tuple[str, bytes | None]]:
    """The headers of a routed record: the source record's, then the source event's position
    and key (last: `source_of` looks there first)."""
    source = f"{event.topic}:{event.partition}:{event.offset}:{event.key}".encode()
    return [*(msg.headers() or ()), (SOURCE_HEADER, source)]


def source_of(msg: Message) -> tuple[str, int, int, str] | None:
    """(topic, partition, offset, aggregate key) of the source event a record carries (its
    last header, where the routing put it; the others are looked at only if it is not)."""
    headers = msg.headers() or ()
    for name, value in reversed(headers):
        if name == SOURCE_HEADER and value is not None:
            topic, partition, offset, key = value.decode("utf-8", "replace").split(":", 3)
            return topic, int(partition), int(offset), key
    return None


@dataclass(slots=True)
class RepartitionStats:
    state: str = "starting"
    error: str | None = None
    routed: int = 0  # events written to the repartition topic
    skipped: int = 0  # events of aggregates never routed (key() None, no link)
    dead_letters: int = 0
    transactions: int = 0
    aborts: int = 0
    retries: int = 0  # failed steps tried again (a new producer, the rewind)
    restored: int = 0  # source events read again to recompute links


class Repartitioner(BoundedTransactions):
    """Stage 1 of a re-keyed projection in a worker (see the module)."""

    RETRY_CAP_S = RETRY_CAP_S

    def __init__(
        self,
        config: Config,
        codec: Codec,
        projection: Projection,
        version: int,
        *,
        worker_id: str,
        dlq_topic: str,
        batch_size: int = 5000,
        static: bool = True,
    ) -> None:
        self.config = config
        self.codec = codec
        self.projection = projection
        self.version = version
        self.name = f"{projection.name}.v{version}.repartition"
        self.topic = repartition_topic(config, projection.name, version)
        self.dlq_topic = dlq_topic
        self.stats = RepartitionStats()
        self._batch_size = batch_size
        self._group = routing_group(config, projection, version)
        # Static membership like the fold consumers (refold.engine.membership); a replay's
        # short-lived member is dynamic, so it leaves the group when it is done.
        self._instance_id = (
            f"{worker_id}.{projection.name}.v{version}.repartition" if static else None
        )
        self._transactional_id = f"{self._group}.{worker_id}"
        self._links: dict[TP, dict[str, str]] = {}  # per owned source partition
        self._committed: dict[TP, int] = {}  # next source offset committed, per owned partition
        self._idle_at = 0.0
        self._aborts = Backoff(first=0.5, cap=RETRY_CAP_S)  # routing transactions failing now
        self._stop = threading.Event()
        self._stuck: list[tuple[Producer, threading.Thread]] = []
        self._consumer = self._new_consumer()
        self._producer = self._new_producer()

    @property
    def group(self) -> str:
        """The consumer group whose committed offsets say how far the source is routed."""
        return self._group

    def _new_consumer(self) -> Consumer:
        membership, required = fold_group_settings(self.config, self._instance_id)
        return clients.consumer(
            self.config,
            self._group,
            defaults={**FOLD_CONSUMER_CONF, **membership},
            required=required,
        )

    def stop(self) -> None:
        self._stop.set()

    def routed_offsets(self) -> dict[TP, int]:
        """The next source offset routed (committed) of each partition this stage owns."""
        return dict(self._committed)

    def run(self) -> None:
        try:
            # Fences a predecessor with the same transactional.id and aborts what it left open.
            self._retrying("starting transactions", self._init_transactions)
            self._subscribe()
            self.stats.state = "running"
            while not self._stop.is_set():
                first = self._consumer.poll(0.1)
                if first is None:
                    self._past_markers()
                    continue
                msgs = [first, *self._consumer.consume(self._batch_size - 1, 0)]
                while len(msgs) < ROUTE_BATCH:  # one transaction for what is already fetched
                    more = self._consumer.consume(self._batch_size, 0)
                    if not more:
                        break
                    msgs += more
                self._route(msgs)
        except Exception as exc:
            log.exception("%s failed", self.name)
            self.stats.state = "failed"
            self.stats.error = f"{type(exc).__name__}: {exc}"
        finally:
            if self.stats.state != "failed":
                self.stats.state = "stopped"
            try:
                self._consumer.close()
            except Exception:  # the group expires the member
                log.exception("%s: closing the consumer failed", self.name)
            self._producer.flush(5)

    # -- routing ----------------------------------------------------------------------------

    def _route(self, msgs: list[Message]) -> None:
        """One transaction: every record of the batch routed (or dead-lettered), and the next
        source offsets. Links learnt in the batch take effect only once it is committed.

        Only records of partitions owned now, at or past the offsets committed or routed in
        this batch: a record fetched before its partition was revoked (during one of the
        batch's consume calls), or before it was assigned again, is left to whoever reads it
        from the committed offset."""
        routed: list[tuple[bytes, Message, Event]] = []
        dead: list[tuple[Message, str]] = []
        learnt: dict[TP, dict[str, str]] = {}
        nxt: dict[TP, int] = {}
        skipped = 0
        for msg in msgs:
            error = msg.error()
            if error is not None:
                self._consume_error(error)
                continue
            tp = (msg.topic(), msg.partition())
            floor = nxt.get(tp, self._committed.get(tp))
            if floor is None or msg.offset() < floor:
                continue
            nxt[tp] = msg.offset() + 1
            try:
                event = self._event(msg)
                key = self.projection.key(event)
            except Exception as exc:  # undecodable, or a bug in key(): a dead letter
                dead.append((msg, f"{type(exc).__name__}: {exc}"))
                continue
            new = learnt.setdefault(tp, {})
            if key is None:
                key = new.get(event.key) or self._links.get(tp, {}).get(event.key)
                if key is None:
                    skipped += 1
                    continue
            else:
                new[event.key] = key
            raw = key.encode()
            # The routed record holds the new key, the value, the source record's headers and
            # its own (the source event): one the producer refuses would abort every try of
            # this transaction. Counted as Kafka counts it, headers too (a foreign record's
            # may be large).
            size = envelope.record_size(raw, msg.value(), routed_headers(msg, event))
            if size > MAX_EVENT_BYTES:
                reason = (
                    f"the re-keyed record is {size} bytes (key, value and headers); "
                    f"at most {MAX_EVENT_BYTES} fit"
                )
                dead.append((msg, f"{reason} in a record"))
                continue
            routed.append((raw, msg, event))
        if not nxt:
            return
        try:
            self._transact(routed, dead, nxt)
        except (Stuck, KafkaException) as exc:
            self._aborted(exc)
            return
        self._committed_again()
        for tp, links in learnt.items():
            if tp in self._links:  # (not revoked meanwhile)
                self._links[tp].update(links)
        self._committed.update(nxt)
        stats = self.stats
        stats.routed += len(routed)
        stats.skipped += skipped
        stats.dead_letters += len(dead)
        stats.transactions += 1

    def _consume_error(self, error: KafkaError) -> None:
        if error.fatal() or error.code() == KafkaError._FATAL:  # e.g. fenced by the group
            self._renew_consumer(str(error))
        elif error.code() != KafkaError._PARTITION_EOF:
            log.warning("%s: consume error %s", self.name, error)

    def _renew_consumer(self, reason: str) -> None:
        """A new consumer in the group for one that failed for good (nothing is in flight
        between batches; the new one reads from the committed offsets on assignment); the old
        one is closed in the background (cut off from its coordinator, that can take long)."""
        log.warning("%s: a new consumer joins the group: %s", self.name, reason)
        old = self._consumer
        self._links.clear()
        self._committed.clear()
        self._consumer = self._new_consumer()
        threading.Thread(target=_close_quietly, args=(old,), daemon=True).start()
        self._subscribe()
        self._stop.wait(1.0)  # a fatal error that recurs at once does not spin

    def _subscribe(self) -> None:
        self._consumer.subscribe(
            list(self.projection.topics),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )

    def _past_markers(self) -> None:
        """Idle: commit the positions that moved past transaction markers after the last
        record (an offsets-only transaction, at most once a second), so a caught-up source
        partition written in transactions shows lag 0 and `route_until` sees its end."""
        now = time.monotonic()
        if now - self._idle_at < 1.0 or not self._committed:
            return
        self._idle_at = now
        owned = [TopicPartition(t, p) for t, p in self._committed]
        moved = {
            (tp.topic, tp.partition): tp.offset
            for tp in self._consumer.position(owned)
            if tp.offset > self._committed.get((tp.topic, tp.partition), tp.offset)
        }
        if not moved:
            return
        try:
            self._transact([], [], moved)
        except (Stuck, KafkaException) as exc:
            self._aborted(exc)
            return
        self._committed_again()
        self._committed.update(moved)

    def _aborted(self, exc: Stuck | KafkaException) -> None:
        """A routing transaction failed: abort it and rewind, then pause before the batch is
        read and tried again, 0.5 s doubling to RETRY_CAP_S while they keep failing: one the
        broker refuses every time (a record over the topic's max.message.bytes, a missing
        ACL) would otherwise be tried again at once, with a warning each time, for as long as
        it lasts. Logged: the first failure of each kind, then every RETRY_LOG_EVERY-th
        (`Backoff`)."""
        if isinstance(exc, Stuck):
            reason, fatal = str(exc), True
        else:
            reason, fatal = str(exc.args[0]), exc.args[0].fatal()
        pause, log_it = self._aborts.failed(failure_kind(exc))
        if log_it:
            log.warning(
                "%s: transaction aborted (%d in a row, trying again in %.1fs; logged once per "
                "error and every %dth): %s",
                self.name,
                self._aborts.failures,
                pause,
                RETRY_LOG_EVERY,
                reason,
            )
        self._recover(reason, fatal=fatal, quiet=True)
        self._stop.wait(pause)

    def _committed_again(self) -> None:
        failures = self._aborts.succeeded()
        if failures:
            log.info("%s: a transaction committed after %d aborted", self.name, failures)

    def _event(self, msg: Message) -> Event:
        raw_key = msg.key()
        if raw_key is None:
            raise DecodeError("record has no key (events are keyed by aggregate id)")
        type_name, data = self.codec.decode(msg.value())
        key = raw_key.decode("utf-8", "replace")
        return Event(type_name, key, data, msg.topic(), msg.partition(), msg.offset(), 0, None, msg)

    def _transact(
        self,
        routed: list[tuple[bytes, Message, Event]],
        dead: list[tuple[Message, str]],
        nxt: dict[TP, int],
    ) -> None:
        producer = self._producer
        producer.begin_transaction()
        for key, msg, event in routed:
            headers = routed_headers(msg, event)
            self._produce(self.topic, msg.value(), key, headers, msg.timestamp()[1])
        for msg, reason in dead:
            log.warning("%s: dead-lettering %s[%d]@%d: %s", self.name, *_where(msg), reason)
            where = [
                ("refold_dlq_reason", reason.encode()),
                ("refold_dlq_projection", f"{self.projection.name}.v{self.version}".encode()),
                ("refold_dlq_topic", msg.topic().encode()),
                ("refold_dlq_partition", str(msg.partition()).encode()),
                ("refold_dlq_offset", str(msg.offset()).encode()),
            ]
            value, headers = msg.value(), [*(msg.headers() or ()), *where]
            size = envelope.record_size(msg.key(), value, headers)
            if size > MAX_EVENT_BYTES:  # refused too, for ever: the position finds the bytes
                dropped = f"value and headers left out: {size} bytes with them, over a record"
                value, headers = None, [*where, ("refold_dlq_dropped", dropped.encode())]
            self._produce(self.dlq_topic, value, msg.key(), headers, 0)
        offsets = [TopicPartition(t, p, o) for (t, p), o in nxt.items()]
        metadata = self._consumer.consumer_group_metadata()
        send = producer.send_offsets_to_transaction
        self._bounded(
            "send_offsets_to_transaction", lambda timeout: send(offsets, metadata, timeout)
        )
        self._bounded("commit_transaction", producer.commit_transaction)

    def _produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        headers: list[tuple[str, bytes | None]],
        timestamp: int,
    ) -> None:
        while True:
            try:
                self._producer.produce(topic, value, key, headers=headers, timestamp=timestamp)
                return
            except BufferError:  # the local queue is full: let deliveries drain it
                self._producer.poll(0.1)

    def _rewind(self) -> None:
        owned = self._consumer.assignment()
        if owned:
            committed = self._consumer.committed(owned, timeout=self.config.broker_timeout_s)
            for tp in committed:
                tp.offset = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
                self._consumer.seek(tp)

    # -- ownership --------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if consumer is not self._consumer:
            return  # a replaced consumer, closing
        """Recompute the links of each assigned partition up to its committed offset, then read
        it from there. (No transaction is open: each batch ends its own before the next poll.)"""
        committed = consumer.committed(partitions, timeout=self.config.broker_timeout_s)
        for tp in committed:
            if tp.offset < 0:
                tp.offset = OFFSET_BEGINNING
            self._links[(tp.topic, tp.partition)] = self._restore(tp)
            self._committed[(tp.topic, tp.partition)] = max(tp.offset, 0)
        consumer.incremental_assign(committed)
        log.info("%s assigned %s", self.name, [str(p) for p in committed])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if consumer is not self._consumer:
            return
        for tp in partitions:
            self._links.pop((tp.topic, tp.partition), None)
            self._committed.pop((tp.topic, tp.partition), None)
        consumer.incremental_unassign(partitions)

    def _restore(self, tp: TopicPartition) -> dict[str, str]:
        """The links of one source partition: `key()` of its events before `tp.offset`."""
        links: dict[str, str] = {}
        if tp.offset <= 0:
            return links
        reader = clients.consumer(self.config, f"{self._group}.restore")
        start = {(tp.topic, tp.partition): OFFSET_BEGINNING}
        until = {(tp.topic, tp.partition): tp.offset}
        try:  # (a broker that does not answer: LogReadError, and this stage fails)
            for batch in read_to_end(reader, start, until=until, stopped=self._stop.is_set):
                for msg in batch:
                    self.stats.restored += 1
                    try:
                        event = self._event(msg)
                        key = self.projection.key(event)
                    except Exception:  # a dead letter when it was first read
                        continue
                    if key is not None:
                        links[event.key] = key
        finally:
            reader.close()
        return links


def _where(msg: Message) -> tuple[str, int, int]:
    return msg.topic(), msg.partition(), msg.offset()


def _close_quietly(consumer: Consumer) -> None:
    try:
        consumer.close()
    except Exception as exc:  # it is gone either way; the group expires or fences it
        log.info("closing a replaced routing consumer: %s", exc)
