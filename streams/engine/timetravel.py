"""As-of queries: fold one key's events up to a point in time, straight from the log.

Cost: the key's partition is read from its first offset up to the first offset at or after the
time (found with Kafka's offsets-for-times index), and only records with the key are decoded and
folded, so an as-of query costs one sequential read of that partition prefix — no extra storage.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from refold.core.config import Config
from refold.core.errors import DecodeError, InputError, ProjectionError
from refold.core.projection import Projection
from refold.core.serde import Codec, Event
from refold.engine.tail import event_from_message
from refold.kafka import clients
from refold.kafka.log import read_to_end, topic_partitions, watermarks


def murmur2_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's Java client (and librdkafka's murmur2_random) picks for a key."""
    m, seed = 0x5BD1E995, 0x9747B28C
    length = len(key)
    h = (seed ^ length) & 0xFFFFFFFF
    whole = length - length % 4
    for i in range(0, whole, 4):
        k = (int.from_bytes(key[i : i + 4], "little") * m) & 0xFFFFFFFF
        k ^= k >> 24
        h = ((h * m) & 0xFFFFFFFF) ^ ((k * m) & 0xFFFFFFFF)
    rest = length % 4
    if rest == 3:
        h ^= key[whole + 2] << 16
    if rest >= 2:
        h ^= key[whole + 1] << 8
    if rest >= 1:
        h ^= key[whole]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return (h & 0x7FFFFFFF) % partitions


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise InputError(
            f"as-of time {text!r} is not an ISO-8601 time", hint="e.g. 2026-11-26T14:00:00Z"
        ) from exc
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    if moment < EPOCH:  # Kafka timestamps start there; the broker refuses a lookup before it
        raise InputError(
            f"as-of time {text!r} is before 1970-01-01T00:00:00Z, older than any event",
            hint="e.g. 2026-11-26T14:00:00Z",
        )
    return moment


@dataclass(frozen=True, slots=True)
class AsOf:
    key: str
    state: Any
    position: dict[str, int]  # "topic:partition" -> next offset folded up to
    events: int


def fold_as_of(
    config: Config, codec: Codec, projection: Projection, key: str, moment: datetime
) -> AsOf:
    """The state `key` had at `moment`: its events with a timestamp before it, folded."""
    if projection.rekeys:
        raise ProjectionError(
            f"projection {projection.name!r} re-keys events; as-of queries need projections "
            "keyed by aggregate id"
        )
    ms = int(moment.timestamp() * 1000)
    raw_key = key.encode()
    consumer = clients.consumer(config, config.group("as-of"))
    state = None
    folded = 0
    position: dict[str, int] = {}
    try:
        for topic in projection.topics:
            tp, start, stop = _prefix_before(consumer, topic, raw_key, ms)
            position[f"{topic}:{tp[1]}"] = stop
            timeout = config.broker_timeout_s
            for event in _events_of(consumer, codec, tp, start, stop, raw_key, timeout):
                state = projection.apply(projection.initial(key) if state is None else state, event)
                folded += 1
    finally:
        consumer.close()
    return AsOf(key, state, position, folded)


def _prefix_before(
    consumer: Consumer, topic: str, raw_key: bytes, ms: int
) -> tuple[tuple[str, int], int, int]:
    """The key's partition of `topic` and the offsets [start, stop) written before `ms`."""
    partition = murmur2_partition(raw_key, len(topic_partitions(consumer, topic)))
    tp = (topic, partition)
    low, high = watermarks(consumer, [tp])[tp]
    found = consumer.offsets_for_times([TopicPartition(topic, partition, ms)], 10)[0]
    stop = high if found.offset < 0 else found.offset  # -1: nothing at or after `ms`
    return tp, low, stop


def _events_of(
    consumer: Consumer,
    codec: Codec,
    tp: tuple[str, int],
    start: int,
    stop: int,
    raw_key: bytes,
    timeout: float,
) -> Iterator[Event]:
    """The decodable events of one key in offsets [start, stop) of its partition."""
    if stop <= start:
        return
    for batch in read_to_end(consumer, {tp: start}, until={tp: stop}, timeout=timeout):
        for msg in batch:
            if msg.key() != raw_key:
                continue
            try:
                yield event_from_message(codec, msg)
            except DecodeError:
                continue  # the live projection dead-lettered it too
