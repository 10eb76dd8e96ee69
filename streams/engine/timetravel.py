"""As-of queries: fold one key's events up to a point in time, straight from the log.

Cost: the key's partition is read from its first offset up to the first offset at or after the
time (found with Kafka's offsets-for-times index), and only records with the key are decoded and
folded, so an as-of query costs one sequential read of that partition prefix — no extra storage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from refold.core.config import Config
from refold.core.errors import BrokerError, DecodeError, InputError, ProjectionError
from refold.core.projection import Projection
from refold.core.serde import Codec
from refold.engine.tail import event_from_message
from refold.kafka import clients


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


def _stopped(
    config: Config, consumer: Consumer, topic: str, partition: int, stop: int, since: float
) -> bool:
    """Nothing came: True when the read is at `stop` (transaction markers below it are never
    delivered); BrokerError when it is not and nothing came for REFOLD_BROKER_TIMEOUT (a state
    folded from part of the events would be a wrong answer, not a partial one)."""
    [at] = consumer.position([TopicPartition(topic, partition)])
    if at.offset >= stop:
        return True
    if time.monotonic() - since >= config.broker_timeout_s:
        raise BrokerError(
            f"as-of read of {topic}[{partition}] stopped at offset {at.offset} of {stop}: "
            f"nothing came for {config.broker_timeout_s:.0f} s from {config.bootstrap_servers}",
            hint="is the broker running? `refold broker status` (REFOLD_BROKER_TIMEOUT: the wait)",
        )
    return False


def parse_time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise InputError(
            f"as-of time {text!r} is not an ISO-8601 time", hint="e.g. 2026-11-26T14:00:00Z"
        ) from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


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
            md = consumer.list_topics(topic, timeout=10).topics[topic]
            partition = murmur2_partition(raw_key, len(md.partitions))
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), 10)
            found = consumer.offsets_for_times([TopicPartition(topic, partition, ms)], 10)[0]
            stop = high if found.offset < 0 else found.offset  # -1: nothing at or after `moment`
            position[f"{topic}:{partition}"] = stop
            if stop <= low:
                continue
            consumer.assign([TopicPartition(topic, partition, low)])
            done = False
            quiet_since = time.monotonic()
            while not done:
                # consume(n, timeout) would wait for n records: take one, then what is fetched.
                first = consumer.poll(1.0)
                batch = [first, *consumer.consume(1000, 0)] if first is not None else [None]
                for msg in batch:
                    if msg is None:
                        done = _stopped(config, consumer, topic, partition, stop, quiet_since)
                        break
                    quiet_since = time.monotonic()
                    if msg.error() is not None:
                        continue
                    if msg.offset() >= stop:
                        done = True
                        break
                    if msg.key() == raw_key:
                        try:
                            event = event_from_message(codec, msg)
                        except DecodeError:
                            event = None  # the live projection dead-lettered it too
                        if event is not None:
                            if state is None:
                                state = projection.initial(key)
                            state = projection.apply(state, event)
                            folded += 1
                    if msg.offset() + 1 >= stop:
                        done = True
                        break
    finally:
        consumer.close()
    return AsOf(key, state, position, folded)
