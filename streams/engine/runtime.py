"""The projection runtime: Kafka records folded into a store with exactly-once effect.

Commit steps, in order, for every batch (the order is what makes a crash at any point harmless):

1. consume up to `batch_size` records from the partitions this worker owns (read_committed);
2. decode each record and fold it into an in-memory write-back cache; records at offsets already
   folded (redelivered after a rebalance or a rewind) are skipped;
3. poison records (undecodable, a fold exception) are produced to the dead-letter topic, and the
   producer is flushed, before anything else is written;
4. ONE RocksDB WriteBatch stores the changed states, the re-key links, the counters and every
   partition's next offset — the store is the truth, a crash before this step re-folds from
   Kafka, a crash after it finds the offsets already moved. While the consumer keeps handing out
   full batches (a backlog: catching up, rebuilding), consecutive batches share one WriteBatch,
   up to `commit_every` events or `commit_interval_s` seconds, so a key folded many times is
   written once; a short batch (caught up) is written at once, so freshness does not wait;
5. the offsets are committed to Kafka asynchronously, at most once per `KAFKA_COMMIT_INTERVAL_S`
   (and when partitions are revoked or the runner closes); they are advisory (monitoring, lag):
   on assignment the consumer always seeks to the store's offsets, never to Kafka's.

A poison record found while earlier batches wait for their write may have half-changed their
cached states, so those batches are not written: the consumer rewinds to the stored offsets and
folds them again, skipping (dead-lettering) the poison record by its position.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Collection, Mapping
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
    def __init__(self, index: int, reason: str) -> None:
        self.index = index
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
        self._in_kafka: dict[TP, int] = {}  # what was last committed to Kafka
        self._kafka_committed_at = 0.0
        self._stop = threading.Event()
        self._changed = threading.Condition()
        # `instance_id`: static membership (refold.engine.membership), given by the worker.
        self.instance_id = instance_id
        membership, required = fold_group_settings(config, instance_id)
        self._consumer = clients.consumer(
            config,
            group_id(config, self.name, self.version),
            defaults={**FOLD_CONSUMER_CONF, **membership, **(consumer_conf or {})},
            required=required,
        )

    # -- lifecycle --------------------------------------------------------------------------

    def run(self) -> None:
        """Fold until `stop()`; exceptions end the runner in state `failed` with the reason."""
        try:
            self._consumer.subscribe(
                list(self.projection.topics),
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_revoke,
            )
            self.stats.state = "running"
            while not self._stop.is_set():
                msgs = self._next_batch()
                if msgs:
                    self._process(msgs)
                self._refresh_watermarks()
        except Exception as exc:
            self._failed(exc)
        finally:
            self.close()

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

    def _write_pending_unless_failed(self) -> None:
        """Store the batches folded but not yet written (they are complete: folding happens
        between consume() calls). Not after a failure: the batch that failed may have left its
        records in the pending write without their dead letters."""
        if self.stats.state != "failed" and self._pending.offsets:
            self._write_pending()

    # -- bounded folding (rebuilds) ---------------------------------------------------------

    def assign_all(self, partitions: Collection[int] | None = None) -> dict[TP, int]:
        """Own every partition of the source topics (no group: a rebuild reads them all), or
        those with the given numbers, from the store's offsets; returns the high watermarks."""
        stored = self.store.offsets()
        assigned: list[TopicPartition] = []
        ends: dict[TP, int] = {}
        for topic in self.projection.topics:
            md = self._consumer.list_topics(topic, timeout=10).topics[topic]
            for p in sorted(md.partitions):
                if partitions is not None and p not in partitions:
                    continue
                tp = (topic, p)
                self._next[tp] = stored.get(tp, 0)
                assigned.append(TopicPartition(topic, p, stored.get(tp, OFFSET_BEGINNING)))
                ends[tp] = self._consumer.get_watermark_offsets(TopicPartition(topic, p), 10)[1]
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
        self._write_pending()
        return True

    # -- rebalancing ------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        stored = self.store.offsets()
        for tp in partitions:
            key = (tp.topic, tp.partition)
            tp.offset = stored.get(key, OFFSET_BEGINNING)
            self._next[key] = stored.get(key, 0)
        consumer.incremental_assign(partitions)
        self._publish_assignment(consumer)
        log.info("%s v%d assigned %s", self.name, self.version, [str(p) for p in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Batches waiting for their write are stored first (this runs inside consume(), between
        # two folds); then Kafka's advisory copy of the revoked partitions' offsets.
        self._write_pending_unless_failed()
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
                msg = msgs[p.index]
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
            self._write_pending()
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
        projection that stops on errors) and the poison records to dead-letter first."""
        projection = self.projection
        apply = projection.apply
        initial = projection.initial
        codec = self.codec
        cache = self._cache
        store = self.store
        pending = self._pending
        next_offsets = pending.offsets
        changed = pending.changed
        links = pending.links
        expected = self._next
        replay_below = self._replay_below
        poison = self._poison
        dead: list[tuple[Message, str]] = []
        folded = skipped = 0
        rekeys = self._rekeys
        decode = codec.decode
        raw = codec.raw_decoders
        bounds = self._bounds
        beyond = self._beyond
        keys: list[str | None] | None = None
        if not rekeys and not self._cache_complete:
            keys = [None if k is None else k.decode("utf-8", "replace") for k in map(_key, msgs)]
            missing = [k for k in set(keys) if k is not None and k not in cache]
            if missing:
                cache.update(store.get_many(missing))
        # Records come in runs from one partition: its position checks are looked up per run.
        topic, partition, tp = "", -1, ("", -1)
        floor = replay_floor = 0
        bound: int | None = None
        try:
            for index, msg in enumerate(msgs):
                if msg.error() is not None:
                    error = msg.error()
                    if error.fatal() or error.code() == KafkaError._FATAL:  # e.g. fenced for good
                        raise ProjectionError(f"{self.name}: the consumer failed: {msg.error()}")
                    if msg.error().code() != KafkaError._PARTITION_EOF:
                        log.warning("%s: consume error %s", self.name, msg.error())
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
                if poison and (topic, partition, offset) in poison:
                    reason = poison[(topic, partition, offset)]
                    if projection.on_error == "stop":
                        return (msg, reason), dead
                    floor = next_offsets[tp] = offset + 1
                    pending.dead += 1
                    if (topic, partition, offset) not in self._dead_lettered:
                        dead.append((msg, reason))
                    continue
                floor = next_offsets[tp] = offset + 1
                if keys is None:
                    raw_key = msg.key()
                    event_key = None if raw_key is None else raw_key.decode("utf-8", "replace")
                else:
                    event_key = keys[index]
                value = msg.value()
                found = raw.get(value[:HEADER_LEN]) if value else None
                try:
                    if event_key is None:
                        raise DecodeError("record has no key (events are keyed by aggregate id)")
                    if found is not None:  # the common case, without two wrapper calls
                        type_name = found[0]
                        data = found[1](value)
                    else:
                        type_name, data = decode(value)
                except (IndexError, ValueError, UnicodeDecodeError) as exc:
                    reason = f"undecodable: Avro body does not decode: {exc}"
                    raise _Poison(index, reason) from exc
                except DecodeError as exc:
                    raise _Poison(index, f"undecodable: {exc}") from exc
                event = Event(type_name, event_key, data, topic, partition, offset, 0, None, msg)
                if offset < replay_floor:
                    event.replay = True
                try:
                    if rekeys:
                        key = projection.key(event)
                        if key is None:
                            key = links.get(event.key) or store.link(event.key)
                            if key is None:
                                skipped += 1
                                continue
                        elif links.get(event.key, "") != key and store.link(event.key) != key:
                            links[event.key] = key
                    else:
                        key = event_key
                    state = cache.get(key, _MISSING)
                    if state is _MISSING:
                        state = store.get(key) if rekeys else None
                        if state is None:
                            state = initial(key)
                    state = apply(state, event)
                except Exception as exc:  # a bug or bad data in user code: poison, not a crash
                    raise _Poison(index, f"{event.type}: {type(exc).__name__}: {exc}") from exc
                cache[key] = state
                changed[key] = state
                folded += 1
        finally:
            pending.folded += folded
            pending.skipped += skipped
        return None, dead

    def _write_pending(self) -> None:
        """Step 4: the pending batches' states, links, counters and offsets in one WriteBatch."""
        pending = self._pending
        next_offsets = pending.offsets
        if not next_offsets:
            pending.clear()
            return
        stats = self.stats
        folded, skipped, dead = pending.folded, pending.skipped, pending.dead
        meta: dict[str, Any] = {"events_folded": stats.folded + folded}
        if dead:
            meta["dead_letters"] = stats.dead_letters + dead
        if skipped:
            meta["skipped"] = stats.skipped + skipped
        self.store.commit(pending.changed, next_offsets, links=pending.links, meta=meta)
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
        self._in_kafka.update(((tp.topic, tp.partition), tp.offset) for tp in offsets)
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
        folded = self._folded_positions(owned)
        for tp, nxt in folded.items():
            # Past transaction markers: Kafka's advisory copy moves on too, so that lag counted
            # from the group's committed offsets (another worker's health) reaches zero.
            if nxt > self.stats.positions.get(tp, 0) and self._in_kafka.get(tp, -1) < nxt:
                self._uncommitted[tp] = max(nxt, self._uncommitted.get(tp, 0))
        self.stats.lag = {tp: max(0, high - folded.get(tp, 0)) for tp, high in marks.items()}
        self.stats.behind = self._behind.update(now, marks, folded)
        self.stats.refreshed_at = now

    def _folded_positions(self, owned: tuple[TP, ...]) -> dict[TP, int]:
        """Stored next offsets, moved past offsets that hold no record (transaction markers):
        for a partition with nothing waiting for a write, the consumer's position says where
        the records delivered so far end (this runs on the fold thread, between batches)."""
        folded = dict(self.stats.positions)
        idle = [TopicPartition(*tp) for tp in owned if tp not in self._pending.offsets]
        if idle:
            for tp in self._consumer.position(idle):
                key = (tp.topic, tp.partition)
                if tp.offset >= 0 and tp.offset > folded.get(key, 0):
                    folded[key] = tp.offset
        return folded
