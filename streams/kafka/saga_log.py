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
from refold.core.errors import InputError, SagaConflict, SagaError
from refold.core.sagas import SAGA_EVENT, Saga, Start, data_json, saga_event, start_from_json
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
    returns. A saga id names one run: a repeat with the same data answers as the first time
    and appends nothing, one with other data raises SagaConflict (HTTP 409) and appends
    nothing, checked against the starts made here and, with `known` (saga, saga id) -> state,
    against the saga's state. With the app's `deciders`, `prepare` refuses a start whose
    steps send commands none of them would take (`refold.core.sagas.check_sends`)."""

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
        #: The data (as JSON) of the starts made here, until the projection has folded them.
        self._recent: dict[tuple[str, str], str] = {}
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
            if self._started_before(name, start):
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
            self._recent[(name, start.saga_id)] = start.data_json
            return Started(start.saga_id, name)

    def _started_before(self, name: str, start: Start) -> bool:
        """Whether this saga id was started before with the same data; SagaConflict when with
        other data (the first start's data is the run's, a second `started` would only be
        folded as a duplicate: the caller must hear it, as for a command or task id)."""
        saga_id = start.saga_id
        first = self._recent.get((name, saga_id))
        if first is None:
            state = None if self._known is None else self._known(name, saga_id)
            if state is None or state.get("status") is None:  # no `started` folded
                return False
            first = data_json(state.get("data"))
        if first == start.data_json:
            return True
        status_url = Started(saga_id, name).status_url
        raise SagaConflict(
            f"saga id {saga_id!r} of saga {name!r} was started before with other data "
            f"(first: {first[:200]}); a saga id names one run, whose status is at {status_url}",
            saga_id=saga_id,
            status_url=status_url,
            hint="use a new saga id for another run",
        )

    def close(self) -> None:
        self._producer.flush(30)
