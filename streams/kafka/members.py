"""Who answers HTTP for which worker: the compacted topic `_<app id>.members`, keyed by worker id
(`refold.engine.worker.worker_id`, the first part of every static group member's instance id),
each value `{"url": "http://HOST:PORT", "pid": N, "at": ms}`.

A worker's query server advertises its address when it starts and withdraws it (a tombstone)
when it stops; a worker killed with kill -9 leaves its entry behind, which is harmless: lookups
are forwarded only to the member the broker names as a partition's owner, and a dead member
stops being named once its session expires. Every query server tails the topic from the start
in a daemon thread (`Members.start`), so `url(worker_id)` is a dictionary read.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition
from refold.core.config import Config
from refold.kafka import clients

log = logging.getLogger(__name__)

POLL_S = 0.5


class Members:
    """The advertised HTTP address of every worker of this deployment."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.topic = f"_{config.app_id}.members"  # created with `topics.internal_topics`
        self._urls: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._producer = clients.producer(config)

    def advertise(self, worker_id: str, url: str) -> None:
        body = {"url": url, "pid": os.getpid(), "at": int(time.time() * 1000)}
        self._producer.produce(self.topic, key=worker_id.encode(), value=json.dumps(body).encode())
        self._producer.flush(10)
        self._urls[worker_id] = url

    def withdraw(self, worker_id: str) -> None:
        self._producer.produce(self.topic, key=worker_id.encode(), value=None)
        self._producer.flush(10)

    def url(self, worker_id: str) -> str | None:
        return self._urls.get(worker_id)

    def known(self) -> dict[str, str]:
        return dict(self._urls)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._tail, name="refold-members", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _tail(self) -> None:
        consumer = clients.consumer(
            self.config,
            self.config.group("members", "reader"),
            required={"enable.partition.eof": False},
        )
        try:
            consumer.assign([TopicPartition(self.topic, 0, OFFSET_BEGINNING)])
            while not self._stop.is_set():
                for msg in consumer.consume(500, POLL_S):
                    error = msg.error()
                    if error is not None:
                        if error.code() != KafkaError._PARTITION_EOF:
                            log.debug("members topic: %s", error.str())
                        continue
                    worker = (msg.key() or b"").decode()
                    value = msg.value()
                    if value is None:
                        self._urls.pop(worker, None)
                        continue
                    try:
                        self._urls[worker] = str(json.loads(value)["url"])
                    except (ValueError, KeyError, TypeError):
                        log.warning("members topic: unreadable entry for %r", worker)
        finally:
            consumer.close()
