"""Reading topics back as decoded events: the shared decode step and `refold tail`."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
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
from refold.core.config import Config
from refold.core.errors import BrokerError, DecodeError, TopicError
from refold.core.serde import Codec, Event
from refold.kafka import clients

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
        md = consumer.list_topics(topic, timeout=10)
        tmd = md.topics.get(topic)
        if tmd is None or tmd.error is not None or not tmd.partitions:
            raise TopicError(f"topic {topic!r} does not exist", hint="`refold topics ensure`")
        start = OFFSET_BEGINNING if from_beginning else OFFSET_END
        partitions = sorted(tmd.partitions)
        ends: dict[int, int] = {}
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > (low if from_beginning else high):
                ends[p] = high
        consumer.assign([TopicPartition(topic, p, start) for p in partitions])
        count = 0
        # Since when nothing came: after REFOLD_BROKER_TIMEOUT, is the broker still there?
        quiet_since: float | None = None
        while limit is None or count < limit:
            if not follow and not ends:
                return
            msg = consumer.poll(poll_timeout)
            if msg is None:
                if not follow:  # transaction markers sit below the high watermark, never delivered
                    for tp in consumer.position([TopicPartition(topic, p) for p in ends]):
                        if tp.offset >= ends[tp.partition]:
                            del ends[tp.partition]
                quiet_since = quiet_since or time.monotonic()
                if _give_up_if_gone(config, consumer, topic, quiet_since, follow and not ends):
                    quiet_since = None  # following a quiet topic on a broker that answers
                continue
            if msg.error():
                if msg.error().code() != KafkaError._PARTITION_EOF:
                    log.warning("consume error on %s: %s", topic, msg.error())
                continue
            quiet_since = None
            if msg.partition() in ends and msg.offset() + 1 >= ends[msg.partition()]:
                del ends[msg.partition()]
            count += 1
            try:
                yield event_from_message(codec, msg)
            except DecodeError as exc:
                yield bad_record(msg, str(exc))
    finally:
        consumer.close()


def _give_up_if_gone(
    config: Config, consumer: Consumer, topic: str, since: float, idle_ok: bool
) -> bool:
    """BrokerError once nothing came for `config.broker_timeout_s` and the broker does not
    answer a metadata request either, or, with records still due (`idle_ok` False), even if
    it does. True when it answered and quiet is fine (following a topic nobody writes)."""
    if time.monotonic() - since < config.broker_timeout_s:
        return False
    try:
        consumer.list_topics(topic, timeout=5)
        if idle_ok:
            return True
        answer = "answers, yet nothing more was delivered"
    except KafkaException as exc:
        answer = f"does not answer: {exc.args[0].str() if exc.args else exc}"
    raise BrokerError(
        f"reading {topic}: nothing came for {config.broker_timeout_s:.0f} s and the broker at "
        f"{config.bootstrap_servers} {answer}",
        hint="is the broker running? `refold broker status` (REFOLD_BROKER_TIMEOUT sets the wait)",
    )


def dead_letters(
    config: Config, projection: str, *, limit: int | None = None
) -> Iterator[dict[str, Any]]:
    """The dead-letter records of a projection: reason, original position, key and raw bytes."""
    from refold.engine.runtime import dead_letter_topic_name

    topic = dead_letter_topic_name(config, projection)
    consumer = clients.consumer(config, config.group("dlq-reader"))
    try:
        md = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if md is None or md.error is not None:
            return
        ends = {}
        for p in md.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = high
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        count = 0
        while ends and (limit is None or count < limit):
            msg = consumer.poll(2.0)
            if msg is None:
                break
            if msg.error():
                continue
            if msg.offset() + 1 >= ends.get(msg.partition(), 0):
                ends.pop(msg.partition(), None)
            h = {k: v.decode("utf-8", "replace") for k, v in (msg.headers() or []) if v is not None}
            count += 1
            yield {
                "reason": h.get("refold_dlq_reason"),
                "projection": h.get("refold_dlq_projection"),
                "topic": h.get("refold_dlq_topic"),
                "partition": int(h.get("refold_dlq_partition", -1)),
                "offset": int(h.get("refold_dlq_offset", -1)),
                "key": (msg.key() or b"").decode("utf-8", "replace"),
                "value_hex": (msg.value() or b"").hex(),
                "dlq_offset": msg.offset(),
            }
    finally:
        consumer.close()
