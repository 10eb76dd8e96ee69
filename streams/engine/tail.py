"""Reading topics back as decoded events: the shared decode step and `refold tail`."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Generator, Iterator
from contextlib import closing
from dataclasses import dataclass
from itertools import islice
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from refold.core import envelope
from refold.core.config import Config
from refold.core.errors import BrokerError, DecodeError, TopicError
from refold.core.serde import Codec, Event
from refold.kafka import clients
from refold.kafka.log import read_to_end, topic_partitions

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BadRecord:
    """A record that is not a decodable refold event, with its position and the reason."""

    topic: str
    partition: int
    offset: int
    reason: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]

    def to_json(self) -> dict[str, Any]:
        return {
            "error": self.reason,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
        }


def event_from_message(codec: Codec, msg: Message) -> Event:
    """Decode one consumed record; DecodeError names what is wrong (callers add the position)."""
    type_name, data = codec.decode(msg.value())
    raw_key = msg.key()
    if raw_key is None:
        raise DecodeError("record has no key (events are keyed by aggregate id)")
    return Event(
        type_name,
        raw_key.decode("utf-8", "replace"),
        data,
        msg.topic(),
        msg.partition(),
        msg.offset(),
        record=msg,
    )


def bad_record(msg: Message, reason: str) -> BadRecord:
    return BadRecord(
        msg.topic(),
        msg.partition(),
        msg.offset(),
        reason,
        msg.key(),
        msg.value(),
        list(msg.headers() or []),
    )


def tail(
    config: Config,
    codec: Codec,
    topic: str,
    *,
    from_beginning: bool = False,
    follow: bool = True,
    limit: int | None = None,
    poll_timeout: float = 1.0,
) -> Iterator[Event | BadRecord]:
    """Yield the topic's records in order per partition; undecodable ones as BadRecord.

    Without `follow`, stops at the end offsets seen when it started.
    """
    consumer = clients.consumer(config, config.group("tail", uuid.uuid4().hex[:8]))
    try:
        numbers = topic_partitions(consumer, topic)
        if follow:
            records = _follow(config, consumer, topic, numbers, from_beginning, poll_timeout)
        else:
            records = _to_end(consumer, topic, numbers, from_beginning, config.broker_timeout_s)
        with closing(records):  # the reader unassigns before the consumer closes
            for msg in islice(records, limit):
                try:
                    yield event_from_message(codec, msg)
                except DecodeError as exc:
                    yield bad_record(msg, str(exc))
    finally:
        consumer.close()


def _to_end(
    consumer: Consumer, topic: str, numbers: list[int], from_beginning: bool, timeout: float
) -> Generator[Message, None, None]:
    """The records up to the ends of the moment (none when starting at the end)."""
    if not from_beginning:
        return
    starts = {(topic, p): OFFSET_BEGINNING for p in numbers}
    for batch in read_to_end(consumer, starts, timeout=timeout):
        yield from batch


def _follow(
    config: Config,
    consumer: Consumer,
    topic: str,
    numbers: list[int],
    from_beginning: bool,
    poll_timeout: float,
) -> Generator[Message, None, None]:
    """Every record from the start (or the end) on, as it arrives, until the caller stops, or
    until nothing came for REFOLD_BROKER_TIMEOUT and the broker does not answer (BrokerError):
    a quiet topic is no reason to stop, a broker gone for good is."""
    start = OFFSET_BEGINNING if from_beginning else OFFSET_END
    consumer.assign([TopicPartition(topic, p, start) for p in numbers])
    quiet_since = time.monotonic()
    while True:
        msg = consumer.poll(poll_timeout)
        if msg is None:
            if time.monotonic() - quiet_since >= config.broker_timeout_s:
                _still_there(config, consumer, topic)
                quiet_since = time.monotonic()
            continue
        if msg.error():
            if msg.error().code() != KafkaError._PARTITION_EOF:
                log.warning("consume error on %s: %s", topic, msg.error())
            continue
        quiet_since = time.monotonic()
        yield msg


def _still_there(config: Config, consumer: Consumer, topic: str) -> None:
    """BrokerError unless the broker answers a metadata request."""
    try:
        consumer.list_topics(topic, timeout=5)
    except KafkaException as exc:
        raise BrokerError(
            f"following {topic}: nothing came for {config.broker_timeout_s:.0f} s and the broker "
            f"at {config.bootstrap_servers} does not answer: {exc}",
            hint="is the broker running? `refold broker status` (REFOLD_BROKER_TIMEOUT: the wait)",
        ) from exc


def dead_letters(
    config: Config, projection: str, *, limit: int | None = None
) -> Iterator[dict[str, Any]]:
    """The dead-letter records of a projection: reason, original position, key and raw bytes."""
    from refold.engine.runtime import dead_letter_topic_name

    topic = dead_letter_topic_name(config, projection)
    consumer = clients.consumer(config, config.group("dlq-reader"))
    try:
        try:
            numbers = topic_partitions(consumer, topic)
        except TopicError:
            return  # nothing was ever dead-lettered
        starts = {(topic, p): OFFSET_BEGINNING for p in numbers}
        batches = read_to_end(consumer, starts)
        with closing(batches):  # the reader unassigns before the consumer closes
            records = (msg for batch in batches for msg in batch)
            for msg in islice(records, limit):
                yield dead_letter(msg)
    finally:
        consumer.close()


def dead_letter(msg: Message) -> dict[str, Any]:
    """A dead-letter record as `refold dead-letters` shows it."""
    h = envelope.read(msg.headers())
    return {
        "reason": h.get("refold_dlq_reason"),
        "projection": h.get("refold_dlq_projection"),
        "topic": h.get("refold_dlq_topic"),
        "partition": int(h.get("refold_dlq_partition", -1)),
        "offset": int(h.get("refold_dlq_offset", -1)),
        "key": (msg.key() or b"").decode("utf-8", "replace"),
        "value_hex": (msg.value() or b"").hex(),
        "dlq_offset": msg.offset(),
        # Set when the record was too large to dead-letter whole: what is left out, and that it
        # stays at the position above.
        "dropped": h.get("refold_dlq_dropped"),
    }
