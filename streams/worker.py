"""`refold worker`: every projection's runner in its own thread, sharing one dead-letter producer."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from confluent_kafka import Producer

from projections.loader import load_projections
from projections.projection import Projection
from streams.config import Config
from streams.errors import ProjectionError
from streams.publisher import Publisher
from streams.registry import codec_for
from streams.runtime import ProjectionRunner, dead_letter_topic_name
from streams.serde import Codec
from streams.topics import INTERNAL_TOPICS, Topics, dead_letter_topic

log = logging.getLogger(__name__)


class Worker:
    """Owns the runners of one process; the query server reads through it."""

    def __init__(
        self,
        config: Config,
        projections: Iterable[Projection] | None = None,
        *,
        codec: Codec | None = None,
        batch_size: int = 5000,
        only: Iterable[str] | None = None,
    ) -> None:
        self.config = config
        self.codec = codec or codec_for(config)
        self.projections = list(
            load_projections(config.app_modules) if projections is None else projections
        )
        if only is not None:
            wanted = set(only)
            unknown = wanted - {p.name for p in self.projections}
            if unknown:
                raise ProjectionError(f"unknown projection(s) {sorted(unknown)}")
            self.projections = [p for p in self.projections if p.name in wanted]
        self._batch_size = batch_size
        self._topics = Topics(config)
        self._check_sources()
        self._dlq = Producer(config.kafka(**{"enable.idempotence": True, "acks": "all"}))
        self.runners: dict[str, ProjectionRunner] = {}
        self._threads: list[threading.Thread] = []
        self._publisher: Publisher | None = None
        self._publisher_lock = threading.Lock()

    def _check_sources(self) -> None:
        for projection in self.projections:
            for topic in projection.topics:
                if not self._topics.exists(topic):
                    raise ProjectionError(
                        f"projection {projection.name!r} reads topic {topic!r}, which does not "
                        "exist on the broker",
                        hint=f"run `refold topics ensure {topic}`",
                    )

    @property
    def publisher(self) -> Publisher:
        """A publisher for `POST /events`, created on first use."""
        with self._publisher_lock:
            if self._publisher is None:
                self._publisher = Publisher(self.config, self.codec)
            return self._publisher

    def start(self) -> None:
        self._topics.ensure(
            [
                *INTERNAL_TOPICS,
                *(dead_letter_topic(dead_letter_topic_name(p.name)) for p in self.projections),
            ]
        )
        for projection in self.projections:
            runner = ProjectionRunner(
                self.config,
                self.codec,
                projection,
                dead_letters=self._dlq,
                batch_size=self._batch_size,
            )
            self.runners[projection.name] = runner
            thread = threading.Thread(
                target=runner.run, name=f"fold-{projection.name}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        for runner in self.runners.values():
            runner.stop()
        for thread in self._threads:
            thread.join(timeout)
        self._dlq.flush(10)
        if self._publisher is not None:
            self._publisher.close()

    def runner(self, name: str) -> ProjectionRunner:
        try:
            return self.runners[name]
        except KeyError:
            raise ProjectionError(
                f"unknown projection {name!r}",
                hint="known: " + ", ".join(sorted(self.runners)),
            ) from None
