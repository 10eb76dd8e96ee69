"""Topic declarations and `refold topics ensure`: event topics keep data forever."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import (
    ClusterMetadata,
    ConfigResource,
    NewTopic,
    OffsetSpec,
    ResourceType,
)
from refold.core.config import Config
from refold.core.errors import TopicError
from refold.kafka import clients

log = logging.getLogger(__name__)

DEFAULT_PARTITIONS = 6


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """A topic refold creates: event topics are append-only and never expire."""

    name: str
    partitions: int = DEFAULT_PARTITIONS
    config: Mapping[str, str] = field(default_factory=lambda: {"retention.ms": "-1"})


def event_topic(name: str, partitions: int = DEFAULT_PARTITIONS) -> TopicSpec:
    return TopicSpec(name, partitions, {"retention.ms": "-1", "cleanup.policy": "delete"})


def compacted_topic(name: str, partitions: int = 1) -> TopicSpec:
    return TopicSpec(name, partitions, {"cleanup.policy": "compact", "retention.ms": "-1"})


def dead_letter_topic(name: str) -> TopicSpec:
    return TopicSpec(name, 1, {"retention.ms": "-1"})


def internal_topics(config: Config) -> list[TopicSpec]:
    """The topics refold itself needs on any cluster: the writer schemas of this deployment,
    and the workers' advertised HTTP addresses (`refold.kafka.members`)."""
    return [compacted_topic(config.schemas_topic), compacted_topic(f"_{config.app_id}.members")]


_LEADER_MOVING = {KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE}


class Topics:
    """Admin operations with a metadata cache; errors name the topic and the cause."""

    def __init__(self, config: Config) -> None:
        self._admin = clients.admin(config)
        self._known: dict[str, int] = {}

    def partitions(self, topic: str, *, timeout: float = 10.0) -> int:
        """Partition count of an existing topic; TopicError if it does not exist."""
        if topic in self._known:
            return self._known[topic]
        try:
            md = self._admin.list_topics(topic=topic, timeout=timeout)
        except KafkaException as exc:
            raise TopicError(
                f"cannot read metadata for topic {topic!r}: {exc}",
                hint="is the broker running? `refold broker status`",
            ) from exc
        tmd = md.topics.get(topic)
        if tmd is None or tmd.error is not None or not tmd.partitions:
            raise TopicError(
                f"topic {topic!r} does not exist",
                hint="create it with `refold topics ensure " + topic + "` or publish with --create",
            )
        self._known[topic] = len(tmd.partitions)
        return self._known[topic]

    def end_offsets(self, topic: str, *, timeout: float = 10.0) -> dict[int, int]:
        """Each partition's log end offset (high watermark) now: the offset the next record gets."""
        wanted = {
            TopicPartition(topic, p): OffsetSpec.latest() for p in range(self.partitions(topic))
        }
        deadline = time.monotonic() + timeout
        while True:
            try:
                futures = self._admin.list_offsets(wanted, request_timeout=timeout)
                return {tp.partition: future.result().offset for tp, future in futures.items()}
            except KafkaException as exc:
                # A partition whose leader is still being elected (a new topic) says so: ask again.
                if exc.args[0].code() not in _LEADER_MOVING or time.monotonic() > deadline:
                    raise TopicError(
                        f"cannot read the end offsets of topic {topic!r}: {exc}",
                        hint="is the broker running? `refold broker status`",
                    ) from exc
                time.sleep(0.1)

    def exists(self, topic: str) -> bool:
        try:
            self.partitions(topic)
        except TopicError:
            return False
        return True

    def names(self, *, timeout: float = 10.0) -> set[str]:
        """Every topic the cluster has now."""
        try:
            return set(self._admin.list_topics(timeout=timeout).topics)
        except KafkaException as exc:
            raise TopicError(
                f"cannot list the topics: {exc}",
                hint="is the broker running? `refold broker status`",
            ) from exc

    def max_message_bytes(self, topic: str, *, timeout: float = 10.0) -> int:
        """The largest record batch the brokers take on `topic`: its `max.message.bytes`
        (its own or the broker default it inherits). TopicError if it cannot be read."""
        resource = ConfigResource(ResourceType.TOPIC, topic)
        try:
            futures = self._admin.describe_configs([resource], request_timeout=timeout)
            entries = futures[resource].result(timeout=timeout)
            return int(entries["max.message.bytes"].value)
        except (KafkaException, KeyError, ValueError, TypeError) as exc:
            raise TopicError(
                f"cannot read max.message.bytes of topic {topic!r}: {exc}",
                hint="reading a topic's configs needs DESCRIBE_CONFIGS on it",
            ) from exc

    def broker_count(self) -> int:
        return len(self._admin.list_topics(timeout=10).brokers)

    def ensure(self, specs: Iterable[TopicSpec], *, timeout: float = 30.0) -> list[str]:
        """Create the topics that do not exist yet; returns the names created."""
        wanted = {s.name: s for s in specs}
        if not wanted:
            return []
        try:
            md = self._admin.list_topics(timeout=timeout)
        except KafkaException as exc:
            raise TopicError(f"cannot reach Kafka: {exc}", hint="`refold broker status`") from exc
        replication = self._replication(md)
        missing = [s for name, s in wanted.items() if name not in md.topics]
        created: list[str] = []
        if missing:
            new = [
                NewTopic(s.name, s.partitions, replication, config=dict(s.config)) for s in missing
            ]
            for name, future in self._admin.create_topics(new, request_timeout=timeout).items():
                try:
                    future.result()
                    created.append(name)
                except KafkaException as exc:
                    if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                        raise TopicError(f"cannot create topic {name!r}: {exc}") from exc
            log.info("created topics %s", created)
        self._wait_visible(list(wanted), timeout)
        return created

    def _replication(self, md: ClusterMetadata) -> int:
        """Three replicas where the cluster has three brokers, fewer on a smaller one, and never
        fewer than the cluster's own `default.replication.factor`. The metadata lists only the
        live brokers: without that floor a topic created while a node is down (a worker starting
        creates its dead-letter topics) would stay under-replicated for good; with it, a KRaft
        controller places a replica on the fenced node too, which catches up when it is back."""
        wanted = min(3, len(md.brokers))
        resource = ConfigResource(ResourceType.BROKER, str(next(iter(md.brokers))))
        try:
            entries = self._admin.describe_configs([resource])[resource].result(timeout=10)
            default = int(entries["default.replication.factor"].value)
        except (KafkaException, KeyError, ValueError, TypeError) as exc:  # not allowed to read it
            log.debug("cannot read default.replication.factor: %s", exc)
            return wanted
        return max(wanted, default)

    def _wait_visible(self, names: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            md = self._admin.list_topics(timeout=timeout)
            pending = [
                n
                for n in names
                if n not in md.topics
                or md.topics[n].error is not None
                or any(p.leader < 0 for p in md.topics[n].partitions.values())
            ]
            if not pending:
                for n in names:
                    self._known[n] = len(md.topics[n].partitions)
                return
            if time.monotonic() > deadline:
                raise TopicError(f"topics {pending} have no leader after {timeout:.0f}s")
            time.sleep(0.1)
