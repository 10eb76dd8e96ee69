"""`Publisher.publish_bulk`: the producer that reports failures only, on the real broker.

It must append exactly what `publish_encoded` would (same envelope, same placement), and it must
never lose a record quietly: a failed or refused record is a PublishError that says how many.
"""

from __future__ import annotations

import re
import threading
import time

import pytest
from confluent_kafka import Consumer, Message, TopicPartition
from confluent_kafka.admin import AdminClient
from refold.core.config import Config
from refold.core.errors import PublishError
from refold.core.inputs import EventInput
from refold.core.serde import Codec
from refold.kafka.publisher import Publisher
from refold.kafka.registry import codec_for
from refold.kafka.topics import Topics, event_topic, internal_topics

from tests.integration.test_publish_tail import java_murmur2_partition, make_events

#: Exactly the CloudEvents attributes DESIGN.md requires and the Kafka binding's content-type
#: (plus correlation when set).
ENVELOPE = {"ce_id", "ce_type", "ce_source", "ce_time", "ce_specversion", "content-type"}


def encoded(codec: Codec, n: int, accounts: int, seed: int = 7) -> list[EventInput]:
    return [
        EventInput(e["type"], e["key"], e["data"], codec.encode(e["type"], e["data"]))
        for e in make_events(n, accounts, seed)
    ]


def read_all(config: Config, topic: str, count: int) -> list[Message]:
    """Every record of `topic` (there must be `count`), as the raw Kafka messages."""
    consumer = Consumer(config.kafka(**{"group.id": "bulk-reader", "enable.auto.commit": False}))
    try:
        md = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign([TopicPartition(topic, p, 0) for p in md.partitions])
        out: list[Message] = []
        idle = 0
        while len(out) < count and idle < 20:
            batch = consumer.consume(1000, 0.5)
            idle = 0 if batch else idle + 1
            out += [m for m in batch if m.error() is None]
        return out
    finally:
        consumer.close()


def test_bulk_appends_the_same_envelope_and_placement_and_bounds_its_offsets(config, unique):
    topic = unique("bank")
    Topics(config).ensure([*internal_topics(config), event_topic(topic)])
    codec = codec_for(config)
    events = encoded(codec, 600, accounts=40)
    with Publisher(config, codec, source="refold://bulk-test") as publisher:
        summary = publisher.publish_bulk(topic, events, correlation_id="batch-1")
        [after] = publisher.publish_encoded(topic, events[:1])

    assert summary.topic == topic and summary.count == 600
    records = read_all(config, topic, 601)
    assert len(records) == 601
    [single] = [
        m for m in records if (m.partition(), m.offset()) == (after.partition, after.offset)
    ]
    bulk = [m for m in records if m is not single]
    # The summary's offsets are each partition's last one once the bulk call returned.
    last: dict[int, int] = {}
    for m in bulk:
        last[m.partition()] = max(m.offset(), last.get(m.partition(), -1))
    assert summary.last_offsets == last
    assert summary.min_offset == ",".join(f"{p}:{o}" for p, o in sorted(last.items()))

    ids = set()
    sent = sorted((e.key, e.value) for e in events)
    assert sorted((m.key().decode(), m.value()) for m in bulk) == sent
    for m in bulk:
        headers = dict(m.headers())
        assert set(headers) == ENVELOPE | {"ce_correlationid"}
        assert headers["ce_specversion"] == b"1.0"
        assert headers["content-type"] == b"application/avro"
        assert headers["ce_source"] == b"refold://bulk-test"
        assert headers["ce_correlationid"] == b"batch-1"
        assert headers["ce_type"].decode() == codec.decode(m.value())[0]
        assert m.partition() == java_murmur2_partition(m.key(), 6)
        ids.add(headers["ce_id"])
    single_headers = dict(single.headers())
    assert set(single_headers) == ENVELOPE
    assert len(ids) == 600 and single_headers["ce_id"] not in ids  # unique across both paths


def delete_topic(config: Config, topic: str) -> None:
    admin = AdminClient(config.kafka())  # held until the deletion is done
    admin.delete_topics([topic])[topic].result(30)


def not_acknowledged(caught: pytest.ExceptionInfo[PublishError], sent: int, topic: str) -> int:
    message = str(caught.value)
    found = re.search(rf"(\d+) of {sent} events not acknowledged by '{re.escape(topic)}'", message)
    assert found, message
    assert "first: key 'acc-" in message
    return int(found.group(1))


def test_bulk_to_a_deleted_topic_reports_every_event(config, unique):
    topic = unique("bank")
    Topics(config).ensure([*internal_topics(config), event_topic(topic, partitions=2)])
    codec = codec_for(config)
    events = encoded(codec, 3000, accounts=50)
    # A short delivery timeout only shortens the test: what fails is reported either way.
    publisher = Publisher(config, codec, producer_conf={"message.timeout.ms": 5000})
    with publisher, pytest.raises(PublishError) as caught:
        assert publisher.publish_bulk(topic, events[:10]).count == 10
        delete_topic(config, topic)  # after the publisher has seen the topic exist
        publisher.publish_bulk(topic, events)
    assert not_acknowledged(caught, 3000, topic) == 3000


def test_bulk_to_a_topic_deleted_midway_reports_what_did_not_land(config, unique):
    topic = unique("bank")
    Topics(config).ensure([*internal_topics(config), event_topic(topic, partitions=2)])
    codec = codec_for(config)
    events = encoded(codec, 200_000, accounts=500)
    landed = [0]

    def delete_once_some_landed() -> None:
        topics = Topics(config)
        while (landed_now := sum(topics.end_offsets(topic).values())) < 20_000:
            time.sleep(0.005)
        landed[0] = landed_now
        delete_topic(config, topic)

    deleter = threading.Thread(target=delete_once_some_landed, daemon=True)
    publisher = Publisher(config, codec, producer_conf={"message.timeout.ms": 5000})
    with publisher, pytest.raises(PublishError) as caught:
        deleter.start()
        publisher.publish_bulk(topic, events)
    deleter.join(30)
    # What had landed before the deletion is not reported; at least one event is.
    assert 1 <= not_acknowledged(caught, 200_000, topic) <= 200_000 - landed[0]


def test_an_event_the_producer_refuses_stops_the_call_with_a_publish_error(config, unique):
    topic = unique("bank")
    Topics(config).ensure([*internal_topics(config), event_topic(topic, partitions=1)])
    codec = codec_for(config)
    small, too_big, later = encoded(codec, 3, accounts=3)
    huge = {**too_big.data, "memo": "x" * 1_100_000}  # over librdkafka's message.max.bytes
    too_big = EventInput(too_big.type, "acc-huge", huge, codec.encode(too_big.type, huge))
    publisher = Publisher(config, codec)
    with publisher, pytest.raises(PublishError) as caught:
        publisher.publish_bulk(topic, [small, too_big, later])
    # The refused event and the one never sent after it are counted; the first one landed.
    assert f"2 of 3 events not acknowledged by '{topic}' (first: key 'acc-huge')" in str(
        caught.value
    )
    assert "refused by the producer" in str(caught.value)
    # What came before the refused event was appended; nothing after it was.
    assert [m.key().decode() for m in read_all(config, topic, 1)] == [small.key]
