"""Sagas on Kafka: their topics, the records of saga events, and the client that starts sagas
(`SagaClient`, used by `POST /sagas`, the CLI and Python).

Every saga event is a refold event (`refold.sagas.SagaEvent`, Avro single-object encoded,
CloudEvents headers) on `<saga>.saga`, keyed by saga id, so `refold tail` and the projection
runtime read it like any other. A saga that ends `failed` for a person to look at also leaves a
record on `<saga>.saga.dead`.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from confluent_kafka import KafkaError, Message, Producer
from refold.core import envelope
from refold.core.commands import Decider
from refold.core.config import Config
from refold.core.errors import InputError, SagaError
from refold.core.sagas import SAGA_EVENT, Saga, Start, saga_event, start_from_json
from refold.core.serde import Codec
from refold.kafka import clients
from refold.kafka.registry import SchemaRegistry, codec_for
from refold.kafka.topics import Topics, TopicSpec, dead_letter_topic, event_topic

log = logging.getLogger(__name__)


def saga_topics(saga: Saga) -> list[TopicSpec]:
    """The saga's event topic (kept forever: it is the saga's state) and its dead letters."""
    return [event_topic(saga.topic, saga.partitions), dead_letter_topic(saga.dead_topic)]


def ensure_saga_topics(topics: Topics, sagas: Mapping[str, Saga]) -> list[str]:
    specs = [spec for saga in sagas.values() for spec in saga_topics(saga)]
    if specs:
        topics.ensure(specs)
    return [spec.name for spec in specs]


class Acks:
    """Delivery reports of a group of records: `wait` raises SagaError unless all arrived."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.errors.append(f"{msg.topic()}: {err.str()}")

    def wait(self, producer: Producer, what: str, timeout: float = 30.0) -> None:
        remaining = producer.flush(timeout)
        if self.errors or remaining:
            raise SagaError(f"{what} not acknowledged: {self.errors or f'{remaining} pending'}")


class SagaLog:
    """Encodes saga events with their envelope; the writer schema is registered once."""

    def __init__(self, config: Config, codec: Codec, source: str | None = None) -> None:
        self.codec = codec
        self.source = source or f"refold://{socket.gethostname()}/sagas"
        self._registry = SchemaRegistry(config, codec.catalog)

    def register(self, producer: Producer) -> None:
        """Make the saga schema durable in the registry topic before any record uses it."""
        self._registry.ensure_registered(self.codec.writer_for(SAGA_EVENT), producer)

    def produce(
        self,
        producer: Producer,
        topic: str,
        key: str,
        data: dict[str, Any],
        on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
    ) -> None:
        value = self.codec.encode(SAGA_EVENT, data)
        headers = envelope.headers(SAGA_EVENT, source=self.source, id=uuid.uuid4().hex)
        while True:
            try:
                producer.produce(topic, value, key, headers=headers, on_delivery=on_delivery)
                return
            except BufferError:
                producer.poll(0.05)


@dataclass(frozen=True, slots=True)
class Started:
    """The answer to a start: the same for a repeat of the saga id."""

    saga_id: str
    saga: str
    repeated: bool = False

    @property
    def status_url(self) -> str:
        # quoted: a saga id is any text (spaces, "?", "#", newlines); "/" stays, as the route
        # takes the rest of the path as the id (like a projection key)
        return f"/sagas/{self.saga}/{quote(self.saga_id, safe='/')}"

    def to_json(self) -> dict[str, Any]:
        return {"saga_id": self.saga_id, "status": "running", "status_url": self.status_url}


#: Looks a saga id up in the saga's state projection: its state, or None when unknown.
Lookup = Callable[[str, str], dict[str, Any] | None]


class SagaClient:
    """Starts sagas: a `started` event, durable (acks=all, idempotent producer) before `start`
    returns. `known` (saga, saga id) -> state makes a repeated saga id answer as the first time
    and append nothing. With the app's `deciders`, `prepare` refuses a start whose steps send
    commands none of them would take (`refold.core.sagas.check_sends`)."""

    def __init__(
        self,
        config: Config,
        sagas: Mapping[str, Saga],
        *,
        codec: Codec | None = None,
        known: Lookup | None = None,
        deciders: Mapping[str, Decider] | None = None,
    ) -> None:
        self.sagas = dict(sagas)
        self.deciders = None if deciders is None else dict(deciders)
        self.log = SagaLog(config, codec or codec_for(config))
        self._known = known
        self._producer = clients.producer(config, defaults={"linger.ms": 1})
        self._lock = threading.Lock()  # flush() waits for everything: one caller at a time
        self._recent: dict[tuple[str, str], Started] = {}  # until the projection has folded it
        self._registered = False

    def saga(self, name: str) -> Saga:
        try:
            return self.sagas[name]
        except KeyError:
            known = ", ".join(sorted(self.sagas)) or "none"
            raise InputError(f"unknown saga {name!r}; known: {known}") from None

    def prepare(self, name: str, obj: Any) -> Start:
        """Check a start request without sending anything (InputError if bad)."""
        return start_from_json(self.saga(name), obj, self.deciders)

    def start(self, name: str, start: Start) -> Started:
        saga = self.saga(name)
        with self._lock:
            if (name, start.saga_id) in self._recent or (
                self._known is not None and self._known(name, start.saga_id) is not None
            ):
                return Started(start.saga_id, name, repeated=True)
            if not self._registered:
                self.log.register(self._producer)
                self._registered = True
            acks = Acks()
            event = saga_event(
                start.saga_id, "started", data=start.data_json, at_ms=int(time.time() * 1000)
            )
            self.log.produce(self._producer, saga.topic, start.saga_id, event, acks)
            acks.wait(self._producer, f"start of saga {name!r} {start.saga_id!r}")
            if len(self._recent) > 100_000:
                self._recent.clear()
            answer = self._recent[(name, start.saga_id)] = Started(start.saga_id, name)
            return answer

    def close(self) -> None:
        self._producer.flush(30)
