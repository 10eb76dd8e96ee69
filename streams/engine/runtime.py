"""The projection runtime: Kafka records folded into a store with exactly-once effect.

Commit steps, in order, for every batch (the order is what makes a crash at any point harmless):

1. consume up to `batch_size` records from the partitions this worker owns (read_committed);
2. decode each record and fold it into an in-memory write-back cache; records at offsets already
   folded (redelivered after a rebalance or a rewind) are skipped;
3. poison records (undecodable, a fold exception) are produced to the dead-letter topic, and the
   producer is flushed, before anything else is written;
4. ONE RocksDB WriteBatch stores the changed states, the re-key links, the counters and every
   partition's next offset — the store is the truth, a crash before this step re-folds from
   Kafka, a crash after it finds the offsets already moved. A partition's next offset is the
   consumer's position when that is further: past the transaction markers (and aborted records)
   that read_committed never delivers, so a topic written in transactions ends at lag 0. While
   the consumer keeps handing out
   full batches (a backlog: catching up, rebuilding), consecutive batches share one WriteBatch,
   up to `commit_every` events or `commit_interval_s` seconds, so a key folded many times is
   written once; a short batch (caught up) is written at once, so freshness does not wait;
5. the offsets are committed to Kafka asynchronously, at most once per `KAFKA_COMMIT_INTERVAL_S`
   (and when partitions are revoked or the runner closes); they are advisory (monitoring, lag):
   on assignment the consumer always seeks to the store's offsets, never to Kafka's, and
   commits them again, so an external reset of the group's offsets does not outlive it.

A poison record found while earlier batches wait for their write may have half-changed their
cached states, so those batches are not written: the consumer rewinds to the stored offsets and
folds them again, skipping (dead-lettering) the poison record by its position.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from refold.core.config import Config
from refold.core.errors import DecodeError, ProjectionError
from refold.core.projection import Projection
from refold.core.serde import HEADER_LEN, Codec, Event
from refold.engine.membership import fold_group_settings
from refold.kafka import clients
from refold.kafka.log import end_offsets, topic_partitions
from refold.store.rocksdb import RocksStore, Store
from refold.store.versions import store_path

log = logging.getLogger(__name__)

TP = tuple[str, int]
_MISSING = object()
_key = Message.key
MAX_CACHED_STATES = 200_000
# Kafka's copy of the offsets only informs monitoring, so it may trail the store's by this much.
# (Committing it after every batch sent hundreds of OffsetCommit requests a second at light load,
# broker and client work on the path of every fresh event.)
KAFKA_COMMIT_INTERVAL_S = 1.0
#: Batches folded during a backlog share one store write up to this many events or seconds.
COMMIT_EVERY = 50_000
COMMIT_INTERVAL_S = 0.5
#: An owned partition is "behind" while records it held this many seconds ago are not folded.
BEHIND_S = 5.0
#: A consumer is replaced at most this often (a fatal error that recurs, say a KIP-848 static
#: member refused until its predecessor expires, does not spin).
REJOIN_EVERY_S = 5.0


def rebuild_writes(config: Config) -> dict[str, Any]:
    """How rebuilds write: nobody reads a rebuild's store before it is done, so one WriteBatch
    takes `config.rebuild_write_every` events (250k by default; with 100k keys over 1M events,
    2 writes per key instead of 9: 15-20% less CPU per event, measured) and a crash re-folds at
    most that much."""
    return {
        "commit_every": config.rebuild_write_every,
        "commit_interval_s": 5.0,
        "write_when_caught_up": False,
    }


def tune_collector() -> None:
    """Folding allocates many short-lived dicts; the default collector thresholds make it run
    every few hundred events (measured: 100k -> 115k events/s on a 200k-event rebuild). Every
    process that folds calls this: the CLI and the parallel rebuild's children."""
    gc.set_threshold(100_000, 50, 100)


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


def dead_letter_topic_name(config: Config, name: str) -> str:
    return config.dead_letter_topic(name)


@dataclass(slots=True)
class RunnerStats:
    """Counters and positions a runner publishes for status, metrics and read-your-writes."""

    state: str = "starting"  # starting | running | stopped | failed
    error: str | None = None
    folded: int = 0
    dead_letters: int = 0
    skipped: int = 0
    batches: int = 0
    rejoins: int = 0  # consumers replaced (`ProjectionRunner.rejoin`)
    positions: dict[TP, int] = field(default_factory=dict)  # next offset per owned partition
    assigned: tuple[TP, ...] = ()
    high_watermarks: dict[TP, int] = field(default_factory=dict)
    last_commit_ms: float = 0.0
    # Refreshed about once a second by the fold thread (`_refresh_watermarks`), each a new object:
    lag: dict[TP, int] = field(default_factory=dict)  # records not folded, per owned partition
    behind: tuple[TP, ...] = ()  # owned partitions with records older than BEHIND_S unfolded
    refreshed_at: float = 0.0  # time.monotonic() of that refresh


class Behind:
    """Which partitions hold records older than `after` seconds that are not folded yet: fed
    the end offsets seen and the positions folded, once a second or so."""

    def __init__(self, after: float = BEHIND_S) -> None:
        self._after = after
        self._seen: list[tuple[float, Mapping[TP, int]]] = []  # (when, ends), oldest first

    def update(
        self, now: float, ends: Mapping[TP, int], folded: Mapping[TP, int]
    ) -> tuple[TP, ...]:
        """Partitions not folded to the ends seen `after` s ago (or, for partitions watched
        less long than that, to the first end seen: a new owner is behind until it caught up
        with what was there when it took the partition)."""
        seen = self._seen
        seen.append((now, ends))
        while len(seen) > 1 and seen[1][0] <= now - self._after:
            seen.pop(0)  # seen[0] stays: the newest sample at least `after` s old
        behind = []
        for tp, nxt in folded.items():
            ref = next((m[tp] for _t, m in seen if tp in m), None)
            if ref is not None and nxt < ref:
                behind.append(tp)
        return tuple(sorted(behind))


class _Poison(Exception):
    """A record that cannot be folded (undecodable, or the fold raised), and why."""

    def __init__(self, msg: Message, reason: str) -> None:
        self.msg = msg
        self.reason = reason


Where = tuple[str, int, int]  # topic, partition, offset


@dataclass(slots=True)
class _Pending:
    """Folded batches not yet written to the store: what their one WriteBatch will hold."""

    changed: dict[str, Any] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    offsets: dict[TP, int] = field(default_factory=dict)  # next offset per partition
    folded: int = 0
    skipped: int = 0
    dead: int = 0
    batches: int = 0
    since: float = 0.0  # when the first of them was folded

    def clear(self) -> None:
        self.changed = {}
        self.links = {}
        self.offsets = {}
        self.folded = self.skipped = self.dead = self.batches = 0


class ProjectionRunner:
    """Runs one projection version: a consumer in group `refold.<name>.v<version>` and a store."""

    def __init__(
        self,
        config: Config,
        codec: Codec,
        projection: Projection,
        *,
        dead_letters: Producer,
        store: Store | None = None,
        version: int | None = None,
        batch_size: int = 5000,
        consumer_conf: Mapping[str, object] | None = None,
        replay_below: Mapping[TP, int] | None = None,
        commit_every: int = COMMIT_EVERY,
        commit_interval_s: float = COMMIT_INTERVAL_S,
        write_when_caught_up: bool = True,
        instance_id: str | None = None,
    ) -> None:
        self.config = config
        self.codec = codec
        self.projection = projection
        self.version = version or projection.version
        self.name = projection.name
        self.dlq_topic = dead_letter_topic_name(config, self.name)
        self.store: Store = store or RocksStore.open(store_path(config, self.name, self.version))
        self.started_at = time.monotonic()
        self.stats = RunnerStats(
            folded=int(self.store.meta("events_folded") or 0),
            dead_letters=int(self.store.meta("dead_letters") or 0),
            skipped=int(self.store.meta("skipped") or 0),
        )
        self._dlq = dead_letters
        self._batch_size = batch_size
        self._commit_every = commit_every
        self._commit_interval_s = commit_interval_s
        self._write_when_caught_up = write_when_caught_up
        self._cache: dict[str, Any] = {}
        # While every state this runner ever stored is still cached, a key missing from the
        # cache has no state in the store either: no need to read it (a rebuild from scratch).
        self._cache_complete = not self.store.offsets() and not self.store.scan(limit=1)
        self._pending = _Pending()
        self._poison: dict[Where, str] = {}  # positions to skip (or stop at), with the reason
        self._dead_lettered: set[Where] = set()  # of those, already in the dead-letter topic
        self._careful = 0  # after a rewind, write every batch for this many records
        self._next: dict[TP, int] = {}
        self._rekeys = projection.rekeys
        # Positions below these were already processed by the live version: events there are
        # marked `replay` so side-effecting handlers do not repeat themselves.
        self._replay_below = dict(replay_below or {})
        self._bounds: dict[TP, int] = {}
        self._beyond: dict[TP, int] = {}  # first offset past its bound seen, per partition
        self._paused: set[TP] = set()
        self._watermarks_at = 0.0
        self._behind = Behind()
        self._uncommitted: dict[TP, int] = {}  # stored, not yet committed to Kafka
        self._kafka_committed_at = 0.0
        self._stop = threading.Event()
        self._changed = threading.Condition()
        #: Told the keys of every commit, after it (the task reconciler's index listens here).
        self.on_commit: Callable[[Iterable[str]], None] | None = None
        # `instance_id`: static membership (refold.engine.membership), given by the worker.
        self.instance_id = instance_id
        self._consumer_conf = consumer_conf
        self._consumer = self._new_consumer()
        self._rejoin: str | None = None  # why the consumer must be replaced (see `rejoin`)
        self._rejoined_at = 0.0
        self._closing: list[threading.Thread] = []  # replaced consumers being closed

    def _new_consumer(self) -> Consumer:
        membership, required = fold_group_settings(self.config, self.instance_id)
        return clients.consumer(
            self.config,
            group_id(self.config, self.name, self.version),
            defaults={**FOLD_CONSUMER_CONF, **membership, **(self._consumer_conf or {})},
            required=required,
        )

    @property
    def topics(self) -> tuple[str, ...]:
        return tuple(self.projection.topics)

    # -- lifecycle --------------------------------------------------------------------------

    def run(self) -> None:
        """Fold until `stop()`; exceptions end the runner in state `failed` with the reason."""
        try:
            self._subscribe()
            self.stats.state = "running"
            while not self._stop.is_set():
                if self._rejoin is not None:
                    self._renew_consumer(self._rejoin)
                    continue
                msgs = self._next_batch()
                if msgs:
                    self._process(msgs)
                self._refresh_watermarks()
        except Exception as exc:
            self._failed(exc)
        finally:
            self.close()

    def _subscribe(self) -> None:
        self._consumer.subscribe(
            list(self.projection.topics),
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

    def _failed(self, exc: Exception) -> None:
        log.exception("projection %s v%d failed", self.name, self.version)
        self.stats.state = "failed"
        self.stats.error = f"{type(exc).__name__}: {exc}"

    def close(self) -> None:
        if self.stats.state != "failed":
            self.stats.state = "stopped"
        try:
            self._write_pending_unless_failed()
            self._commit_to_kafka(list(self._uncommitted))
            self._consumer.close()
        except Exception:  # the store must still close; the group will expire the member
            log.exception("%s v%d: closing the consumer failed", self.name, self.version)
        finally:
            try:
                self.store.close()
            finally:
                with self._changed:
                    self._changed.notify_all()

    def stop(self) -> None:
        self._stop.set()

    def _write_pending_unless_failed(self, past_markers: bool = True) -> None:
        """Store the batches folded but not yet written (they are complete: folding happens
        between consume() calls). Not after a failure: the batch that failed may have left its
        records in the pending write without their dead letters."""
        if self.stats.state != "failed" and self._pending.offsets:
            self._write_pending(past_markers)

    # -- bounded folding (rebuilds) ---------------------------------------------------------

    def assign_all(self, partitions: Collection[int] | None = None) -> dict[TP, int]:
        """Own every partition of the source topics (no group: a rebuild reads them all), or
        those with the given numbers, from the store's offsets; returns the high watermarks."""
        stored = self.store.offsets()
        owned = [
            (topic, p)
            for topic in self.projection.topics
            for p in topic_partitions(self._consumer, topic)
            if partitions is None or p in partitions
        ]
        assigned = [TopicPartition(t, p, stored.get((t, p), OFFSET_BEGINNING)) for t, p in owned]
        for tp in owned:
            self._next[tp] = stored.get(tp, 0)
        ends = end_offsets(self._consumer, owned)
        self._consumer.assign(assigned)
        self._publish_assignment(self._consumer)
        self.stats.state = "running"
        return ends

    def run_until(self, bounds: Mapping[TP, int], timeout: float | None = None) -> bool:
        """Fold every assigned partition up to (not including) its bound, then stop reading it.

        Returns True once all bounds are reached, False on timeout or `stop()`.
        """
        self._bounds = dict(bounds)
        resume = [
            TopicPartition(t, p, self._next.get((t, p), 0))
            for t, p in self._paused
            if self._next.get((t, p), 0) < self._bounds.get((t, p), 0)
        ]
        if resume:
            self._consumer.resume(resume)
            for tp in resume:
                self._paused.discard((tp.topic, tp.partition))
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stop.is_set():
            if self._bounds_reached():
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            msgs = self._next_batch()
            if msgs:
                self._process(msgs)
                self._pause_beyond_bounds()
            self._refresh_watermarks()
        return False

    def _pause_beyond_bounds(self) -> None:
        """Partitions whose records passed their bound stop here; they resume on a new bound."""
        if not self._beyond:
            return
        tps = [TopicPartition(t, p, self._bounds[(t, p)]) for t, p in self._beyond]
        self._consumer.pause(tps)
        for tp in tps:
            self._consumer.seek(tp)  # the records beyond the bound are read again later
        self._paused.update(self._beyond)
        self._beyond.clear()

    def _bounds_reached(self) -> bool:
        """True once every bound is folded and stored."""
        folded = {**self._next, **self._pending.offsets}
        short = [tp for tp, bound in self._bounds.items() if folded.get(tp, 0) < bound]
        if short:
            # Transaction markers occupy offsets that are never delivered: trust the consumer's
            # position for partitions whose folded offset stopped short of the bound.
            positions = self._consumer.position([TopicPartition(*tp) for tp in short])
            if any(tp.offset < self._bounds[(tp.topic, tp.partition)] for tp in positions):
                return False
            for t, p in short:  # stored at the bound, past its markers
                self._pending.offsets[(t, p)] = self._bounds[(t, p)]
        self._write_pending()
        return True

    # -- rebalancing ------------------------------------------------------------------------

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

    # -- folding ----------------------------------------------------------------------------

    def _next_batch(self) -> list[Message]:
        """Whatever is already fetched, up to the batch size; else wait up to 100 ms for one
        record. (consume(n, timeout) would hold a lone record back until n arrive or the timeout
        passes, which is the whole freshness budget at light load.)"""
        msgs = self._consumer.consume(self._batch_size, 0)
        if msgs:
            return msgs
        if self._write_when_caught_up and self._pending.offsets:
            self._write_pending()  # the backlog ended with a full batch
        self._commit_to_kafka_due()  # the offsets of the last batches, once the load stops
        first = self._consumer.poll(0.1)
        if first is None:
            return []
        return [first, *self._consumer.consume(self._batch_size - 1, 0)]

    def _process(self, msgs: list[Message]) -> None:
        pending = self._pending
        if not pending.batches:
            pending.since = time.monotonic()
        while True:
            try:
                stop, dead = self._fold(msgs)
                break
            except _Poison as p:
                msg = p.msg
                self._poison[(msg.topic(), msg.partition(), msg.offset())] = p.reason
                # The fold may have half-mutated cached states: forget them all; fold again from
                # the store (rewinding past batches that wait for their write), skipping it.
                self._cache.clear()
                self._cache_complete = False
                if pending.batches:
                    self._rewind(msgs)
                    return
                pending.clear()
                pending.since = time.monotonic()
        if dead:
            self._dead_letter(dead)
        pending.batches += 1
        careful = self._careful > 0
        if careful:
            self._careful -= len(msgs)
        if stop is not None:
            msg, reason = stop
            self._write_pending(past_markers=False)  # the records after `msg` are not folded
            position = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
            self.stats.error = f"stopped at {position}: {reason}"
            self.stats.state = "failed"
            self._stop.set()
        elif (
            careful
            or (self._write_when_caught_up and len(msgs) < self._batch_size and self._caught_up())
            or pending.folded + pending.skipped >= self._commit_every
            or time.monotonic() - pending.since >= self._commit_interval_s
        ):
            self._write_pending()

    def _caught_up(self) -> bool:
        """No more than a batch left to read in the partitions waiting for a write, by the log
        ends the fetcher last saw (no broker round trip). A short batch alone does not say it:
        under CPU contention the fetcher can fall behind the fold thread in a backlog."""
        consumer = self._consumer
        for (topic, partition), nxt in self._pending.offsets.items():
            tp = TopicPartition(topic, partition)
            if consumer.get_watermark_offsets(tp, cached=True)[1] - nxt > self._batch_size:
                return False
        return True

    def _rewind(self, msgs: list[Message]) -> None:
        """Drop the batches waiting for their write and read them again from the stored offsets."""
        # Write batch by batch for a while: more poison nearby then costs no further rewinds.
        self._careful = self._commit_every
        tps = set(self._pending.offsets)
        tps.update((m.topic(), m.partition()) for m in msgs if m.error() is None)
        self._pending.clear()
        for tp in tps:
            self._beyond.pop(tp, None)
            target = TopicPartition(tp[0], tp[1], self._next.get(tp, 0))
            if tp in self._paused:
                self._consumer.resume([target])
                self._paused.discard(tp)
            self._consumer.seek(target)
        log.info("%s v%d: rewound %s to fold them again", self.name, self.version, sorted(tps))

    def _fold(
        self, msgs: list[Message]
    ) -> tuple[tuple[Message, str] | None, list[tuple[Message, str]]]:
        """Fold `msgs` into the pending write; returns where to stop (a poison record of a
        projection that stops on errors) and the poison records to dead-letter first.

        The paths are chosen once per batch, not per record: poison positions known from an
        earlier attempt leave the batch first (`_without_poison`), then the records are folded
        under their own keys (`_fold_keyed`, the hot loop) or under the keys `key()` names
        (`_fold_rekeyed`)."""
        stop: tuple[Message, str] | None = None
        dead: list[tuple[Message, str]] = []
        passed: dict[TP, int] = {}
        if self._poison:
            msgs, stop, dead, passed = self._without_poison(msgs)
        if self._rekeys:
            self._fold_rekeyed(msgs)
        else:
            self._fold_keyed(msgs)
        next_offsets = self._pending.offsets
        for tp, nxt in passed.items():
            next_offsets[tp] = max(next_offsets.get(tp, 0), nxt)
        return stop, dead

    def _without_poison(
        self, msgs: list[Message]
    ) -> tuple[list[Message], tuple[Message, str] | None, list[tuple[Message, str]], dict[TP, int]]:
        """Take the records at known poison positions out of the batch. For a projection that
        stops on errors, the batch ends before the first one (returned as where to stop);
        otherwise each is counted, dead-lettered once, and its partition's next offset moves
        past it (returned, applied after the fold). Positions the fold would skip anyway
        (already folded, past a rebuild's bound) stay in the batch for it to skip."""
        poison, pending = self._poison, self._pending
        stops = self.projection.on_error == "stop"
        keep: list[Message] = []
        dead: list[tuple[Message, str]] = []
        passed: dict[TP, int] = {}
        for index, msg in enumerate(msgs):
            where = (msg.topic(), msg.partition(), msg.offset())
            reason = poison.get(where) if msg.error() is None else None
            if reason is None or not self._unfolded(where):
                keep.append(msg)
                continue
            if stops:
                return msgs[:index], (msg, reason), [], {}
            pending.dead += 1
            passed[where[:2]] = where[2] + 1
            if where not in self._dead_lettered:
                dead.append((msg, reason))
        return keep, None, dead, passed

    def _unfolded(self, where: Where) -> bool:
        """True if the fold would take a record at `where`: not folded yet, within bounds."""
        tp, offset = where[:2], where[2]
        if offset < max(self._next.get(tp, 0), self._pending.offsets.get(tp, 0)):
            return False
        bound = self._bounds.get(tp) if self._bounds else None
        return bound is None or offset < bound

    def _fold_keyed(self, msgs: list[Message]) -> None:
        """Fold each record under its own key. The measured hot loop (bench/fold_micro.py,
        the rebuild scenario), so one function with everything inline: records come in runs
        from one partition, whose position checks are looked up once per run; the generated
        decoder is called directly; a fresh rebuild's cache says which keys have no state."""
        projection = self.projection
        apply, initial = projection.apply, projection.initial
        decode, raw = self.codec.decode, self.codec.raw_decoders
        cache, pending = self._cache, self._pending
        next_offsets, changed = pending.offsets, pending.changed
        expected, replay_below = self._next, self._replay_below
        bounds, beyond = self._bounds, self._beyond
        keys = None if self._cache_complete else self._load_keys(msgs)
        topic, partition, tp = "", -1, ("", -1)
        floor = replay_floor = 0
        bound: int | None = None
        folded = 0
        try:
            for index, msg in enumerate(msgs):
                if msg.error() is not None:
                    self._consume_error(msg)
                    continue
                if msg.partition() != partition or msg.topic() != topic:
                    topic, partition = msg.topic(), msg.partition()
                    tp = (topic, partition)
                    floor = max(expected.get(tp, 0), next_offsets.get(tp, 0))
                    bound = bounds.get(tp) if bounds else None
                    replay_floor = replay_below.get(tp, 0) if replay_below else 0
                offset = msg.offset()
                if offset < floor:
                    continue  # already folded: a redelivery after a seek
                if bound is not None and offset >= bound:
                    beyond.setdefault(tp, offset)  # a rebuild's bound: read again later
                    continue
                floor = next_offsets[tp] = offset + 1
                if keys is None:
                    raw_key = msg.key()
                    key = None if raw_key is None else raw_key.decode("utf-8", "replace")
                else:
                    key = keys[index]
                value = msg.value()
                found = raw.get(value[:HEADER_LEN]) if value else None
                try:
                    if key is None:
                        raise DecodeError("record has no key (events are keyed by aggregate id)")
                    if found is not None:  # the common case, without two wrapper calls
                        type_name = found[0]
                        data = found[1](value)
                    else:
                        type_name, data = decode(value)
                except (IndexError, ValueError, UnicodeDecodeError) as exc:
                    reason = f"undecodable: Avro body does not decode: {exc}"
                    raise _Poison(msg, reason) from exc
                except DecodeError as exc:
                    raise _Poison(msg, f"undecodable: {exc}") from exc
                event = Event(type_name, key, data, topic, partition, offset, 0, None, msg)
                if offset < replay_floor:
                    event.replay = True
                try:
                    state = cache.get(key, _MISSING)
                    state = apply(initial(key) if state is _MISSING else state, event)
                except Exception as exc:  # a bug or bad data in user code: poison, not a crash
                    raise _Poison(msg, f"{event.type}: {type(exc).__name__}: {exc}") from exc
                cache[key] = state
                changed[key] = state
                folded += 1
        finally:
            pending.folded += folded

    def _load_keys(self, msgs: list[Message]) -> list[str | None]:
        """The batch's keys, with the states of those not cached read in one `get_many`."""
        keys = [None if k is None else k.decode("utf-8", "replace") for k in map(_key, msgs)]
        missing = [k for k in set(keys) if k is not None and k not in self._cache]
        if missing:
            self._cache.update(self.store.get_many(missing))
        return keys

    def _fold_rekeyed(self, msgs: list[Message]) -> None:
        """Fold each record under the key `projection.key(event)` names; None folds it under
        the key its aggregate was last routed to (a link, stored with the states), and an
        aggregate never routed is skipped."""
        projection, store, cache, pending = self.projection, self.store, self._cache, self._pending
        links = pending.links
        folded = skipped = 0
        try:
            for msg, event in self._events(msgs):
                try:
                    key = projection.key(event)
                    if key is None:
                        key = links.get(event.key) or store.link(event.key)
                        if key is None:
                            skipped += 1
                            continue
                    elif links.get(event.key, "") != key and store.link(event.key) != key:
                        links[event.key] = key
                    state = cache.get(key, _MISSING)
                    if state is _MISSING:
                        state = store.get(key)
                        if state is None:
                            state = projection.initial(key)
                    state = projection.apply(state, event)
                except Exception as exc:  # a bug or bad data in user code: poison, not a crash
                    raise _Poison(msg, f"{event.type}: {type(exc).__name__}: {exc}") from exc
                cache[key] = state
                pending.changed[key] = state
                folded += 1
        finally:
            pending.folded += folded
            pending.skipped += skipped

    def _events(self, msgs: list[Message]) -> Iterator[tuple[Message, Event]]:
        """The batch's records not folded yet and within bounds, decoded, in order; moves each
        partition's next offset past every record it yields. (`_fold_keyed` does the same
        inline.)"""
        next_offsets, expected = self._pending.offsets, self._next
        for msg in msgs:
            if msg.error() is not None:
                self._consume_error(msg)
                continue
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            tp = (topic, partition)
            if offset < max(expected.get(tp, 0), next_offsets.get(tp, 0)):
                continue  # already folded: a redelivery after a seek
            bound = self._bounds.get(tp) if self._bounds else None
            if bound is not None and offset >= bound:
                self._beyond.setdefault(tp, offset)  # a rebuild's bound: read again later
                continue
            next_offsets[tp] = offset + 1
            raw_key = msg.key()
            try:
                if raw_key is None:
                    raise DecodeError("record has no key (events are keyed by aggregate id)")
                type_name, data = self.codec.decode(msg.value())
            except DecodeError as exc:
                raise _Poison(msg, f"undecodable: {exc}") from exc
            key = raw_key.decode("utf-8", "replace")
            event = Event(type_name, key, data, topic, partition, offset, 0, None, msg)
            event.replay = offset < self._replay_below.get(tp, 0)
            yield msg, event

    def _consume_error(self, msg: Message) -> None:
        error = msg.error()
        if error.fatal() or error.code() == KafkaError._FATAL:  # e.g. refused by the group
            self.rejoin(f"the consumer failed: {error}")
            return
        if error.code() != KafkaError._PARTITION_EOF:
            log.warning("%s: consume error %s", self.name, error)

    def _write_pending(self, past_markers: bool = True) -> None:
        """Step 4: the pending batches' states, links, counters and offsets in one WriteBatch.
        `past_markers`: every record the consumer returned is folded, so its position may be
        stored where it is further (see `_past_markers`)."""
        pending = self._pending
        next_offsets = pending.offsets
        if not next_offsets:
            pending.clear()
            return
        if past_markers:
            self._past_markers(next_offsets)
        stats = self.stats
        folded, skipped, dead = pending.folded, pending.skipped, pending.dead
        meta: dict[str, Any] = {"events_folded": stats.folded + folded}
        if dead:
            meta["dead_letters"] = stats.dead_letters + dead
        if skipped:
            meta["skipped"] = stats.skipped + skipped
        self.store.commit(pending.changed, next_offsets, links=pending.links, meta=meta)
        if self.on_commit is not None:
            self.on_commit(pending.changed.keys())
        pending.clear()
        stats.folded += folded
        stats.dead_letters += dead
        stats.skipped += skipped
        stats.batches += 1
        stats.last_commit_ms = time.time() * 1000
        self._next.update(next_offsets)
        positions = dict(stats.positions)
        positions.update(next_offsets)
        stats.positions = positions
        if self._poison:
            self._forget_poison(next_offsets)
        if len(self._cache) > MAX_CACHED_STATES:
            self._cache.clear()
            self._cache_complete = False
        with self._changed:
            self._changed.notify_all()
        self._uncommitted.update(next_offsets)
        self._commit_to_kafka_due()

    def _past_markers(self, offsets: dict[TP, int]) -> None:
        """Move next offsets up to the consumer's position where it is further: the offsets in
        between hold transaction markers or aborted records, which read_committed never delivers
        (position() is the last record returned + 1, past the markers that followed it). Only
        when every record returned is folded; never past a rebuild's bound. Without this a
        partition ending in a marker (every transactional write) shows lag 1 forever."""
        tps = [TopicPartition(t, p) for t, p in offsets if (t, p) not in self._beyond]
        if not tps or self._paused.intersection(offsets):
            return
        bounds = self._bounds
        for tp in self._consumer.position(tps):
            key = (tp.topic, tp.partition)
            position = tp.offset if not bounds else min(tp.offset, bounds.get(key, tp.offset))
            if position > offsets[key]:
                offsets[key] = position

    def _skip_trailing_markers(self) -> None:
        """Store positions that moved past markers while nothing was folded (a marker fetched
        after the last record of its transaction): an offsets-only write."""
        if self._pending.offsets or self._beyond or self._stop.is_set():
            return  # (stopped: maybe at a poison record, with records after it not folded)
        owned = {tp: self._next[tp] for tp in self.stats.assigned if tp in self._next}
        moved = dict(owned)
        self._past_markers(moved)
        moved = {tp: o for tp, o in moved.items() if o > owned[tp]}
        if moved:
            self._pending.offsets.update(moved)
            self._write_pending(past_markers=False)

    def _forget_poison(self, stored: Mapping[TP, int]) -> None:
        """Poison positions now below the stored offsets are never read again."""
        for where in [w for w in self._poison if w[2] < stored.get((w[0], w[1]), -1)]:
            del self._poison[where]
            self._dead_lettered.discard(where)

    def pending_positions(self) -> dict[TP, int]:
        """Next offsets folded so far, stored or still waiting for their write (progress)."""
        return {**self.stats.positions, **self._pending.offsets}

    def folded_so_far(self) -> int:
        """Events folded, stored or still waiting for their write (progress)."""
        return self.stats.folded + self._pending.folded

    def _commit_to_kafka_due(self) -> None:
        if self._uncommitted and (
            time.monotonic() - self._kafka_committed_at >= KAFKA_COMMIT_INTERVAL_S
        ):
            self._commit_to_kafka(list(self._uncommitted))

    def _commit_to_kafka(self, tps: list[TP]) -> None:
        """Commit the stored offsets of `tps` to the group, asynchronously (advisory only)."""
        if not tps:
            return
        self._kafka_committed_at = time.monotonic()
        offsets = [TopicPartition(t, p, self._uncommitted.pop((t, p))) for t, p in tps]
        try:
            self._consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as exc:  # e.g. not a group member right now; the store is the truth
            log.info("%s v%d: advisory offset commit failed: %s", self.name, self.version, exc)

    # -- poison -----------------------------------------------------------------------------

    def _dead_letter(self, records: list[tuple[Message, str]]) -> None:
        for msg, reason in records:
            log.warning(
                "%s: dead-lettering %s[%d]@%d: %s",
                self.name,
                msg.topic(),
                msg.partition(),
                msg.offset(),
                reason,
            )
            headers = list(msg.headers() or [])
            headers += [
                ("refold_dlq_reason", reason.encode()),
                ("refold_dlq_projection", f"{self.name}.v{self.version}".encode()),
                ("refold_dlq_topic", msg.topic().encode()),
                ("refold_dlq_partition", str(msg.partition()).encode()),
                ("refold_dlq_offset", str(msg.offset()).encode()),
            ]
            self._dlq.produce(self.dlq_topic, msg.value(), msg.key(), headers=headers)
        if self._dlq.flush(30):
            # Without the dead letter durable, the offset must not move past the poison record.
            raise ProjectionError(f"{self.name}: dead-letter topic {self.dlq_topic} unreachable")
        self._dead_lettered.update((m.topic(), m.partition(), m.offset()) for m, _ in records)

    # -- read-your-writes -------------------------------------------------------------------

    def reached(self, wanted: Mapping[TP, int]) -> bool:
        """True once every (topic, partition) in `wanted` has folded that offset."""
        positions = self.stats.positions
        stored: dict[TP, int] | None = None
        for tp, offset in wanted.items():
            nxt = positions.get(tp)
            if nxt is None:
                stored = stored if stored is not None else self.store.offsets()
                nxt = stored.get(tp, 0)
            if nxt <= offset:
                return False
        return True

    def wait_for(self, wanted: Mapping[TP, int], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not self.reached(wanted):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.stats.state in ("stopped", "failed"):
                    return False
                self._changed.wait(remaining)
        return True

    def lag(self) -> dict[TP, int]:
        """Records behind the end of each owned partition, as of the last refresh (about once a
        second, done by the fold thread: confluent-kafka serialises calls on one consumer, so
        another thread asking it directly would wait behind the fold loop)."""
        return self.stats.lag

    def _refresh_watermarks(self) -> None:
        now = time.monotonic()
        if now - self._watermarks_at < 1.0:
            return
        self._watermarks_at = now
        marks: dict[TP, int] = {}
        owned = self.stats.assigned
        for tp in owned:
            # cached=True reads what the fetcher last learned: no broker round trip.
            _low, high = self._consumer.get_watermark_offsets(TopicPartition(*tp), cached=True)
            if high >= 0:
                marks[tp] = high
        self.stats.high_watermarks = marks
        self._skip_trailing_markers()  # stored positions move past transaction markers
        positions = self.stats.positions
        self.stats.lag = {tp: max(0, high - positions.get(tp, 0)) for tp, high in marks.items()}
        self.stats.behind = self._behind.update(now, marks, positions)
        self.stats.refreshed_at = now
