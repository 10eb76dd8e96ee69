"""Lag tells the truth about transaction markers: a partition whose last offsets are a commit
marker (and aborted records) ends at lag 0 in the store, `GET /projections`, `refold status`
and the group's committed offsets (what Kafka's consumer-groups tool reads); after an external
reset of the group's offsets, the worker commits the positions its store holds again."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any, cast

from confluent_kafka import ConsumerGroupTopicPartitions, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from refold.core.config import Config
from refold.engine.runner_consumer import group_id
from refold.kafka.registry import codec_for

from tests.integration.test_projections import end_offsets
from tests.integration.test_replay import Env, fold, story


def write_in_transactions(
    config: Config, topic: str, batches: list[tuple[list, bool]]
) -> dict[tuple[str, int], int]:
    """Each batch in one transaction, committed or aborted; returns the last record's offset
    per partition (a marker follows it)."""
    codec = codec_for(config)
    producer = Producer(config.kafka(**{"transactional.id": f"{topic}-writer"}))
    producer.init_transactions(30)
    last: dict[tuple[str, int], int] = {}

    def delivered(err, msg) -> None:
        assert err is None, err
        tp = (msg.topic(), msg.partition())
        last[tp] = max(last.get(tp, -1), msg.offset())

    for events, commit in batches:
        producer.begin_transaction()
        for kind, key, data in events:
            producer.produce(topic, codec.encode(kind, data), key.encode(), on_delivery=delivered)
        producer.flush(30)
        if commit:
            producer.commit_transaction(30)
        else:
            producer.abort_transaction(30)
    return last


def committed(config: Config, group: str, tps: list[tuple[str, int]]) -> dict:
    admin = AdminClient(cast("dict[str, Any]", config.kafka()))
    request = ConsumerGroupTopicPartitions(group, [TopicPartition(t, p) for t, p in tps])
    answer = admin.list_consumer_group_offsets([request])[group].result(30)
    return {(tp.topic, tp.partition): tp.offset for tp in answer.topic_partitions}


def reset_to_earliest(config: Config, group: str, tps: list[tuple[str, int]]) -> None:
    """What `kafka-consumer-groups --reset-offsets --to-earliest --execute` does; like the
    tool, it is refused until the group has no member left."""
    admin = AdminClient(cast("dict[str, Any]", config.kafka()))
    deadline = time.monotonic() + 60
    while True:
        request = ConsumerGroupTopicPartitions(group, [TopicPartition(t, p, 0) for t, p in tps])
        answer = admin.alter_consumer_group_offsets([request])[group].result(30)
        errors = [tp.error for tp in answer.topic_partitions if tp.error is not None]
        if not errors:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the group's offsets could not be reset: {errors}")
        time.sleep(0.5)


def wait_for(check, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout  # a deadline for the wait, not a speed check
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def test_a_topic_written_in_transactions_ends_at_lag_0_and_a_reset_is_undone(
    config, ledger_topic, unique, tmp_path
):
    env = Env(config, unique("markers"), ledger_topic, tmp_path / "data")
    kept, aborted, more = story(300, seed=81), story(60, seed=82), story(100, seed=83)
    batches = [(kept, True), (aborted, False), (more, True)]
    last = write_in_transactions(config, ledger_topic, batches)
    # commit_transaction() returns before the markers are in the partitions: wait for them.
    after_markers = {tp: offset + 2 for tp, offset in last.items()}  # the last record, a marker
    wait_for(lambda: end_offsets(config, ledger_topic) == after_markers, "the commit markers")
    ends = after_markers
    group = group_id(env.config, env.name, 1)

    env.start_worker("1")
    try:

        def lags() -> list:
            with urllib.request.urlopen(f"http://127.0.0.1:{env.port}/projections") as r:
                entry = {p["name"]: p for p in json.loads(r.read())}[env.name]
            return [p["lag"] for p in entry["partitions"]]

        wait_for(lambda: lags() == [0] * len(ends), "lag 0 over HTTP")
        assert env.states(1) == (fold(kept + more, buggy=True), ends)
        done = env.refold("1", "status", "--json")
        row = {r["projection"]: r for r in map(json.loads, done.stdout.splitlines())}[env.name]
        assert row["lag"] == 0 and row["events_folded"] == len(kept) + len(more), row
        wait_for(lambda: committed(config, group, list(ends)) == ends, "the group's offsets")
    finally:
        env.stop_worker()

    reset_to_earliest(config, group, list(ends))
    assert set(committed(config, group, list(ends)).values()) == {0}
    env.start_worker("1")
    try:
        wait_for(lambda: committed(config, group, list(ends)) == ends, "re-committed offsets")
        assert env.states(1) == (fold(kept + more, buggy=True), ends)  # nothing folded twice
    finally:
        env.stop_worker()
