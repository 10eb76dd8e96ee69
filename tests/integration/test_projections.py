"""The projection runtime against the real broker: folds equal an independent oracle, through
kill -9 at random moments, across two workers, with poison records dead-lettered."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from refold.core.config import Config
from refold.core.errors import StoreError
from refold.engine.runner_consumer import group_id
from refold.engine.runtime import ProjectionRunner, dead_letter_topic_name, store_path
from refold.engine.tail import dead_letters
from refold.examples.bank.projections import Balances
from refold.kafka.publisher import PRODUCER_DEFAULTS, Publisher
from refold.kafka.registry import codec_for
from refold.kafka.topics import Topics, dead_letter_topic
from refold.store.rocksdb import RocksStore

ROOT = Path(__file__).resolve().parents[2]


def events_for(n: int, accounts: int, seed: int) -> list[tuple[str, str, dict]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        acc = f"acc-{rng.randrange(accounts):04d}"
        kind = "bank.MoneyDeposited" if rng.random() < 0.6 else "bank.MoneyWithdrawn"
        out.append(
            (kind, acc, {"account_id": acc, "amount_cents": rng.randrange(1, 5000), "memo": str(i)})
        )
    return out


def oracle(events: list[tuple[str, str, dict]]) -> dict[str, tuple[int, int]]:
    """(balance, count) per key, computed without refold."""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for kind, key, data in events:
        if data["memo"] == "boom":
            continue
        out[key][0] += (
            data["amount_cents"] if kind == "bank.MoneyDeposited" else -data["amount_cents"]
        )
        out[key][1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


class WorkerProcess:
    """`refold worker` in a subprocess, as a user would run it."""

    def __init__(self, config: Config, name: str, topic: str, data_dir: Path) -> None:
        self.env = {
            **os.environ,
            "REFOLD_BOOTSTRAP_SERVERS": config.bootstrap_servers,
            "REFOLD_DATA_DIR": str(data_dir),
            "REFOLD_APP": "tests.integration.apps.ledger",
            "LEDGER_NAME": name,
            "LEDGER_TOPIC": topic,
            "PYTHONPATH": str(ROOT),
        }
        self.name = name
        self.data_dir = data_dir
        self.log = data_dir.parent / f"{data_dir.name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "refold.cli.main", "worker", "--only", self.name],
            env=self.env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill9()

    def store_snapshot(self) -> tuple[dict[tuple[str, int], int], dict[str, dict], dict]:
        path = store_path(Config(data_dir=self.data_dir), self.name, 1)
        store = RocksStore.open_secondary(path, self.data_dir.parent / f"{self.data_dir.name}-sec")
        try:
            store.catch_up()
            states = dict(store.scan(limit=1_000_000))
            meta = {k: int(store.meta(k) or 0) for k in ("events_folded", "dead_letters")}
            return store.offsets(), states, meta
        finally:
            store.close()


def end_offsets(config: Config, topic: str) -> dict[tuple[str, int], int]:
    consumer = Consumer(config.kafka(**{"group.id": "oracle-ends"}))
    try:
        md = consumer.list_topics(topic, timeout=10).topics[topic]
        return {
            (topic, p): consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in md.partitions
        }
    finally:
        consumer.close()


def wait_caught_up(workers: list[WorkerProcess], ends: dict, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reached: dict = {}
        for w in workers:
            path = store_path(Config(data_dir=w.data_dir), w.name, 1)
            if (path / "CURRENT").is_file():
                try:
                    snapshot = w.store_snapshot()[0]
                except StoreError:  # the worker is still creating the store
                    continue
                for tp, off in snapshot.items():
                    reached[tp] = max(off, reached.get(tp, 0))
        if all(reached.get(tp, 0) >= off for tp, off in ends.items() if off > 0):
            return
        time.sleep(0.5)
    raise AssertionError(f"workers did not catch up to {ends} in {timeout}s: {reached}")


def publish(config: Config, topic: str, events: list) -> None:
    with Publisher(config, codec_for(config)) as publisher:
        for start in range(0, len(events), 2000):
            publisher.publish_many(topic, events[start : start + 2000])


def assert_matches_oracle(states: dict[str, dict], expected: dict[str, tuple[int, int]]) -> None:
    got = {k: (s["balance_cents"], s["events"]) for k, s in states.items()}
    assert got == expected


def test_worker_folds_exactly_the_oracle(config, ledger_topic, unique, tmp_path):
    events = events_for(3000, accounts=120, seed=1)
    publish(config, ledger_topic, events)
    worker = WorkerProcess(config, unique("ledger"), ledger_topic, tmp_path / "w1")
    worker.start()
    try:
        wait_caught_up([worker], end_offsets(config, ledger_topic))
    finally:
        worker.stop()
    _offsets, states, meta = worker.store_snapshot()
    assert_matches_oracle(states, oracle(events))
    assert meta == {"events_folded": 3000, "dead_letters": 0}


def test_kill_9_at_random_moments_loses_and_duplicates_nothing(
    config, ledger_topic, unique, tmp_path
):
    rng = random.Random(42)
    events = events_for(40_000, accounts=500, seed=2)
    worker = WorkerProcess(config, unique("ledger"), ledger_topic, tmp_path / "w1")
    publisher_done = threading.Event()

    def produce() -> None:
        publish(config, ledger_topic, events)
        publisher_done.set()

    producer = threading.Thread(target=produce)
    worker.start()
    producer.start()
    kills = 0
    try:
        while kills < 4:
            time.sleep(rng.uniform(1.5, 4.0))  # includes start-up, assignment and mid-batch moments
            worker.kill9()
            kills += 1
            worker.start()
        producer.join(120)
        assert publisher_done.is_set()
        wait_caught_up([worker], end_offsets(config, ledger_topic), timeout=120)
    finally:
        worker.stop()
    _offsets, states, meta = worker.store_snapshot()
    assert_matches_oracle(states, oracle(events))
    assert meta["dead_letters"] == 0  # the ledger fold dead-letters any event folded twice


def test_two_workers_split_partitions_and_hold_every_key(config, ledger_topic, unique, tmp_path):
    events = events_for(4000, accounts=200, seed=3)
    publish(config, ledger_topic, events)
    name = unique("ledger")
    workers = [WorkerProcess(config, name, ledger_topic, tmp_path / f"w{i}") for i in (1, 2)]
    for w in workers:
        w.start()
    ends = end_offsets(config, ledger_topic)
    try:
        wait_caught_up(workers, ends)
        admin = AdminClient({"bootstrap.servers": config.bootstrap_servers})
        deadline = time.monotonic() + 60
        while True:
            group = admin.describe_consumer_groups([group_id(config, name, 1)])[
                group_id(config, name, 1)
            ].result()
            owned = [
                {(tp.topic, tp.partition) for tp in m.assignment.topic_partitions}
                for m in group.members
            ]
            if len(owned) == 2 and all(owned) and set().union(*owned) == set(ends):
                break
            if time.monotonic() > deadline:  # a deadline for the wait, not a speed check
                raise AssertionError(f"partitions not split: {owned}")
            time.sleep(1)
        wait_caught_up(workers, ends)
    finally:
        for w in workers:
            w.stop()
    complete: dict[str, tuple[int, int]] = {}
    for w in workers:
        offsets, states, _ = w.store_snapshot()
        at_end = {tp for tp, off in offsets.items() if off >= ends[tp]}
        for key, state in states.items():
            if (ledger_topic, key_partition(key)) in at_end:
                complete[key] = (state["balance_cents"], state["events"])
    assert complete == oracle(events)


def key_partition(key: str) -> int:
    from tests.integration.test_publish_tail import java_murmur2_partition

    return java_murmur2_partition(key.encode(), 4)


def test_poison_records_go_to_the_dead_letter_topic_and_the_rest_is_folded(
    config, ledger_topic, unique, tmp_path
):
    events = events_for(500, accounts=20, seed=4)
    events[100] = (events[100][0], events[100][1], {**events[100][2], "memo": "boom"})
    publish(config, ledger_topic, events[:300])
    raw = Producer({"bootstrap.servers": config.bootstrap_servers})
    raw.produce(ledger_topic, b"\x00\x01 not avro", b"acc-0001", partition=0)
    raw.flush(10)
    publish(config, ledger_topic, events[300:])
    worker = WorkerProcess(config, unique("ledger"), ledger_topic, tmp_path / "w1")
    worker.start()
    try:
        wait_caught_up([worker], end_offsets(config, ledger_topic))
    finally:
        worker.stop()
    _offsets, states, meta = worker.store_snapshot()
    assert_matches_oracle(states, oracle(events))
    assert meta == {"events_folded": 499, "dead_letters": 2}
    letters = list(dead_letters(config, worker.name))
    reasons = sorted(letter["reason"].split(":")[0] for letter in letters)
    assert reasons == [
        "bank.MoneyDeposited" if events[100][0] == "bank.MoneyDeposited" else "bank.MoneyWithdrawn",
        "undecodable",
    ]
    boom = next(x for x in letters if "boom" in x["reason"])
    assert boom["topic"] == ledger_topic and boom["key"] == events[100][1]
    foreign = next(x for x in letters if x["reason"].startswith("undecodable"))
    assert foreign["partition"] == 0 and bytes.fromhex(foreign["value_hex"]) == b"\x00\x01 not avro"


def test_runner_prefetches_a_bounded_part_of_a_backlog(config, ledger_topic, unique):
    """A backlog of small lz4 records must not be buffered whole by librdkafka (~340 bytes each):
    that made a worker's memory grow with the backlog (issue 6)."""
    n = 400_000
    codec = codec_for(config)
    value = codec.encode("bank.MoneyDeposited", {"account_id": "k", "amount_cents": 1, "memo": ""})
    producer = Producer({"bootstrap.servers": config.bootstrap_servers, **PRODUCER_DEFAULTS})
    for i in range(n):
        while True:
            try:
                producer.produce(ledger_topic, value, b"k%07d" % i)
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(60) == 0

    buffered: list[int] = []  # pre-fetched records waiting for the fold loop, per stats report

    def stats(text: str) -> None:
        partitions = (
            p for t in orjson.loads(text)["topics"].values() for p in t["partitions"].values()
        )
        buffered.append(
            max((p["fetchq_cnt"] for p in partitions if p["partition"] >= 0), default=0)
        )

    class Backlog(Balances):
        name = unique("backlog")
        topics = (ledger_topic,)

    dlq = Producer({"bootstrap.servers": config.bootstrap_servers})
    runner = ProjectionRunner(
        config,
        codec,
        Backlog(),
        dead_letters=dlq,
        consumer_conf={"statistics.interval.ms": 50, "stats_cb": stats},
    )
    thread = threading.Thread(target=runner.run)
    thread.start()
    try:
        deadline = time.monotonic() + 300
        while runner.stats.folded < n:
            if runner.stats.state == "failed" or time.monotonic() > deadline:
                raise AssertionError(f"folded {runner.stats.folded} of {n}: {runner.stats.error}")
            time.sleep(0.1)
    finally:
        runner.stop()
        thread.join(30)
    assert buffered and max(buffered) > 0
    assert max(buffered) < n // 2, f"{max(buffered)} of {n} records were buffered at once"
    with RocksStore.open(store_path(config, Backlog.name, 1), read_only=True) as store:
        assert store.meta("events_folded") == n
        assert store.get_many(["k0000000", f"k{n - 1:07d}"]) == {
            k: {"balance_cents": 1, "deposits": 1, "withdrawals": 0, "events": 1, "owner": None}
            for k in ("k0000000", f"k{n - 1:07d}")
        }


def _coalescing_runner(config, projection, **kw) -> ProjectionRunner:
    """A runner whose batches all wait for one write (as in a rebuild), 100 records a batch."""
    Topics(config).ensure([dead_letter_topic(dead_letter_topic_name(config, projection.name))])
    return ProjectionRunner(
        config,
        codec_for(config),
        projection,
        dead_letters=Producer({"bootstrap.servers": config.bootstrap_servers}),
        batch_size=100,
        commit_every=1_000_000,
        commit_interval_s=3600,
        write_when_caught_up=False,
        **kw,
    )


def test_poison_among_batches_waiting_for_one_write_rewinds_and_dead_letters_once(
    config, ledger_topic, unique, caplog
):
    """Batches folded into one pending write, then a poison record: the cached states may be
    half-changed, so the runner rewinds to the stored offsets and folds again. The Ledger fold
    raises on any event folded twice, so a double apply would show as a wrong dead letter."""
    from tests.integration.apps.ledger import Ledger

    caplog.set_level(logging.INFO, logger="refold.engine.runtime")
    events = events_for(3000, accounts=30, seed=7)
    for i in (700, 1500, 2600):
        events[i] = (events[i][0], events[i][1], {**events[i][2], "memo": "boom"})
    publish(config, ledger_topic, events[:1200])
    raw = Producer({"bootstrap.servers": config.bootstrap_servers})
    raw.produce(ledger_topic, b"\x00\x01 not avro", b"acc-0003", partition=1)
    raw.flush(10)
    publish(config, ledger_topic, events[1200:])

    class Coalesced(Ledger):
        name = unique("coalesced")
        topics = (ledger_topic,)

    runner = _coalescing_runner(config, Coalesced())
    try:
        runner.assign_all()
        assert runner.run_until(end_offsets(config, ledger_topic), timeout=120)
        assert runner.stats.state == "running", runner.stats.error
        rewinds = [r for r in caplog.records if "rewound" in r.getMessage()]
        assert rewinds, "the first poison record came after batches waiting for their write"
    finally:
        runner.close()
    with RocksStore.open(store_path(config, Coalesced.name, 1), read_only=True) as store:
        states = dict(store.scan(limit=1000))
        meta = {k: store.meta(k) for k in ("events_folded", "dead_letters")}
    assert_matches_oracle(states, oracle(events))
    assert meta == {"events_folded": 2997, "dead_letters": 4}
    letters = list(dead_letters(config, Coalesced.name))
    positions = sorted((x["partition"], x["offset"]) for x in letters)
    assert len(positions) == 4 and len(set(positions)) == 4  # each poison record once
    assert sum("boom" in x["reason"] for x in letters) == 3


def test_a_stopping_projection_stores_exactly_the_events_before_its_poison_record(
    config, ledger_topic, unique
):
    from tests.integration.apps.ledger import Ledger

    events = events_for(2000, accounts=25, seed=8)
    events[1300] = (events[1300][0], events[1300][1], {**events[1300][2], "memo": "boom"})
    with Publisher(config, codec_for(config)) as publisher:
        placed = publisher.publish_many(ledger_topic, events)

    class Stops(Ledger):
        name = unique("stops")
        topics = (ledger_topic,)
        on_error = "stop"

    runner = _coalescing_runner(config, Stops())
    try:
        runner.assign_all()
        assert not runner.run_until(end_offsets(config, ledger_topic), timeout=120)
        boom = placed[1300]
        assert runner.stats.state == "failed"
        assert f"stopped at {ledger_topic}[{boom.partition}]@{boom.offset}" in runner.stats.error
    finally:
        runner.close()
    with RocksStore.open(store_path(config, Stops.name, 1), read_only=True) as store:
        stored = store.offsets()
        states = dict(store.scan(limit=1000))
    assert stored[(ledger_topic, boom.partition)] == boom.offset
    before = [
        e
        for e, at in zip(events, placed, strict=True)
        if at.offset < stored.get((ledger_topic, at.partition), 0)
    ]
    assert sum(1 for at in placed if at.partition == boom.partition and at.offset < boom.offset)
    assert_matches_oracle(states, oracle(before))
