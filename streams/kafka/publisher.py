"""The publisher: idempotent, acks=all, Java-compatible murmur2 partitioning by aggregate id.

Two ways to append, one envelope. `publish_encoded` (and `publish`, `publish_many`) waits for a
delivery report per event and returns each event's `Position`, as the HTTP API and single
publishes need. `publish_bulk` is for files and backfills: its producer reports failures only
(`delivery.report.only.error`), so a landed record costs no report, no Python callback and no
`Message` copy of its key, value and headers; it still raises PublishError when any record fails.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import repeat
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from refold.core import envelope
from refold.core.config import Config
from refold.core.envelope import Headers
from refold.core.errors import PublishError
from refold.core.inputs import EncodedBatch, EventInput
from refold.core.serde import Codec, Position
from refold.kafka import clients
from refold.kafka.registry import SchemaRegistry, codec_for
from refold.kafka.topics import Topics

log = logging.getLogger(__name__)

#: The settings of every refold producer, for raw baselines that must match them (bench, tests).
PRODUCER_DEFAULTS: dict[str, object] = {**clients.PRODUCER_REQUIRED, **clients.PRODUCER_TUNING}

#: What the bulk producer adds: delivery reports for failed records only. Durability is the same
#: (acks=all, idempotent); only the acknowledgement of each landed record stays inside librdkafka.
BULK_PRODUCER_CONF: dict[str, bool] = {"delivery.report.only.error": True}

DeliveryCallback = Callable[[KafkaError | None, Message], None]

#: glibc's mallopt parameter for the largest fastbin chunk, and its default on 64-bit.
M_MXFAST = 1
DEFAULT_MXFAST = 128


def tune_allocator(max_fast: int = 0) -> bool:
    """Set glibc's fastbin limit for this process (0: no fastbins); False where there is none.

    librdkafka frees each record's header chunks on its broker thread; glibc parks such small
    frees in fastbins, and the next large allocation consolidates them all at once (0.43 s after
    a 1M-event publish_bulk). Without fastbins they are coalesced as they are freed. Measured
    with 1M events in one process: publish_bulk 212k -> 265k events/s, publish_encoded 149k ->
    171k, a bare producer 381k -> 426k. A process-wide setting: `refold publish` makes it, the
    library never does on its own; `tune_allocator(DEFAULT_MXFAST)` restores glibc's default.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS has no mallopt)
        return False
    return bool(mallopt(M_MXFAST, max_fast))


@dataclass(frozen=True, slots=True)
class PublishSummary:
    """What `publish_bulk` appended: `count` events to `topic`, every one acknowledged.

    `last_offsets` maps each non-empty partition to its last offset once they were: every event of
    the call sits at or below it (so may other writers' records), which makes it a read-your-writes
    bound — a projection that folded these offsets has folded the whole call.
    """

    topic: str
    count: int
    last_offsets: Mapping[int, int]

    @property
    def min_offset(self) -> str:
        """`last_offsets` as the query API's `min_offset=P:O,...` parameter."""
        return ",".join(f"{p}:{o}" for p, o in sorted(self.last_offsets.items()))


class Publisher:
    """Appends events to topics; every call says where they landed or raises PublishError.

    Calls are meant to come one at a time (each ends with a flush); the HTTP server serialises its
    publishes for that reason.
    """

    def __init__(
        self,
        config: Config,
        codec: Codec | None = None,
        *,
        source: str | None = None,
        producer_conf: dict[str, object] | None = None,
    ) -> None:
        codec = self.codec = codec or codec_for(config)
        self.source = source or envelope.default_source()
        self._topics = Topics(config)
        self._registry = SchemaRegistry(config, codec.catalog)
        # Event ids: a random per-publisher prefix and a counter, unique per source as CloudEvents
        # requires, and far cheaper than a uuid4 per event.
        self._id_format = f"{uuid.uuid4().hex[:20]}-".encode() + b"%x"
        self._sequence = 0
        self._config = config
        self._producer_conf = dict(producer_conf or {})
        # Made on first use: a CLI file publish needs no reporting producer, a POST no bulk one.
        self._producers: dict[bool, Producer] = {}
        self._producers_lock = threading.Lock()

    def publish(
        self,
        topic: str,
        type_name: str,
        key: str,
        data: dict[str, Any],
        *,
        event_id: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
    ) -> Position:
        value = self.codec.encode(type_name, data)
        event = EventInput(type_name, key, data, value)
        return self.publish_encoded(
            topic,
            [event],
            event_ids=[event_id] if event_id else None,
            correlation_id=correlation_id,
            causation_id=causation_id,
        )[0]

    def publish_many(
        self, topic: str, events: Iterable[tuple[str, str, dict[str, Any]]]
    ) -> list[Position]:
        """Encode and append `(type, key, data)` triples; positions come back in input order."""
        encoded = [EventInput(t, k, d, self.codec.encode(t, d)) for t, k, d in events]
        return self.publish_encoded(topic, encoded)

    def publish_encoded(
        self,
        topic: str,
        events: Sequence[EventInput],
        *,
        event_ids: Sequence[str] | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
    ) -> list[Position]:
        """Append already-validated events, wait until Kafka acknowledged every one, and return
        each event's position in input order."""
        if event_ids is not None and len(event_ids) != len(events):
            raise ValueError(f"{len(event_ids)} event ids for {len(events)} events")
        producer = self._prepare(topic, events, bulk=False)
        placed: list[Position | None] = [None] * len(events)
        failures: list[tuple[bytes | None, str]] = []

        def on_delivery(index: int, err: KafkaError | None, msg: Message) -> None:
            # Once per record: the Position is made here, so no second pass over a million.
            if err is None:
                placed[index] = Position(topic, msg.partition(), msg.offset())
            else:
                failures.append((msg.key(), str(err)))

        ids = (i.encode() for i in event_ids) if event_ids else self._new_ids(len(events))
        callbacks = map(partial, repeat(on_delivery), range(len(events)))
        remaining = self._send(
            producer, topic, events, ids, callbacks, failures, correlation_id, causation_id
        )
        _check(topic, len(events), failures, remaining)
        return placed  # type: ignore[return-value]  # every slot was filled (no failure)

    def publish_bulk(
        self,
        topic: str,
        events: Sequence[EventInput],
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
    ) -> PublishSummary:
        """Append already-validated events and wait until Kafka acknowledged every one, without a
        position per event: the fast path for files and backfills. Raises PublishError naming how
        many events were not acknowledged if any was not."""
        if not events:
            return PublishSummary(topic, 0, {})
        producer = self._prepare(topic, events, bulk=True)
        failures: list[tuple[bytes | None, str]] = []

        def on_failure(err: KafkaError | None, msg: Message) -> None:
            if err is not None:  # the bulk producer reports nothing else; stay safe if it did
                failures.append((msg.key(), str(err)))

        remaining = self._send(
            producer,
            topic,
            events,
            self._new_ids(len(events)),
            repeat(on_failure, len(events)),
            failures,
            correlation_id,
            causation_id,
        )
        _check(topic, len(events), failures, remaining)
        ends = self._topics.end_offsets(topic)
        return PublishSummary(topic, len(events), {p: e - 1 for p, e in ends.items() if e > 0})

    def warm_up(self) -> None:
        """Make the bulk producer now: it connects and gets its idempotent producer id in
        librdkafka's threads (about a second on a local broker) while the caller does other work,
        e.g. `refold publish --file` parsing the file. Sends nothing."""
        self._producer(True)

    def publish_batches(
        self,
        topic: str,
        batches: Sequence[EncodedBatch],
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
    ) -> PublishSummary:
        """`publish_bulk` for events in `EncodedBatch` columns (what `refold publish --file`
        reads), in order: no `EventInput` per event is made. Same producer, envelope and
        guarantees; raises PublishError unless every event was acknowledged."""
        count = sum(len(b) for b in batches)
        if not count:
            return PublishSummary(topic, 0, {})
        types = {t for b in batches for t in set(b.types)}
        self._topics.partitions(topic)  # a clear error instead of a minute-long delivery timeout
        producer = self._producer(True)
        for type_name in types:
            self._registry.ensure_registered(self.codec.writer_for(type_name), producer)
        failures: list[tuple[bytes | None, str]] = []

        def on_failure(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                failures.append((msg.key(), str(err)))

        now = envelope.now_rfc3339()
        envelopes: dict[str, Headers] = {
            t: envelope.template(
                t,
                source=self.source,
                time=now,
                correlation_id=correlation_id,
                causation_id=causation_id,
            )
            for t in types
        }
        slot, ce_id = envelope.ID_SLOT, envelope.ID
        produce, poll, next_id = producer.produce, producer.poll, self._new_ids(count).__next__
        sent = 0
        for batch in batches:  # a measured hot loop: one produce() per event, as in _send
            for type_name, key, value in zip(batch.types, batch.keys, batch.values, strict=True):
                headers = envelopes[type_name]
                headers[slot] = (ce_id, next_id())
                while True:
                    try:
                        produce(topic, value, key, headers=headers, on_delivery=on_failure)
                        break
                    except BufferError:
                        poll(0.05)  # local queue full: let librdkafka send some
                    except KafkaException as exc:  # refused before sending (too large)
                        reason = f"refused by the producer: {exc.args[0].str()}"
                        failures.append((key.encode(), reason))
                        unsent = count - sent - 1
                        _check(topic, count, failures, producer.flush(120) + unsent)  # raises
                sent += 1
        _check(topic, count, failures, producer.flush(120))
        ends = self._topics.end_offsets(topic)
        return PublishSummary(topic, count, {p: e - 1 for p, e in ends.items() if e > 0})

    def _prepare(self, topic: str, events: Sequence[EventInput], *, bulk: bool) -> Producer:
        """The producer for the call, once the topic exists and its writer schemas are durable."""
        self._topics.partitions(topic)  # a clear error instead of a minute-long delivery timeout
        producer = self._producer(bulk)
        for type_name in {e.type for e in events}:
            self._registry.ensure_registered(self.codec.writer_for(type_name), producer)
        return producer

    def _send(
        self,
        producer: Producer,
        topic: str,
        events: Sequence[EventInput],
        ids: Iterator[bytes],
        callbacks: Iterator[DeliveryCallback],
        failures: list[tuple[bytes | None, str]],
        correlation_id: str | None,
        causation_id: str | None,
    ) -> int:
        """Produce every event with its envelope and flush. Returns how many were never sent or
        are still unacknowledged; failed records are in `failures` (from the callbacks)."""
        now = envelope.now_rfc3339()
        # One header list per event type, reused: produce() copies the headers into librdkafka
        # before it returns, so per record only the id slot is replaced.
        envelopes: dict[str, Headers] = {
            t: envelope.template(
                t,
                source=self.source,
                time=now,
                correlation_id=correlation_id,
                causation_id=causation_id,
            )
            for t in {e.type for e in events}
        }
        slot, ce_id = envelope.ID_SLOT, envelope.ID
        produce, poll = producer.produce, producer.poll
        for index, (event, event_id, on_delivery) in enumerate(
            zip(events, ids, callbacks, strict=True)
        ):
            headers = envelopes[event.type]
            headers[slot] = (ce_id, event_id)
            while True:
                try:
                    produce(topic, event.value, event.key, headers=headers, on_delivery=on_delivery)
                    break
                except BufferError:
                    poll(0.05)  # local queue full: let librdkafka send (and report) some
                except KafkaException as exc:  # refused before sending, e.g. over message.max.bytes
                    reason = f"refused by the producer: {exc.args[0].str()}"
                    failures.append((event.key.encode(), reason))
                    return producer.flush(120) + len(events) - index - 1  # the rest: not sent
        return producer.flush(120)

    def _new_ids(self, count: int) -> Iterator[bytes]:
        first = self._sequence
        self._sequence += count
        return map(self._id_format.__mod__, range(first, first + count))

    def _producer(self, bulk: bool) -> Producer:
        with self._producers_lock:
            producer = self._producers.get(bulk)
            if producer is None:
                conf = self._producer_conf
                producer = self._producers[bulk] = (
                    clients.producer(self._config, defaults=conf, required=BULK_PRODUCER_CONF)
                    if bulk
                    else clients.producer(self._config, defaults=conf)
                )
            return producer

    def close(self) -> None:
        for producer in self._producers.values():
            producer.flush(30)

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _check(topic: str, sent: int, failures: list[tuple[bytes | None, str]], remaining: int) -> None:
    """PublishError unless every one of `sent` records was acknowledged."""
    if not failures and not remaining:
        return
    missing = len(failures) + remaining
    if failures:
        key, reason = failures[0]
        where = f" (first: key {key.decode('utf-8', 'replace')!r})" if key is not None else ""
    else:
        where, reason = "", f"{remaining} still unacknowledged after the flush timeout"
    raise PublishError(
        f"{missing} of {sent} events not acknowledged by {topic!r}{where}: {reason}",
        hint="check `refold broker status`; events after the first failure may be missing",
    )
