"""Shared fixtures: one real Kafka broker per test session, unique names, a Config per test.

The broker comes from REFOLD_BOOTSTRAP_SERVERS when set, else from testcontainers when a Docker
engine answers, else from the local launcher (`refold.cli.broker`) in a temp dir on a free port.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from refold.core.config import Config

log = logging.getLogger(__name__)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test under tests/integration needs the real broker: mark it `integration`."""
    integration_dir = Path(__file__).parent / "integration"
    for item in items:
        if integration_dir in Path(item.path).parents:
            item.add_marker(pytest.mark.integration)


def _docker_answers() -> bool:
    try:
        import docker  # comes with testcontainers, if installed

        docker.from_env().ping()
    except Exception:  # no client library, no socket, no daemon: all mean "no Docker"
        return False
    return True


@contextmanager
def _container_broker() -> Iterator[str]:
    """apache/kafka in Docker, single KRaft node, same settings as deploy/docker-compose.yml."""
    from refold.cli import broker
    from testcontainers.core.container import DockerContainer

    port = broker.free_port()  # same port inside and out, so the advertised address just works
    container = DockerContainer(f"apache/kafka:{broker.kafka_version()}").with_bind_ports(
        port, port
    )
    env = {
        "KAFKA_NODE_ID": "1",
        "KAFKA_PROCESS_ROLES": "broker,controller",
        "KAFKA_LISTENERS": f"PLAINTEXT://:{port},CONTROLLER://:9093",
        "KAFKA_ADVERTISED_LISTENERS": f"PLAINTEXT://127.0.0.1:{port}",
        "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9093",
        "KAFKA_NUM_PARTITIONS": "6",
        "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false",
        "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR": "1",
    }
    for key, value in env.items():
        container = container.with_env(key, value)
    with container:
        bootstrap = f"127.0.0.1:{port}"
        broker.wait_until_answering(bootstrap, brokers=1, timeout=90.0)
        yield bootstrap


@pytest.fixture(scope="session")
def bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The bootstrap servers of the session's Kafka broker.

    Order: REFOLD_BOOTSTRAP_SERVERS; Docker via testcontainers (skip with REFOLD_TEST_DOCKER=0);
    the local launcher on a free port, stopped when the session ends.
    """
    configured = os.environ.get("REFOLD_BOOTSTRAP_SERVERS")
    if configured:
        yield configured
        return
    if os.environ.get("REFOLD_TEST_DOCKER", "1") != "0" and _docker_answers():
        with _container_broker() as address:
            yield address
        return
    from refold.cli import broker

    data_dir = tmp_path_factory.mktemp("session-broker")
    config = Config(data_dir=data_dir)
    info = broker.start(config, port=broker.free_port())
    log.info("session broker on %s (data in %s)", info.bootstrap_servers, data_dir)
    try:
        yield info.bootstrap_servers
    finally:
        broker.stop(config)


@pytest.fixture
def unique(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """A factory of names unique to this test run: `unique("topic")` -> `topic-<test>-<uuid8>`."""
    short = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name.removeprefix("test_"))[:24].strip("-")

    def make(prefix: str) -> str:
        return f"{prefix}-{short}-{uuid.uuid4().hex[:8]}"

    return make


@pytest.fixture
def config(bootstrap: str, tmp_path: Path) -> Config:
    """A Config with its own data dir, pointed at the session broker."""
    return Config(data_dir=tmp_path / "refold", bootstrap_override=bootstrap)
