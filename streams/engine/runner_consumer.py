"""The projection runner's consumer and its group: how it reads (`FOLD_CONSUMER_CONF`), which
group it is in, what it does on assignment (seek to the store's offsets: the store is the truth)
and revocation (store the pending batches first), and its replacement by a new consumer in the
same group when the old one lost the group for good (`RunnerConsumer.rejoin`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from types import MappingProxyType

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from refold.core.config import Config
from refold.core.projection import Projection
from refold.engine.membership import fold_group_settings
from refold.engine.runner_stats import TP
from refold.engine.runner_writes import RunnerWrites
from refold.kafka import clients

log = logging.getLogger(__name__)

#: A consumer is replaced at most this often (a fatal error that recurs, say a KIP-848 static
#: member refused until its predecessor expires, does not spin).
REJOIN_EVERY_S = 5.0


#: How the fold consumer reads. The prefetch bounds keep a worker's memory independent of the
#: backlog: librdkafka keeps ~340 bytes per buffered record beside the record itself (measured),
#: and fetch sizes count compressed bytes, so 10 MiB partition fetches of small lz4 records once
#: buffered 3 of a 4M-record backlog (1.1 GB). Now at most queued.min.messages plus one 1 MiB
#: fetch response are buffered; the 10 ms backoff refetches as soon as the queue runs below the
#: minimum (the default 1 s starved the fold loop of such a small queue).
FOLD_CONSUMER_CONF: Mapping[str, object] = MappingProxyType(
    {
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "fetch.max.bytes": 1 << 20,
        "max.partition.fetch.bytes": 256 << 10,
        "queued.min.messages": 20_000,
        "queued.max.messages.kbytes": 16 << 10,
        "fetch.queue.backoff.ms": 10,
    }
)


def group_id(config: Config, name: str, version: int) -> str:
    """The consumer group of one projection version: `<app id>.<name>.v<version>`."""
    return config.group(name, f"v{version}")


class RunnerConsumer(RunnerWrites):
    """The consumer of a `ProjectionRunner`: subscription, rebalances, replacement."""

    config: Config
    projection: Projection
    _topics: tuple[str, ...]  # what it folds: the source topics, or a repartition topic
    instance_id: str | None
    _consumer_conf: Mapping[str, object] | None
    _rejoin: str | None
    _rejoined_at: float
    _closing: list[threading.Thread]

    def _new_consumer(self) -> Consumer:
        membership, required = fold_group_settings(self.config, self.instance_id)
        return clients.consumer(
            self.config,
            group_id(self.config, self.name, self.version),
            defaults={**FOLD_CONSUMER_CONF, **membership, **(self._consumer_conf or {})},
            required=required,
        )

    def _subscribe(self) -> None:
        self._consumer.subscribe(
            list(self._topics),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )

    def rejoin(self, reason: str) -> None:
        """Ask the fold thread to replace its consumer with a new one in the same group (any
        thread may call this): for a consumer that lost its group for good. librdkafka 2.16 was
        seen not to rejoin after the group coordinator's node was lost (the coordinator that
        took over dropped the static member and it never came back), and treats some refusals
        as fatal; the health monitor calls this when the group shows it (refold.engine.health).
        """
        if self._rejoin is None:
            self._rejoin = reason

    def _renew_consumer(self, reason: str) -> None:
        """Store what is folded, close the consumer (in the background: a consumer cut off from
        its coordinator may take long to close) and subscribe a new one. Nothing else changes:
        on assignment the new one seeks to the store's offsets, like any owner."""
        wait = self._rejoined_at + REJOIN_EVERY_S - time.monotonic()
        if wait > 0 and self._stop.wait(wait):
            return
        log.warning("%s v%d: a new consumer joins the group: %s", self.name, self.version, reason)
        self._write_pending_unless_failed(past_markers=False)
        old = self._consumer
        self._consumer = self._new_consumer()
        self._rejoin = None
        self._rejoined_at = time.monotonic()
        self.stats.rejoins += 1
        self._next.clear()
        self._uncommitted.clear()  # the new owner commits the stored offsets on assignment
        self._set_owned(())
        self.stats.joined = False
        closing = threading.Thread(
            target=self._close_replaced, args=(old,), name=f"close-{self.name}", daemon=True
        )
        closing.start()
        self._closing = [t for t in self._closing if t.is_alive()] + [closing]
        self._subscribe()

    def _close_replaced(self, consumer: Consumer) -> None:
        try:
            consumer.close()
        except Exception as exc:  # it is gone either way; the group expires or fences it
            log.info("%s v%d: closing a replaced consumer: %s", self.name, self.version, exc)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if consumer is not self._consumer:
            return  # a replaced consumer, closing: it folds nothing more
        stored = self.store.offsets()
        for tp in partitions:
            key = (tp.topic, tp.partition)
            tp.offset = stored.get(key, OFFSET_BEGINNING)
            self._next[key] = stored.get(key, 0)
            if key in stored:  # the store is the truth: undo any reset of the group's offsets
                self._uncommitted[key] = stored[key]
        consumer.incremental_assign(partitions)
        self._publish_assignment(consumer)
        self.stats.joined = True  # (called with no partitions too: a member given none)
        log.info("%s v%d assigned %s", self.name, self.version, [str(p) for p in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if consumer is not self._consumer:
            return  # a replaced consumer, closing (its folded batches were stored before)
        # Batches waiting for their write are stored first (this runs inside consume(), between
        # two folds); then Kafka's advisory copy of the revoked partitions' offsets. Not past
        # the consumer's position: records this consume() call already took are not folded.
        self._write_pending_unless_failed(past_markers=False)
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        self._commit_to_kafka([tp for tp in revoked if tp in self._uncommitted])
        for tp in revoked:
            self._next.pop(tp, None)
        consumer.incremental_unassign(partitions)
        # Not consumer.assignment(): during close() the handle is already being destroyed.
        self._set_owned(tuple(tp for tp in self.stats.assigned if tp not in revoked))

    def _publish_assignment(self, consumer: Consumer) -> None:
        self._set_owned(tuple(sorted((tp.topic, tp.partition) for tp in consumer.assignment())))

    def _set_owned(self, owned: tuple[TP, ...]) -> None:
        self.stats.assigned = owned
        self.stats.positions = {tp: self._next.get(tp, 0) for tp in owned}
