"""A record too large for the dead-letter topic: a foreign client writes a value near its event
topic's max.message.bytes, with large headers, to a topic a projection folds. The dead letter
(those bytes plus refold's headers) cannot be written whole; it is written without the record's
value and headers, still with the reason, the position and `refold_dlq_dropped` saying the
bytes stay at that position, and the fold goes on past it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from refold.core.config import Config
from refold.engine.tail import dead_letters
from refold.engine.worker import Worker
from refold.kafka.publisher import Publisher
from refold.kafka.topics import Topics, TopicSpec, internal_topics

from tests.integration.test_http import DEPOSITED, deposits_projection

#: The event topic takes records up to 3 MB; the dead-letter topic keeps the broker's default
#: (1,048,588 bytes), as does the worker's producer (librdkafka's 1,000,000) unless told more.
EVENT_TOPIC_MAX = 3_000_000


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "producer_max",
    [None, EVENT_TOPIC_MAX],
    ids=["the-producer-refuses-it", "the-broker-refuses-it"],
)
def test_a_record_too_large_to_dead_letter_is_dead_lettered_cut_and_the_fold_goes_on(
    bootstrap: str, tmp_path: Path, unique: Callable[[str], str], producer_max: int | None
) -> None:
    # A consumer's fetch.max.bytes must be at least its message.max.bytes (librdkafka).
    limits = {"message.max.bytes": str(producer_max), "fetch.max.bytes": str(producer_max)}
    overrides = {} if producer_max is None else limits
    config = Config(
        data_dir=tmp_path / "refold", bootstrap_override=bootstrap, client_overrides=overrides
    )
    topic, name = unique("big"), unique("deposits")
    spec = TopicSpec(topic, 1, {"retention.ms": "-1", "max.message.bytes": str(EVENT_TOPIC_MAX)})
    Topics(config).ensure([spec, *internal_topics(config)])
    worker = Worker(config, [deposits_projection(name, topic)])
    worker.start()
    publisher = Publisher(config, worker.codec)
    try:
        good = [(DEPOSITED, "acc-1", {"account_id": "acc-1", "amount_cents": 5, "memo": "a"})]
        publisher.publish_many(topic, good)

        # Another Kafka client's record: 1 MB of value and 60 kB of headers, incompressible.
        foreign = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": EVENT_TOPIC_MAX})
        placed: list[Any] = []
        headers = [("trace", os.urandom(30_000)), ("baggage", os.urandom(30_000))]
        foreign.produce(
            topic,
            os.urandom(1_000_000),
            b"acc-1",
            headers=headers,
            on_delivery=lambda err, msg: placed.append(err or msg.offset()),
        )
        assert foreign.flush(30) == 0 and len(placed) == 1 and isinstance(placed[0], int), placed
        offset = placed[0]

        after = publisher.publish_many(topic, good)[0]
        runner = worker.runners[name]
        assert runner.wait_for({(topic, 0): after.offset}, 60), runner.stats
        assert runner.stats.state == "running", runner.stats
        assert runner.stats.dead_letters == 1
        state = runner.store.get("acc-1")  # both good events folded, the foreign one not
        assert state is not None and state["balance_cents"] == 10, state

        dead = list(dead_letters(config, name))
        assert len(dead) == 1, [{k: v for k, v in d.items() if k != "value_hex"} for d in dead]
        letter = dead[0]
        assert (letter["topic"], letter["partition"], letter["offset"]) == (topic, 0, offset)
        assert letter["reason"].startswith("undecodable"), letter["reason"]
        assert letter["key"] == "acc-1" and letter["value_hex"] == ""
        assert f"stay at {topic}[0]@{offset}" in letter["dropped"], letter["dropped"]
        assert "1000000 bytes" in letter["dropped"], letter["dropped"]
    finally:
        publisher.close()
        worker.stop()
