"""The local broker launcher against real Kafka JVMs of its own (not the session broker)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from refold.cli import broker
from refold.core.config import Config
from refold.core.errors import BrokerError

HEAP_MB = 384


@pytest.fixture
def own_config(tmp_path: Path) -> Iterator[Config]:
    """A data dir for a broker this test starts; whatever it left running is stopped after."""
    config = Config(data_dir=tmp_path / "refold")
    yield config
    broker.stop(config, timeout=20)


def create_topic(bootstrap: str, topic: str, partitions: int = 1, rf: int = 1) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, partitions, rf)])[topic].result(timeout=30)


def produce(bootstrap: str, topic: str, value: bytes, **extra: object) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", **extra})
    outcomes: list[KafkaError | None] = []
    producer.produce(topic, value, key=b"k", on_delivery=lambda err, _: outcomes.append(err))
    assert producer.flush(30) == 0, "record not delivered within 30s"
    assert outcomes == [None]


def consume_all(bootstrap: str, topic: str, expected: int, timeout: float = 30.0) -> list[bytes]:
    """Read every partition of `topic` from offset 0 (no group) until `expected` records came."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": "unused",  # required by librdkafka; assign() joins no group, commits nothing
        "enable.auto.commit": False,
    })  # fmt: skip
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    values: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while len(values) < expected and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            values.append(msg.value() or b"")
    finally:
        consumer.close()
    return values


def exited(pid: int) -> bool:
    """True once `pid` is gone or a zombie (its parent, init here, may not have reaped it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_single_node_lifecycle(own_config, unique):
    """Status, idempotent start, stop sparing strangers, data kept across restarts, fresh wipe."""
    nothing = broker.status(own_config)
    assert nothing.bootstrap_servers is None and nothing.nodes == () and not nothing.answering
    assert "no local broker" in broker.describe_status(nothing)

    info = broker.start(own_config, port=broker.free_port(), heap_mb=HEAP_MB)
    assert [n.node_id for n in info.nodes] == [1]
    assert info.bootstrap_servers == f"127.0.0.1:{info.nodes[0].port}"
    assert own_config.bootstrap_servers == info.bootstrap_servers  # the record Config reads
    assert "Kafka Server started" in info.logs[0].read_text()
    running = broker.status(own_config)
    assert running.answering and running.running and running.brokers == (1,)
    assert running.nodes == (broker.NodeStatus(1, True, info.nodes[0].pid, info.nodes[0].port),)
    assert f"running (pid {info.nodes[0].pid})" in broker.describe_status(running)

    topic = unique("events")
    create_topic(info.bootstrap_servers, topic)
    produce(info.bootstrap_servers, topic, b"first")
    assert consume_all(info.bootstrap_servers, topic, 1) == [b"first"]

    # starting again while it runs returns the same broker, same pid
    assert broker.start(own_config, heap_mb=HEAP_MB).nodes == info.nodes

    # a record naming a pid that is not our Kafka node gets nothing signalled
    record = own_config.broker_record
    real = record.read_text()
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        record.write_text(real.replace(f'"pid": {info.nodes[0].pid}', f'"pid": {bystander.pid}'))
        assert broker.stop(own_config, timeout=5) == 0
        assert bystander.poll() is None
        assert broker.wait_until_answering(info.bootstrap_servers, timeout=5) == (1,)
    finally:
        record.write_text(real)
        bystander.kill()
        bystander.wait()

    assert broker.stop(own_config) == 1
    assert exited(info.nodes[0].pid)  # type: ignore[arg-type]
    stopped = broker.status(own_config)
    assert not stopped.answering and not stopped.nodes[0].running
    assert stopped.nodes[0].pid is None
    assert "node 1 on port" in broker.describe_status(stopped)
    assert (info.nodes[0].dir / "data" / "meta.properties").is_file()

    again = broker.start(own_config, heap_mb=HEAP_MB)
    assert again.bootstrap_servers == info.bootstrap_servers  # same ports come back
    assert again.cluster_id == info.cluster_id
    assert again.nodes[0].pid != info.nodes[0].pid
    assert consume_all(again.bootstrap_servers, topic, 1) == [b"first"]

    wiped = broker.start(own_config, heap_mb=HEAP_MB, fresh=True)
    assert wiped.cluster_id != info.cluster_id
    assert wiped.bootstrap_servers == info.bootstrap_servers
    admin = AdminClient({"bootstrap.servers": wiped.bootstrap_servers})
    assert topic not in admin.list_topics(timeout=10).topics


def test_failed_start_says_why_and_leaves_nothing_running(own_config):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(BrokerError, match="in use"):
            broker.start(own_config, port=taken.getsockname()[1])

    with pytest.raises(BrokerError, match="exited while starting") as failure:
        broker.start(own_config, port=broker.free_port(), heap_mb=16)  # far too small a heap
    assert "OutOfMemoryError" in str(failure.value)
    state = broker.status(own_config)
    assert not state.answering and [n.pid for n in state.nodes] == [None]


def test_a_node_whose_controller_port_was_taken_moves_to_another(own_config, unique, monkeypatch):
    """Between picking a port and binding it, an outgoing connection may take it (the ports
    the OS hands out are in the ephemeral range): the node is relaunched on another one."""
    real = broker._new_layout
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        def layout(*args, **kwargs):  # the layout chose `port` while it was still free
            info = real(*args, **kwargs)
            return replace(info, nodes=(replace(info.nodes[0], controller_port=port),))

        monkeypatch.setattr(broker, "_new_layout", layout)
        info = broker.start(own_config, port=broker.free_port(), heap_mb=HEAP_MB)
    monkeypatch.undo()
    assert info.nodes[0].controller_port != port
    topic = unique("moved")
    create_topic(info.bootstrap_servers, topic)
    produce(info.bootstrap_servers, topic, b"still here")
    # The record holds the new port: a restart comes back on it, with its data.
    broker.stop(own_config)
    again = broker.start(own_config, heap_mb=HEAP_MB)
    assert again.nodes[0].controller_port == info.nodes[0].controller_port
    assert consume_all(again.bootstrap_servers, topic, 1) == [b"still here"]


def test_three_nodes_survive_losing_one(own_config, unique):
    info = broker.start(own_config, nodes=3, port=broker.free_port(), heap_mb=HEAP_MB)
    assert [n.node_id for n in info.nodes] == [1, 2, 3]
    assert broker.status(own_config).brokers == (1, 2, 3)
    assert len(info.bootstrap_servers.split(",")) == 3
    topic = unique("replicated")
    create_topic(info.bootstrap_servers, topic, partitions=3, rf=3)
    produce(info.bootstrap_servers, topic, b"before")

    broker.kill_node(own_config, 2, signal.SIGKILL)
    state = broker.status(own_config)
    assert [n.running for n in state.nodes] == [True, False, True]
    # acks=all with min.insync.replicas=2 still succeeds with two of three replicas
    produce(info.bootstrap_servers, topic, b"during")
    assert sorted(consume_all(info.bootstrap_servers, topic, 2)) == [b"before", b"during"]

    node = broker.start_node(own_config, 2)
    assert node.pid is not None and node.pid != info.nodes[1].pid
    assert broker.status(own_config).brokers == (1, 2, 3)
    assert broker.stop(own_config) == 3
