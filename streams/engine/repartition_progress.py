"""How far a re-keyed projection's routing got (refold.engine.repartition): the routing group's
committed source offsets, read by a replay that routes up to the source's ends (`route_until`,
`routed_offsets`) and by a query that waits for a source position (`RoutedPositions`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping

from confluent_kafka import Consumer, TopicPartition
from refold.core.config import Config
from refold.core.errors import ProjectionError
from refold.core.projection import Projection
from refold.core.serde import Codec
from refold.engine.repartition import Repartitioner, routing_group
from refold.engine.runner_stats import TP
from refold.engine.timetravel import murmur2_partition as murmur2
from refold.kafka import clients
from refold.kafka.log import topic_partitions, watermarks


def routed_offsets(
    config: Config, projection: Projection, version: int, tps: Iterable[TP]
) -> dict[TP, int]:
    """The next source offset the version's routing has committed, per partition (0: none)."""
    checker = clients.consumer(config, routing_group(config, projection, version))
    try:
        asked = [TopicPartition(t, p) for t, p in tps]
        committed = checker.committed(asked, timeout=config.broker_timeout_s)
        return {(tp.topic, tp.partition): max(tp.offset, 0) for tp in committed}
    finally:
        checker.close()


def route_until(
    config: Config,
    codec: Codec,
    projection: Projection,
    version: int,
    ends: Mapping[TP, int],
    *,
    worker_id: str,
    timeout: float,
) -> None:
    """Route the source of a re-keyed version into its repartition topic up to `ends` (a
    replay's build, in one process): a member of the version's repartition group (dynamic:
    workers that build the version share the work) until the group's committed offsets reach
    `ends`. ProjectionError when it fails or does not move for `timeout` seconds."""
    feeder = Repartitioner(
        config,
        codec,
        projection,
        version,
        worker_id=worker_id,
        dlq_topic=config.dead_letter_topic(projection.name),
        static=False,
    )
    thread = threading.Thread(target=feeder.run, name=f"route-{projection.name}", daemon=True)
    thread.start()
    checker = clients.consumer(config, feeder.group)
    try:
        wanted = [TopicPartition(t, p) for t, p in ends]
        last: dict[TP, int] = {}
        moved_at = time.monotonic()
        while True:
            committed = checker.committed(wanted, timeout=config.broker_timeout_s)
            got = {(tp.topic, tp.partition): max(tp.offset, 0) for tp in committed}
            if all(got.get(tp, 0) >= end for tp, end in ends.items()):
                return
            if feeder.stats.state == "failed":
                raise ProjectionError(
                    f"routing {projection.name!r} v{version} to its repartition topic failed: "
                    f"{feeder.stats.error}"
                )
            if got != last:
                last, moved_at = got, time.monotonic()
            elif time.monotonic() - moved_at > timeout:
                raise ProjectionError(
                    f"routing {projection.name!r} v{version} did not move for {timeout:.0f} s",
                    hint="is the broker up? run the replay again: it resumes",
                )
            time.sleep(0.2)
    finally:
        feeder.stop()
        thread.join(60)
        checker.close()


class RoutedPositions:
    """Read-your-writes across the repartition hop. A client knows the SOURCE position of its
    event; the runner stores repartition positions. An event of source partition p at offset o
    is in the repartition topic once the routing group's committed offset of p passes o (the
    offsets are committed in the routing transaction), in the partition of its new key, below
    that partition's end (the last stable offset) read afterwards: a runner that has folded up
    to there has folded it. `needed` translates; one broker round trip per wait, or none when
    the routing is known to have passed it already."""

    def __init__(self, config: Config, projection: Projection, version: int, topic: str) -> None:
        self._config = config
        self._group = routing_group(config, projection, version)
        self._topic = topic
        self.sources = tuple(projection.topics)
        self._lock = threading.Lock()
        self._reader: Consumer | None = None
        self._routed: dict[TP, int] = {}  # committed source offsets seen (they only grow)
        self._count = 0

    def needed(
        self, wanted: Mapping[TP, int], key: str | None, timeout: float
    ) -> dict[TP, int] | None:
        """`wanted` with its source positions replaced by the repartition positions that hold
        their events for `key` (every partition when None); None when the routing has not
        passed them within `timeout` seconds."""
        source = {tp: o for tp, o in wanted.items() if tp[0] in self.sources}
        out = {tp: o for tp, o in wanted.items() if tp[0] not in self.sources}
        if not source:
            return out
        deadline = time.monotonic() + timeout
        with self._lock:
            reader = self._reader
            if reader is None:
                reader = self._reader = clients.consumer(self._config, self._group)
                self._count = len(topic_partitions(reader, self._topic))
            while not all(self._routed.get(tp, 0) > o for tp, o in source.items()):
                asked = [TopicPartition(t, p) for t, p in source]
                for tp in reader.committed(asked, timeout=self._config.broker_timeout_s):
                    if tp.offset >= 0:
                        where = (tp.topic, tp.partition)
                        self._routed[where] = max(self._routed.get(where, 0), tp.offset)
                if all(self._routed.get(tp, 0) > o for tp, o in source.items()):
                    break
                if time.monotonic() > deadline:
                    return None
                time.sleep(0.05)
            parts = range(self._count) if key is None else [murmur2(key.encode(), self._count)]
            ends = watermarks(reader, [(self._topic, r) for r in parts])
        for tp, (_low, high) in ends.items():
            if high > 0:
                out[tp] = max(out.get(tp, -1), high - 1)
        return out

    def close(self) -> None:
        with self._lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
