"""`refold.kafka.log.read_to_end` against the real broker: plain, transactional and empty
partitions, explicit ends, ends fixed when the call starts, and errors instead of hangs."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer
from refold.core.config import Config
from refold.core.errors import LogReadError, TopicError
from refold.kafka import log
from refold.kafka.topics import Topics, event_topic

TP = tuple[str, int]


@pytest.fixture
def topic(config: Config, unique: Callable[[str], str]) -> str:
    name = unique("log")
    Topics(config).ensure([event_topic(name, partitions=3)])
    return name


@pytest.fixture
def reader(config: Config) -> Iterator[Callable[..., Consumer]]:
    made: list[Consumer] = []

    def make(isolation: str = "read_committed", **extra: object) -> Consumer:
        conf = config.kafka(
            **{
                "group.id": f"log-test-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "isolation.level": isolation,
                **extra,
            }
        )
        made.append(Consumer(conf))
        return made[-1]

    yield make
    for consumer in made:
        consumer.close()


def produce(config: Config, topic: str, partition: int, values: list[bytes]) -> None:
    producer = Producer(config.kafka(**{"enable.idempotence": True, "acks": "all"}))
    for value in values:
        producer.produce(topic, value, b"k", partition=partition)
    assert producer.flush(30) == 0


def transactional(config: Config) -> Producer:
    producer = Producer(
        config.kafka(**{"transactional.id": f"log-test-{uuid.uuid4().hex[:8]}", "acks": "all"})
    )
    producer.init_transactions(30)
    return producer


def wait_for_end(consumer: Consumer, tp: TP, end: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while log.end_offsets(consumer, [tp])[tp] != end:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def read_all(consumer: Consumer, starts: dict[TP, int], **kwargs: object) -> list[tuple]:
    return [
        (m.topic(), m.partition(), m.offset(), m.value())
        for batch in log.read_to_end(consumer, starts, **kwargs)  # type: ignore[arg-type]
        for m in batch
    ]


def everything(topic: str) -> dict[TP, int]:
    return {(topic, p): OFFSET_BEGINNING for p in range(3)}


def test_reads_each_partition_to_its_end_and_skips_an_empty_one(
    config: Config, topic: str, reader: Callable[..., Consumer]
) -> None:
    produce(config, topic, 0, [b"a0", b"a1", b"a2"])
    produce(config, topic, 1, [b"b0"])  # partition 2 stays empty
    started = time.monotonic()
    got = read_all(reader(), everything(topic))
    assert time.monotonic() - started < 10
    assert sorted(got) == [
        (topic, 0, 0, b"a0"),
        (topic, 0, 1, b"a1"),
        (topic, 0, 2, b"a2"),
        (topic, 1, 0, b"b0"),
    ]
    # From given offsets: only what follows them.
    assert read_all(reader(), {(topic, 0): 2, (topic, 1): 1, (topic, 2): 0}) == [
        (topic, 0, 2, b"a2")
    ]


def test_an_empty_topic_returns_at_once(
    config: Config, topic: str, reader: Callable[..., Consumer]
) -> None:
    consumer = reader()
    started = time.monotonic()
    assert read_all(consumer, everything(topic)) == []
    assert time.monotonic() - started < 5
    assert consumer.assignment() == []


def test_the_ends_are_those_of_the_moment_the_call_started(
    config: Config, topic: str, reader: Callable[..., Consumer]
) -> None:
    produce(config, topic, 0, [b"x%d" % i for i in range(5)])
    batches = log.read_to_end(reader(), {(topic, 0): OFFSET_BEGINNING}, batch_size=1)
    first = next(batches)
    produce(config, topic, 0, [b"later"] * 5)  # after the call started: not read
    rest = [m.offset() for batch in batches for m in batch]
    assert [m.offset() for m in first] + rest == [0, 1, 2, 3, 4]


def test_explicit_ends_stop_early(
    config: Config, topic: str, reader: Callable[..., Consumer]
) -> None:
    produce(config, topic, 1, [b"v%d" % i for i in range(10)])
    got = read_all(reader(), {(topic, 1): 2}, until={(topic, 1): 6})
    assert [offset for _t, _p, offset, _v in got] == [2, 3, 4, 5]


def test_a_partition_ending_in_a_commit_marker_ends_by_position(
    config: Config, topic: str, reader: Callable[..., Consumer]
) -> None:
    producer = transactional(config)
    producer.begin_transaction()
    for i in range(4):
        producer.produce(topic, b"t%d" % i, b"k", partition=2)
    producer.commit_transaction(30)
    consumer = reader()
    # commit_transaction returns once the coordinator decided; the marker lands a moment later
    # (until then the partition's last stable offset stays below the transaction).
    assert wait_for_end(consumer, (topic, 2), 5)  # four records and the commit marker at 4
    started = time.monotonic()
    got = read_all(consumer, {(topic, 2): OFFSET_BEGINNING}, timeout=5.0)
    assert [value for *_where, value in got] == [b"t0", b"t1", b"t2", b"t3"]
    assert time.monotonic() - started < 5  # ended by the position, not by the stall timeout


def test_aborted_records_and_their_marker_are_passed(
    config: Config, topic: str, reader: Callable[..., Consumer]
) -> None:
    producer = transactional(config)
    producer.begin_transaction()
    producer.produce(topic, b"kept", b"k", partition=0)
    producer.commit_transaction(30)
    producer.begin_transaction()
    for _ in range(3):
        producer.produce(topic, b"aborted", b"k", partition=0)
    producer.flush(30)
    producer.abort_transaction(30)
    consumer = reader()
    assert wait_for_end(consumer, (topic, 0), 6)  # 1 + 3 records, 2 markers
    got = read_all(consumer, {(topic, 0): OFFSET_BEGINNING}, timeout=5.0)
    assert [value for *_where, value in got] == [b"kept"]
    # A read_uncommitted reader sees the aborted records too, and also ends.
    got = read_all(reader("read_uncommitted"), {(topic, 0): OFFSET_BEGINNING}, timeout=5.0)
    assert [value for *_where, value in got] == [b"kept", b"aborted", b"aborted", b"aborted"]


def test_an_open_transaction_is_not_waited_for(
    config: Config, topic: str, reader: Callable[..., Consumer]
) -> None:
    produce(config, topic, 1, [b"before"])
    producer = transactional(config)
    producer.begin_transaction()
    producer.produce(topic, b"open", b"k", partition=1)
    producer.flush(30)
    try:
        started = time.monotonic()
        got = read_all(reader(), {(topic, 1): OFFSET_BEGINNING}, timeout=5.0)
        assert [value for *_where, value in got] == [b"before"]
        assert time.monotonic() - started < 5
    finally:
        producer.abort_transaction(30)


def test_a_read_that_cannot_reach_its_end_raises_instead_of_hanging(
    config: Config, topic: str, reader: Callable[..., Consumer]
) -> None:
    produce(config, topic, 0, [b"only"])
    started = time.monotonic()
    with pytest.raises(LogReadError, match=rf"stalled .*{topic}\[0\]"):
        read_all(reader(), {(topic, 0): OFFSET_BEGINNING}, until={(topic, 0): 50}, timeout=1.5)
    assert time.monotonic() - started < 15


def test_a_broker_that_does_not_answer_is_an_error(
    config: Config, reader: Callable[..., Consumer]
) -> None:
    nobody = reader(
        **{"bootstrap.servers": "127.0.0.1:9", "socket.connection.setup.timeout.ms": 1000}
    )
    started = time.monotonic()
    with pytest.raises(LogReadError, match="no end offsets"):
        read_all(nobody, {("nowhere", 0): OFFSET_BEGINNING})
    assert time.monotonic() - started < 30
    with pytest.raises(TopicError):
        log.topic_partitions(nobody, "nowhere", timeout=1.0)


def test_stopping_early_unassigns_the_partitions(
    config: Config, topic: str, reader: Callable[..., Consumer]
) -> None:
    produce(config, topic, 0, [b"v%d" % i for i in range(20)])
    consumer = reader()
    batches = log.read_to_end(consumer, {(topic, 0): OFFSET_BEGINNING}, batch_size=5)
    assert len(next(batches)) <= 5
    assert consumer.assignment() != []
    batches.close()
    assert consumer.assignment() == []
