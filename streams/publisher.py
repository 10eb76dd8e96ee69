"""The publisher: idempotent, acks=all, Java-compatible murmur2 partitioning by aggregate id."""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from streams.config import Config
from streams.errors import PublishError
from streams.inputs import EventInput
from streams.registry import SchemaRegistry
from streams.serde import SPEC_VERSION, Codec, Headers, Position, now_rfc3339
from streams.topics import Topics

log = logging.getLogger(__name__)

PRODUCER_DEFAULTS: dict[str, object] = {
    "enable.idempotence": True,
    "acks": "all",
    # librdkafka's murmur2_random is the Java client's default partitioner for keyed records.
    "partitioner": "murmur2_random",
    "compression.type": "lz4",
    "linger.ms": 5,
    "batch.size": 1_000_000,
    "queue.buffering.max.messages": 500_000,
    "message.timeout.ms": 60_000,
}


class Publisher:
    """Appends events to topics; every call returns where they landed or raises PublishError."""

    def __init__(
        self,
        config: Config,
        codec: Codec,
        *,
        source: str | None = None,
        producer_conf: dict[str, object] | None = None,
    ) -> None:
        self.codec = codec
        self.source = source or f"refold://{socket.gethostname()}"
        self._topics = Topics(config)
        self._registry = SchemaRegistry(config, codec.catalog)
        # Event ids: a random per-publisher prefix and a counter, unique per source as CloudEvents
        # requires, and far cheaper than a uuid4 per event.
        self._id_prefix = f"{uuid.uuid4().hex[:20]}-".encode()
        self._sequence = 0
        self._static: dict[str, Headers] = {}
        self._producer = Producer(config.kafka(**{**PRODUCER_DEFAULTS, **(producer_conf or {})}))

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
        """Append already-validated events and wait until Kafka acknowledged every one."""
        self._topics.partitions(topic)  # a clear error instead of a minute-long delivery timeout
        for type_name in {e.type for e in events}:
            self._registry.ensure_registered(self.codec.writer_for(type_name), self._producer)
        placed: list[Position | None] = [None] * len(events)
        failures: list[tuple[int, str]] = []

        def on_delivery(index: int, err: KafkaError | None, msg: Message) -> None:
            # Once per record: the Position is made here, so no second pass over a million.
            if err is None:
                placed[index] = Position(topic, msg.partition(), msg.offset())
            else:
                failures.append((index, str(err)))

        # Per event only the id varies; the rest of the envelope is built once per call.
        now = now_rfc3339().encode()
        extra: Headers = []
        if correlation_id:
            extra.append(("ce_correlationid", correlation_id.encode()))
        if causation_id:
            extra.append(("ce_causationid", causation_id.encode()))
        constant = {
            t: [*self._static_headers(t), ("ce_time", now), *extra]
            for t in {e.type for e in events}
        }
        first_id = self._sequence
        self._sequence += len(events)
        prefix = self._id_prefix
        produce = self._producer.produce
        for i, event in enumerate(events):
            event_id = event_ids[i].encode() if event_ids else b"%s%x" % (prefix, first_id + i)
            headers = [("ce_id", event_id), *constant[event.type]]
            while True:
                try:
                    produce(
                        topic,
                        event.value,
                        event.key,
                        headers=headers,
                        on_delivery=partial(on_delivery, i),
                    )
                    break
                except BufferError:
                    self._producer.poll(0.05)  # local queue full: let deliveries drain
        remaining = self._producer.flush(120)
        if failures or remaining:
            index, reason = failures[0] if failures else (-1, f"{remaining} unacknowledged")
            where = f" (key {events[index].key!r})" if index >= 0 else ""
            raise PublishError(
                f"{len(failures) or remaining} of {len(events)} events not acknowledged by "
                f"{topic!r}{where}: {reason}",
                hint="check `refold broker status`; events after the first failure may be missing",
            )
        return placed  # type: ignore[return-value]  # every slot was filled (no failure)

    def _static_headers(self, type_name: str) -> Headers:
        headers = self._static.get(type_name)
        if headers is None:
            headers = self._static[type_name] = [
                ("ce_specversion", SPEC_VERSION.encode()),
                ("ce_type", type_name.encode()),
                ("ce_source", self.source.encode()),
            ]
        return headers

    def close(self) -> None:
        self._producer.flush(30)

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
