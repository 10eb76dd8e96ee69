"""Broker loss: kill -9 one node of a 3-node cluster (RF 3, min.insync.replicas 2) while events
are published, a `refold worker` folds them and decides commands; start the node again.

Everything is checked against what the test itself saw acknowledged: every acknowledged event is
in the log exactly once (by the event ids the test gave them), the projection equals a fold
computed here, and the commands sent before, during and after the loss all have one result, the
event topic holding exactly the accepted ones' events. The cluster is the test module's own (not
the session broker); the nodes it kills are only the ones it started. When the controller is
killed, it is also the group coordinator of the fold consumers and of the command processor
(the test picks their names so): every coordinator and leader there moves at once.

Each test logs how long after the kill the projection had folded every event acknowledged before
it, and every command sent before it had its result (bench/RESULTS.md, "Broker loss").
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from confluent_kafka import KafkaException, TopicPartition
from confluent_kafka.admin import ConfigResource, ResourceType
from refold.cli import broker
from refold.core import envelope
from refold.core.config import Config
from refold.core.errors import StoreError, TopicError
from refold.core.inputs import EventInput
from refold.examples.bank.accounts import Accounts
from refold.kafka import clients
from refold.kafka.command_client import CommandClient
from refold.kafka.command_topics import ensure_command_topics
from refold.kafka.log import read_to_end
from refold.kafka.publisher import Publisher
from refold.kafka.registry import codec_for
from refold.kafka.topics import Topics, event_topic, internal_topics
from refold.store.rocksdb import RocksStore
from refold.store.versions import store_path

from tests.integration.test_commands import (
    balances,
    check_log_matches_results,
    read_events,
    read_results,
)
from tests.integration.test_projections import WorkerProcess, events_for, oracle

log = logging.getLogger(__name__)
# One pytest process runs this module (`make test` runs two): its cluster starts once per run.
pytestmark = pytest.mark.xdist_group("faults")

PARTITIONS = 6
ACCOUNTS = 12  # of the command load
CHUNK = 1000  # events per publish call
RATE = 5000  # events per second the publisher aims at: a live load the worker can keep up with


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Config]:
    """A 3-node cluster of this module's own. Its Config serves the launcher (kill_node) and the
    test's clients alike: they find the cluster in the broker record under its data dir."""
    own = Config(data_dir=tmp_path_factory.mktemp("faults-cluster"))
    broker.start(own, nodes=3, port=quiet_ports(6), timeout=180)
    try:
        yield own
    finally:
        broker.stop(own, timeout=30)


def quiet_ports(count: int) -> int:
    """The first of `count` free consecutive ports below Linux's ephemeral range (32768-60999):
    while a node is down, an outgoing connection anywhere on the machine may take an ephemeral
    port, and the node could not start again on it (seen: "Address already in use")."""
    for base in random.Random().sample(range(20_000, 32_000, 10), 200):
        if all(port_free(base + i) for i in range(count)):
            return base
    raise AssertionError("no free ports below 32000")


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class FaultWorker(WorkerProcess):
    """`refold worker` folding the ledger projection and deciding the vault's commands."""

    def __init__(self, config: Config, ledger: str, topic: str, vault: Accounts, data: Path):
        super().__init__(config, ledger, topic, data)
        self.vault = vault
        self.env |= {
            "REFOLD_APP": "tests.integration.apps.ledger,tests.integration.apps.vault",
            "VAULT_NAME": vault.name,
            "VAULT_TOPIC": vault.events_topic,
            "PYTHONFAULTHANDLER": "1",  # SIGABRT (see `dump`) writes every thread's stack
        }

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        only = f"{self.name},{self.vault.name}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "refold.cli.main", "worker", "--only", only],
            env=self.env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )

    def dump(self) -> None:
        """Make the worker write every thread's stack to its log and exit (a stuck worker)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGABRT)
            self.proc.wait(30)

    def stored_offsets(self) -> dict[tuple[str, int], int]:
        """The ledger store's offsets now (a secondary instance: the worker keeps running)."""
        path = store_path(Config(data_dir=self.data_dir), self.name, 1)
        if not (path / "CURRENT").is_file():
            return {}
        try:
            store = RocksStore.open_secondary(path, self.data_dir.parent / "offsets-sec")
        except StoreError:  # the worker is still creating it
            return {}
        try:
            store.catch_up()
            return store.offsets()
        finally:
            store.close()


@dataclass
class Load:
    """What the publisher and the command sender saw acknowledged, and when."""

    acked: list[tuple[str, str, dict]] = field(default_factory=list)
    acked_ids: list[str] = field(default_factory=list)
    ack_times: list[float] = field(default_factory=list)
    publish_errors: list[str] = field(default_factory=list)
    commands: list[tuple[str, str]] = field(default_factory=list)  # (command id, phase)
    command_errors: list[str] = field(default_factory=list)
    phase: str = "before"


def publish(config: Config, topic: str, events: list, load: Load, stop: threading.Event) -> None:
    """Publish `events` in chunks at about RATE events/s; each chunk's ids are its own."""
    codec = codec_for(config)
    with Publisher(config, codec) as publisher:
        started = time.monotonic()
        for start in range(0, len(events), CHUNK):
            if stop.is_set():
                return
            chunk = events[start : start + CHUNK]
            inputs = [EventInput(t, k, d, codec.encode(t, d)) for t, k, d in chunk]
            ids = [f"ev-{start + i}" for i in range(len(chunk))]
            try:
                publisher.publish_encoded(topic, inputs, event_ids=ids)
            except Exception as exc:  # recorded: the test fails on any, after the checks
                load.publish_errors.append(f"chunk at {start}: {exc}")
                continue
            load.acked.extend(chunk)
            load.acked_ids.extend(ids)
            load.ack_times.append(time.monotonic())
            ahead = started + (start + len(chunk)) / RATE - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)


def send_commands(client: CommandClient, vault: Accounts, load: Load, stop: threading.Event):
    """Deposits and withdrawals (some overdrafts, refused) on the opened accounts until stopped."""
    rng = random.Random(7)
    while not stop.wait(0.05):
        key = f"acc-{rng.randrange(ACCOUNTS):02d}"
        kind, amount = rng.choice(("bank.Deposit", "bank.Withdraw")), rng.randrange(1, 3000)
        phase = load.phase
        try:
            cid = client.send(vault.name, key, kind, {"amount_cents": amount}, timeout=60)
        except Exception as exc:
            load.command_errors.append(f"{phase}: {exc}")
            continue
        load.commands.append((cid, phase))


def ledger_ids(config: Config, topic: str) -> Counter[str]:
    """How often each event id (ce_id) occurs in the topic, read to its end."""
    consumer = clients.consumer(config, config.group("faults-check"))
    seen: Counter[str] = Counter()
    try:
        starts = {(topic, p): 0 for p in range(PARTITIONS)}
        for batch in read_to_end(consumer, starts, batch_size=10_000):
            for msg in batch:
                headers = dict(msg.headers() or [])
                seen[headers[envelope.ID].decode()] += 1
    finally:
        consumer.close()
    return seen


def wait_for_offsets(worker: FaultWorker, wanted: dict, timeout: float) -> float:
    """When (monotonic) the worker's store reached `wanted` (polled every 0.2 s)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        stored = worker.stored_offsets()
        if all(stored.get(tp, 0) >= off for tp, off in wanted.items()):
            return time.monotonic()
        time.sleep(0.2)
    raise AssertionError(f"projection did not reach {wanted} in {timeout}s: {stored}")


def current_again(
    config: Config, worker: FaultWorker, topic: str, before: dict, timeout: float
) -> float:
    """When (monotonic) the projection had folded, on every partition, events appended after
    `before` was read (just before the kill): publishing and folding flow again everywhere,
    the lost node's partitions too."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            now = log_ends(config, topic)
        except TopicError:  # leaders are moving: ask again
            continue
        if all(now[tp] > offset for tp, offset in before.items()):
            return wait_for_offsets(worker, now, deadline - time.monotonic())
        time.sleep(0.2)
    raise AssertionError(f"no events appended to every partition of {topic} in {timeout}s")


def probe_command(client: CommandClient, vault: Accounts, load: Load) -> float:
    """Send one command right away and wait for its result: when (monotonic) it came."""
    cid = client.send(vault.name, "acc-00", "bank.Deposit", {"amount_cents": 1}, timeout=120)
    load.commands.append((cid, "during"))
    return wait_for_results(client, [cid], 180)


def wait_for_results(client: CommandClient, ids: list[str], timeout: float) -> float:
    """When (monotonic) every command in `ids` had its result."""
    started = time.monotonic()
    for cid in ids:
        result = client.wait(cid, max(0.1, started + timeout - time.monotonic()))
        assert result["status"] != "pending", f"command {cid} undecided after {timeout}s"
    return time.monotonic()


def log_ends(config: Config, topic: str) -> dict[tuple[str, int], int]:
    return {(topic, p): end for p, end in Topics(config).end_offsets(topic).items()}


def run_broker_loss(
    config: Config, tmp_path: Path, unique, victim: str, events: int, down_s: float
) -> dict[str, float]:
    """One scenario; returns its measurements (also logged). Losing the controller: the fold
    group's and the command group's coordinator are on the controller too (their names chosen
    so), the worst case: everything moves at once."""
    topic = unique("ledger")
    ledger, name = unique("ledger"), unique("vault")
    if victim == "controller":
        target = pick_victim(config, victim)
        ledger = coordinated_by(config, target, unique, "ledger", lambda n: config.group(n, "v1"))
        name = coordinated_by(
            config, target, unique, "vault", lambda n: config.group("commands", n)
        )
    vault = type("Vault", (Accounts,), {"name": name, "events_topic": name})()
    topics = Topics(config)
    topics.ensure([*internal_topics(config), event_topic(topic, PARTITIONS)])
    topics.ensure([event_topic(name, PARTITIONS)])
    ensure_command_topics(topics, vault)
    worker = FaultWorker(config, ledger, topic, vault, tmp_path / "worker")
    load, stop = Load(), threading.Event()
    batch = events_for(events, accounts=2000, seed=12)
    client = CommandClient(config, {vault.name: vault})
    worker.start()
    threads: list[threading.Thread] = []
    numbers: dict[str, float] = {}
    node: int | None = None
    try:
        for i in range(ACCOUNTS):
            cid = client.send(vault.name, f"acc-{i:02d}", "bank.OpenAccount", {"owner": "ada"})
            assert client.wait(cid, 120)["status"] == "accepted", worker.log.read_text()[-3000:]
        threads = [
            threading.Thread(target=publish, args=(config, topic, batch, load, stop)),
            threading.Thread(target=send_commands, args=(client, vault, load, stop)),
        ]
        for t in threads:
            t.start()
        while len(load.acked) < events // 3:
            assert threads[0].is_alive(), load.publish_errors
            time.sleep(0.1)

        node = pick_victim(config, victim)
        if victim == "controller":
            assert node == target, "the controller moved before the kill"
        ends = log_ends(config, topic)
        before = [cid for cid, phase in load.commands]
        killed = time.monotonic()
        broker.kill_node(config, node)
        load.phase = "during"
        log.info("killed node %d (%s) at %d events acknowledged", node, victim, len(load.acked))
        waits = [
            threading.Thread(target=lambda: numbers.update(
                before_decided_s=wait_for_results(client, before, 180) - killed
            )),
            threading.Thread(target=lambda: numbers.update(
                probe_decided_s=probe_command(client, vault, load) - killed
            )),
        ]  # fmt: skip
        for t in waits:
            t.start()
        numbers["projection_current_s"] = current_again(config, worker, topic, ends, 180) - killed
        for t in waits:
            t.join(200)
        assert {"before_decided_s", "probe_decided_s"} <= set(numbers), numbers
        # A topic created now still gets three replicas (one on the lost node, to catch up).
        spare = unique("while-down")
        Topics(config).ensure([event_topic(spare, 1)])
        made = clients.admin(config).list_topics(spare, timeout=30).topics[spare]
        assert len(made.partitions[0].replicas) == 3
        time.sleep(max(0.0, down_s - (time.monotonic() - killed)))
        broker.start_node(config, node, timeout=180)
        numbers["down_s"] = time.monotonic() - killed
        load.phase = "after"
        assert broker.status(config).brokers == (1, 2, 3)
        threads[0].join(600)
        assert not threads[0].is_alive(), "publisher still running after 600 s"
        time.sleep(3)  # a few commands after the publisher ended too
        stop.set()
        threads[1].join(120)
        numbers["publish_stall_s"] = max(
            b - a for a, b in zip(load.ack_times, load.ack_times[1:], strict=False)
        )
        assert load.publish_errors == [] and load.command_errors == []

        # Every acknowledged event exactly once, nothing else.
        seen = ledger_ids(config, topic)
        assert len(load.acked_ids) == events
        assert [i for i, n in seen.items() if n > 1] == [], "duplicated events"
        assert set(seen) == set(load.acked_ids), "lost or unknown events"

        # The projection equals the fold of what was acknowledged.
        wait_for_offsets(worker, log_ends(config, topic), timeout=300)
        _offsets, states, meta = worker.store_snapshot()
        got = {k: (s["balance_cents"], s["events"]) for k, s in states.items()}
        assert got == oracle(load.acked)
        assert meta == {"events_folded": events, "dead_letters": 0}

        # Every command decided once; the log holds exactly the accepted ones' events.
        ids = [cid for cid, _phase in load.commands]
        phases = Counter(phase for _cid, phase in load.commands)
        assert min(phases[p] for p in ("before", "during", "after")) >= 5, phases
        wait_for_results(client, ids, timeout=180)
        results = read_results(config, vault.results_topic)
        by_id = check_log_matches_results(read_events(config, vault.events_topic), results)
        assert set(by_id) >= set(ids)
        assert len(by_id) == len(ids) + ACCOUNTS
        assert all(b >= 0 for steps in balances(read_events(config, name)).values() for b in steps)
        assert broker.status(config).running, "a node exited after its restart"
        numbers["commands"] = len(ids)
        numbers["accepted"] = sum(by_id[c]["status"] == "accepted" for c in ids)
        log.info("broker loss (%s, node %d, %d events): %s", victim, node, events, numbers)
        print(f"\nbroker loss ({victim}, node {node}, {events} events): {numbers}")
        return numbers
    except AssertionError:
        worker.dump()
        raise
    finally:
        if node is not None and not broker.status(config).running:
            broker.start_node(config, node, timeout=180)  # the next test needs all three
        stop.set()
        for t in threads:
            t.join(60)
        client.close()
        worker.stop()
        report_worker_log(worker)


def report_worker_log(worker: FaultWorker) -> None:
    """The worker's own warnings (not librdkafka's connection chatter), into the test's log."""
    lines = worker.log.read_text(errors="replace").splitlines()
    ours = [line for line in lines if " refold." in line and ("WARNING" in line or "ERROR" in line)]
    for line in ours[:50]:
        log.info("worker: %s", line[:300])
    aborts = sum("transaction aborted" in line for line in lines)
    log.info("worker: %d warnings/errors of refold's, %d aborted transactions", len(ours), aborts)


def coordinated_by(config: Config, node: int, unique, prefix: str, group_of) -> str:
    """A unique name whose consumer group `group_of(name)` has its coordinator on `node`: the
    leader of the `__consumer_offsets` partition Kafka maps the group to (abs(Java hashCode of
    the group id) mod the partition count)."""
    offsets = offsets_topic(config)
    leaders = {p: md.leader for p, md in offsets.partitions.items()}
    for _ in range(1000):
        name = unique(prefix)
        if leaders[java_hash(group_of(name)) % len(leaders)] == node:
            return name
    raise AssertionError(f"no {prefix} name whose group node {node} coordinates: {leaders}")


def offsets_topic(config: Config):
    """`__consumer_offsets`' metadata, once Kafka made it (on a group's first offset fetch)."""
    consumer = clients.consumer(config, config.group("faults-coordinators"))
    try:
        deadline = time.monotonic() + 60
        while True:  # NOT_COORDINATOR while the offsets topic is being made
            try:
                consumer.committed([TopicPartition("__consumer_offsets", 0)], timeout=30)
                break
            except KafkaException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
    finally:
        consumer.close()
    return (
        clients.admin(config)
        .list_topics("__consumer_offsets", timeout=30)
        .topics["__consumer_offsets"]
    )


def java_hash(text: str) -> int:
    """abs(String.hashCode()) as Kafka computes it (Utils.abs: MIN_VALUE -> 0), ASCII text."""
    h = 0
    for ch in text:
        h = (31 * h + ord(ch)) & 0xFFFFFFFF
    if h >= 1 << 31:
        h -= 1 << 32
    return 0 if h == -(1 << 31) else abs(h)


def pick_victim(config: Config, victim: str) -> int:
    controller = broker.active_controller(config)
    assert controller is not None
    if victim == "controller":
        return controller
    return next(n for n in (1, 2, 3) if n != controller)


@pytest.mark.timeout(1200)
def test_losing_the_controller_loses_and_duplicates_nothing(cluster, tmp_path, unique):
    events = int(os.environ.get("REFOLD_FAULTS_EVENTS", 200_000))  # smaller for a quick look
    run_broker_loss(cluster, tmp_path, unique, "controller", events=events, down_s=15)


@pytest.mark.timeout(900)
def test_losing_another_node_loses_and_duplicates_nothing(cluster, tmp_path, unique):
    run_broker_loss(cluster, tmp_path, unique, "other", events=50_000, down_s=10)


def test_every_topic_has_three_replicas_and_two_in_sync(cluster, unique):
    """Kafka's internal topics (offsets, transaction state) and refold's (schemas, events,
    commands, results, claims, dead letters) as the tests above left them, and a new one."""
    topic = unique("events")
    Topics(cluster).ensure([*internal_topics(cluster), event_topic(topic, 1)])
    # Kafka makes its own internal topics on first use: a transaction, a group's offsets.
    producer = clients.producer(cluster, transactional_id=unique("txn"))
    producer.init_transactions(60)
    consumer = clients.consumer(cluster, unique("group"))
    deadline = time.monotonic() + 60
    try:
        while True:  # NOT_COORDINATOR while the offsets topic is being made
            try:
                consumer.committed([TopicPartition(topic, 0)], timeout=30)
                break
            except KafkaException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
    finally:
        consumer.close()
    admin = clients.admin(cluster)
    topics = admin.list_topics(timeout=30).topics
    assert {"__consumer_offsets", "__transaction_state", cluster.schemas_topic} <= set(topics)
    for name, md in topics.items():
        assert {len(p.replicas) for p in md.partitions.values()} == {3}, name
    resources = [ConfigResource(ResourceType.TOPIC, name) for name in topics]
    for resource, future in admin.describe_configs(resources).items():
        assert future.result(timeout=30)["min.insync.replicas"].value == "2", resource
