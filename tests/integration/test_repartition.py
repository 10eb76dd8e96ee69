"""A re-keyed projection (the bank's `owners`) folded through its repartition topic
(refold.engine.repartition), in one worker process: exact states from a live fold, a replay of a
fixed version that reads the source from offset 0 through the new version's own repartition topic
and diffs against the live one, and, after the swap, a worker that goes on from where the replay
stopped without folding anything twice.

The oracle is the test's own: owners computed from the events it published.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType
from refold import Event
from refold.core import envelope
from refold.core.config import Config
from refold.engine.repartition import Repartitioner, repartition_topic
from refold.engine.replay import replay
from refold.engine.runtime import ProjectionRunner
from refold.engine.tail import dead_letters
from refold.engine.worker import Worker
from refold.examples.bank.projections import Owners
from refold.kafka import clients
from refold.kafka.publisher import Publisher
from refold.kafka.registry import codec_for
from refold.kafka.topics import Topics, TopicSpec, event_topic, internal_topics
from refold.store.rocksdb import RocksStore
from refold.store.versions import live_version, store_path

Events = list[tuple[str, str, dict[str, Any]]]


def _bank(rng: random.Random, accounts: range, owners: int, moves: int) -> Events:
    out: Events = []
    for i in accounts:
        data = {"account_id": f"acc-{i}", "owner": f"owner-{rng.randrange(owners)}"}
        out.append(("bank.AccountOpened", f"acc-{i}", data))
    for i in range(moves):
        account = f"acc-{rng.choice(accounts)}"
        kind = "bank.MoneyDeposited" if rng.random() < 0.7 else "bank.MoneyWithdrawn"
        data = {"account_id": account, "amount_cents": rng.randrange(1, 900), "memo": str(i)}
        out.append((kind, account, data))
    return out


def _owners(events: Events, counted: bool) -> dict[str, dict[str, Any]]:
    """`owners` v1 (counted=False) or v2 (also counts each owner's money events)."""
    out: dict[str, dict[str, Any]] = {}
    owner_of: dict[str, str] = {}
    for kind, account, data in events:
        if kind == "bank.AccountOpened":
            owner_of[account] = data["owner"]
            state = out.setdefault(data["owner"], {"accounts": {}, "total_cents": 0})
            if counted:
                state.setdefault("moves", 0)
            state["accounts"].setdefault(account, 0)
            continue
        delta = data["amount_cents"] if kind == "bank.MoneyDeposited" else -data["amount_cents"]
        state = out[owner_of[account]]
        state["accounts"][account] += delta
        state["total_cents"] += delta
        if counted:
            state["moves"] += 1
    return out


def _classes(name: str, topic: str) -> tuple[type[Owners], type[Owners]]:
    class V1(Owners):
        pass

    class V2(Owners):
        version = 2

        def initial(self, key: str) -> dict[str, Any]:
            return {"accounts": {}, "total_cents": 0, "moves": 0}

        def apply(self, state: dict[str, Any], event: Event) -> dict[str, Any]:
            if event.type != "bank.AccountOpened":
                state["moves"] += 1
            return super().apply(state, event)

    for cls in (V1, V2):
        cls.name, cls.topics = name, (topic,)  # type: ignore[misc]
    return V1, V2


def _states(store: RocksStore) -> dict[str, Any]:
    return dict(store.scan(limit=1_000_000))


def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_owners_through_the_repartition_topic_replay_diff_swap_and_go_on(
    config: Config, unique: Any
) -> None:
    topic, name = unique("bank"), unique("owners")
    Topics(config).ensure([event_topic(topic, partitions=3), *internal_topics(config)])
    rng = random.Random(41)
    first = _bank(rng, range(60), 12, 3000)
    codec = codec_for(config)
    with Publisher(config, codec) as publisher:
        publisher.publish_many(topic, first)
    v1, v2 = _classes(name, topic)

    worker = Worker(config, [v1()], codec=codec)
    worker.start()
    try:
        runner = worker.runners[name]
        assert getattr(runner, "repartitioned", False)
        want = _owners(first, counted=False)
        _until(lambda: _states(runner.store) == want, 60, "v1 folded the oracle's owners")
        assert runner.topics == (f"_{config.app_id}.{name}.v1.repartition",)
        # The replay reads the source from offset 0 through v2's own repartition topic.
        result = replay(config, codec, v2(), 2, diff=True, progress=None)
    finally:
        worker.stop()
    assert result.diff is not None
    assert (result.diff.changed, result.diff.added, result.diff.removed) == (len(want), 0, 0)
    assert result.folded == len(first)
    built = RocksStore.open(store_path(config, name, 2))
    try:
        assert _states(built) == _owners(first, counted=True)
        assert {t for t, _p in built.offsets()} == {f"_{config.app_id}.{name}.v2.repartition"}
    finally:
        built.close()

    # Swapped, a worker serves v2 and goes on from the replay's offsets: new events once each.
    result = replay(config, codec, v2(), 2, swap=True, progress=None)
    assert live_version(config, name) == 2
    more = _bank(rng, range(60, 70), 12, 500)
    with Publisher(config, codec) as publisher:
        publisher.publish_many(topic, more)
    worker = Worker(config, [v1(), v2()], codec=codec)
    worker.start()
    try:
        runner = worker.runners[name]
        assert runner.version == 2
        want = _owners(first + more, counted=True)
        _until(lambda: _states(runner.store) == want, 60, "v2 went on to the oracle's owners")
        time.sleep(1.0)  # nothing more arrives: no event is folded twice
        assert _states(runner.store) == want
    finally:
        worker.stop()


def test_a_worker_builds_a_new_rekeyed_version_through_its_topic_and_swaps(
    config: Config, unique: Any
) -> None:
    """`on_new_version = "swap"`: the worker builds v2 beside v1 through v2's own repartition
    topic and swaps once v2 has routed what v1 routed and folded all of it."""
    topic, name = unique("bank"), unique("owners")
    Topics(config).ensure([event_topic(topic, partitions=3), *internal_topics(config)])
    rng = random.Random(43)
    events = _bank(rng, range(40), 8, 2000)
    codec = codec_for(config)
    with Publisher(config, codec) as publisher:
        publisher.publish_many(topic, events)
    v1, v2 = _classes(name, topic)
    worker = Worker(config, [v1()], codec=codec)
    worker.start()
    try:
        want = _owners(events, counted=False)
        _until(lambda: _states(worker.runners[name].store) == want, 60, "v1 folded")
    finally:
        worker.stop()
    v2.on_new_version = "swap"
    worker = Worker(config, [v1(), v2()], codec=codec)
    worker.start()
    try:
        _until(lambda: worker.runners[name].version == 2, 90, "the worker swapped to v2")
        want = _owners(events, counted=True)
        _until(lambda: _states(worker.runners[name].store) == want, 30, "v2 holds the oracle")
    finally:
        worker.stop()
    assert live_version(config, name) == 2


def test_a_replay_attaches_to_a_worker_building_the_rekeyed_version(
    config: Config, unique: Any
) -> None:
    """`refold replay` while a worker builds the same re-keyed version: it waits until that
    build has routed the source's ends and folded its repartition topic, diffs and swaps."""
    topic, name = unique("bank"), unique("owners")
    Topics(config).ensure([event_topic(topic, partitions=3), *internal_topics(config)])
    events = _bank(random.Random(47), range(30), 6, 1500)
    codec = codec_for(config)
    with Publisher(config, codec) as publisher:
        publisher.publish_many(topic, events)
    v1, v2 = _classes(name, topic)
    worker = Worker(config, [v1()], codec=codec)
    worker.start()
    try:
        want = _owners(events, counted=False)
        _until(lambda: _states(worker.runners[name].store) == want, 60, "v1 folded")
    finally:
        worker.stop()
    worker = Worker(config, [v1(), v2()], codec=codec)
    worker.start()
    try:
        _until(lambda: name in worker.builds, 30, "the worker builds v2")
        result = replay(config, codec, v2(), 2, diff=True, swap=True, progress=None)
        assert result.diff is not None and result.diff.changed == len(want)
        want = _owners(events, counted=True)
        _until(lambda: worker.runners[name].version == 2, 30, "the worker follows the swap")
        _until(lambda: _states(worker.runners[name].store) == want, 30, "v2 holds the oracle")
    finally:
        worker.stop()


def test_a_store_folded_from_its_source_goes_on_so(config: Config, unique: Any) -> None:
    """A re-keyed store folded from its source topics (an older release) is not folded again
    from its repartition topic on top of its states: the worker goes on folding the source."""
    topic, name = unique("bank"), unique("owners")
    Topics(config).ensure([event_topic(topic, partitions=3), *internal_topics(config)])
    rng = random.Random(53)
    first = _bank(rng, range(20), 5, 800)
    codec = codec_for(config)
    with Publisher(config, codec) as publisher:
        publisher.publish_many(topic, first)
    v1, _v2 = _classes(name, topic)
    local = ProjectionRunner(config, codec, v1(), dead_letters=clients.producer(config))
    try:
        assert local.run_until(local.assign_all(), timeout=60)
    finally:
        local.close()
    more = _bank(rng, range(20, 25), 5, 300)
    with Publisher(config, codec) as publisher:
        publisher.publish_many(topic, more)
    worker = Worker(config, [v1()], codec=codec)
    worker.start()
    try:
        runner = worker.runners[name]
        assert runner.topics == (topic,) and getattr(runner, "feeder", None) is None
        want = _owners(first + more, counted=False)
        _until(lambda: _states(runner.store) == want, 60, "the source fold went on")
    finally:
        worker.stop()


def test_an_event_too_large_once_re_keyed_is_dead_lettered_and_the_rest_routed(
    config: Config, unique: Any
) -> None:
    """An account opened with a 480 kB owner fits in its record; re-keyed by owner it does not
    (the owner is its key and in its value). The producer refused it inside the transaction,
    which was aborted and tried again every 0.5 s for good: the partition was never routed
    again (the bank's `POST /commands/accounts` can write such an event)."""
    topic, name = unique("bank"), unique("owners")
    Topics(config).ensure([event_topic(topic, partitions=1), *internal_topics(config)])
    big = "o" * 480_000
    events: Events = [
        ("bank.AccountOpened", "acc-big", {"account_id": "acc-big", "owner": big}),
        ("bank.AccountOpened", "acc-1", {"account_id": "acc-1", "owner": "ada"}),
        ("bank.MoneyDeposited", "acc-1", {"account_id": "acc-1", "amount_cents": 5, "memo": ""}),
    ]
    codec = codec_for(config)
    with Publisher(config, codec) as publisher:
        publisher.publish_many(topic, events)
    dead = _routed_past_the_big_one(config, codec, name, topic)
    assert (dead["key"], dead["offset"]) == ("acc-big", 0), dead
    assert "the re-keyed record is 960" in dead["reason"], dead


def test_a_record_whose_headers_make_it_too_large_re_keyed_is_dead_lettered_without_them(
    config: Config, unique: Any
) -> None:
    """The routing counted key, value and the old key, not the source record's headers: a
    record another client wrote with 1 MB of headers (its value small) passed, the producer
    refused the routed record and the transaction was aborted and tried again for good; its
    dead letter, carrying the same headers, would have been refused as well. Now the routing
    counts headers as Kafka does, and a dead letter no record can carry keeps the reason and
    the position, not the bytes (they stay at that position)."""
    topic, name = unique("bank"), unique("owners")
    Topics(config).ensure([event_topic(topic, partitions=1), *internal_topics(config)])
    codec = codec_for(config)
    deposit = {"account_id": "acc-1", "amount_cents": 5, "memo": ""}
    with Publisher(config, codec) as publisher:
        opened = {"account_id": "acc-1", "owner": "ada"}
        publisher.publish_many(topic, [("bank.AccountOpened", "acc-1", opened)])
        producer = Producer(
            {"bootstrap.servers": config.bootstrap_servers, "message.max.bytes": 1_040_000}
        )
        headers = envelope.headers("bank.AccountOpened", source="elsewhere")
        headers.append(("x-trace", b"t" * 1_005_000))
        value = codec.encode("bank.AccountOpened", {"account_id": "acc-big", "owner": "eve"})
        producer.produce(topic, value, b"acc-big", headers=headers)
        assert producer.flush(30) == 0
        publisher.publish_many(topic, [("bank.MoneyDeposited", "acc-1", deposit)])
    dead = _routed_past_the_big_one(config, codec, name, topic)
    assert (dead["key"], dead["offset"], dead["value_hex"]) == ("acc-big", 1, ""), dead
    assert "the re-keyed record is 1005" in dead["reason"], dead
    assert "bytes (key, value and headers); at most 900000 fit" in dead["reason"], dead


def test_a_routing_transaction_the_broker_refuses_backs_off_says_so_once_and_then_goes_on(
    config: Config, unique: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A routed record over its repartition topic's max.message.bytes fails every
    transaction at once. It was aborted and tried again every half second, with a warning each
    time, for as long as it lasted. Now the tries back off (0.5 s doubling, to 30 s), one
    warning says so (the same error again is counted, not logged), and once the topic takes
    the record (here an operator raises its limit) it is routed and a line says after how
    many aborts."""
    topic, name = unique("bank"), unique("owners")
    topics = Topics(config)
    topics.ensure([event_topic(topic, partitions=1), *internal_topics(config)])
    target = repartition_topic(config, name, 1)
    topics.ensure([TopicSpec(target, 1, {"retention.ms": "-1", "max.message.bytes": "2000"})])
    owner = os.urandom(6000).hex()  # too large for the topic even compressed
    codec = codec_for(config)
    with Publisher(config, codec) as publisher:
        opened = {"account_id": "acc-1", "owner": owner}
        publisher.publish_many(topic, [("bank.AccountOpened", "acc-1", opened)])
    v1, _v2 = _classes(name, topic)
    router = Repartitioner(
        config, codec, v1(), 1, worker_id=unique("w"), dlq_topic=config.dead_letter_topic(name)
    )
    thread = threading.Thread(target=router.run, daemon=True)
    with caplog.at_level(logging.INFO, logger="refold.engine"):
        thread.start()
        try:
            _until(lambda: router.stats.aborts >= 1, 60, "a first aborted transaction")
            first = time.monotonic()
            _until(lambda: router.stats.aborts >= 4, 60, "4 aborted transactions")
            fourth = time.monotonic()
            aborted = [
                r.getMessage()
                for r in caplog.records
                if r.name.startswith("refold.") and "transaction aborted" in r.getMessage()
            ]
            admin = clients.admin(config)
            entry = ConfigEntry(
                "max.message.bytes", "10000000", incremental_operation=AlterConfigOpType.SET
            )
            resource = ConfigResource(ResourceType.TOPIC, target, incremental_configs=[entry])
            for future in admin.incremental_alter_configs([resource]).values():
                future.result(30)
            _until(lambda: router.stats.routed == 1, 60, "the record routed once the topic took it")
        finally:
            router.stop()
            thread.join(60)
    # Paused 0.5 + 1 + 2 s between the first and the fourth try (every 0.5 s, it was 1.5 s).
    assert fourth - first >= 3.0, fourth - first
    # One line per error (the broker's refusal; or the transaction state it left, which
    # send_offsets_to_transaction may meet first), not one per try.
    codes = [line.split("code=", 1)[1].split(",", 1)[0] for line in aborted]
    assert len(codes) == len(set(codes)) and "MSG_SIZE_TOO_LARGE" in codes, aborted
    assert "trying again in 0.5s" in aborted[0], aborted
    aborts = router.stats.aborts
    said = [r.getMessage() for r in caplog.records if "committed after" in r.getMessage()]
    assert said == [f"{router.name}: a transaction committed after {aborts} aborted"], said


def _routed_past_the_big_one(config: Config, codec: Any, name: str, topic: str) -> dict[str, Any]:
    """Run v1 of `name` over `topic` until ada's account (the events after the too-large
    record) is folded; the one dead letter of `name`."""
    v1, _v2 = _classes(name, topic)
    worker = Worker(config, [v1()], codec=codec)
    worker.start()
    try:
        runner = worker.runners[name]
        want = {"ada": {"accounts": {"acc-1": 5}, "total_cents": 5}}
        _until(lambda: _states(runner.store) == want, 60, "the events after it were routed")
    finally:
        worker.stop()
    [dead] = dead_letters(config, name)
    return dead
