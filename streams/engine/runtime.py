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

Here: the fold loop (steps 1-2), bounded folding for rebuilds and read-your-writes. Beside it:
`refold.engine.runner_writes` (steps 4-5), `refold.engine.runner_poison` (step 3),
`refold.engine.runner_consumer` (the consumer, its group and rebalances) and
`refold.engine.runner_stats` (what a runner publishes).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, KafkaError, Message, Producer, TopicPartition
from refold.core.config import Config
from refold.core.errors import DecodeError
from refold.core.projection import Projection
from refold.core.serde import HEADER_LEN, Codec, Event
from refold.engine.repartition import Repartitioner, repartition_topic
from refold.engine.repartition_progress import RoutedPositions
from refold.engine.runner_consumer import RunnerConsumer
from refold.engine.runner_poison import Poison, RunnerPoison
from refold.engine.runner_rekeyed import RunnerRekeyed
from refold.engine.runner_stats import TP, Behind, RunnerStats
from refold.engine.runner_trail import RunnerTrail
from refold.engine.runner_writes import COMMIT_EVERY, COMMIT_INTERVAL_S, PendingWrite, Where
from refold.kafka.log import end_offsets, topic_partitions
from refold.store.rocksdb import RocksStore, Store
from refold.store.versions import store_path

log = logging.getLogger(__name__)

_MISSING = object()
_key = Message.key


def tune_collector() -> None:
    """Folding allocates many short-lived dicts; the default collector thresholds make it run
    every few hundred events (measured: 100k -> 115k events/s on a 200k-event rebuild). Every
    process that folds calls this: the CLI and the parallel rebuild's children."""
    gc.set_threshold(100_000, 50, 100)


def dead_letter_topic_name(config: Config, name: str) -> str:
    return config.dead_letter_topic(name)


class ProjectionRunner(RunnerConsumer, RunnerPoison, RunnerRekeyed, RunnerTrail):
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
        repartitioned: bool = False,
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
        self._pending = PendingWrite()
        self._poison: dict[Where, str] = {}  # positions to skip (or stop at), with the reason
        self._suspects: dict[str, str] = {}  # keys whose state could not be stored
        self._suspect_until: dict[TP, int] = {}
        self._dead_lettered: set[Where] = set()  # of those, already in the dead-letter topic
        self._careful = 0  # after a rewind, write every batch for this many records
        # True while a batch is being folded: an exception that escapes the fold half-way
        # (Ctrl-C in `refold replay`, a store error) leaves records of that batch counted in the
        # pending write, and the consumer's position past all of them, without their effect.
        self._folding = False
        self._next: dict[TP, int] = {}
        self._rekeys = projection.rekeys
        #: A re-keyed projection in a worker folds its repartition topic, not the source topics
        #: (refold.engine.repartition); `feeder` is the stage that writes it, stopped with this.
        self.repartitioned = repartitioned and self._rekeys and not self._folded_from_source()
        self.feeder: Repartitioner | None = None
        self._topics: tuple[str, ...] = (
            (repartition_topic(config, self.name, self.version),)
            if self.repartitioned
            else tuple(projection.topics)
        )
        #: Source positions (a client's min_offset) as repartition positions.
        self.routed = (
            RoutedPositions(config, projection, self.version, self._topics[0])
            if self.repartitioned
            else None
        )
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
        # A runner queries no longer read ends its fold but keeps its store open (`retire`).
        self._retiring = False
        self._ended = threading.Event()  # the fold thread has closed its consumer
        self._store_lock = threading.Lock()
        #: The runner of the version queries read, while this one is built or caught up beside
        #: it: this one folds nothing that one has not folded (and acted on) yet (`_trail`).
        self.trailing: ProjectionRunner | None = None
        #: Told the keys of every commit, after it (the task reconciler's index listens here).
        self.on_commit: Callable[[Iterable[str]], None] | None = None
        # `instance_id`: static membership (refold.engine.membership), given by the worker.
        self.instance_id = instance_id
        self._consumer_conf = consumer_conf
        self._consumer = self._new_consumer()
        self._rejoin: str | None = None  # why the consumer must be replaced (see `rejoin`)
        self._rejoined_at = 0.0
        self._closing: list[threading.Thread] = []  # replaced consumers being closed

    @property
    def topics(self) -> tuple[str, ...]:
        """The topics this runner folds: the source topics, or the repartition topic."""
        return self._topics

    def _folded_from_source(self) -> bool:
        """A re-keyed store that holds source offsets was folded from the source by one
        process (an older release, or a worker before repartition topics): it goes on that way,
        whole only where one worker owns every partition, rather than fold its repartition
        topic from offset 0 on top of those states. A new version moves it over."""
        folded = {t for t, _p in self.store.offsets()}
        if not folded.intersection(self.projection.topics):
            return False
        log.warning(
            "%s v%d was folded from its source topics: it goes on so (bump its version to "
            "rebuild it through its repartition topic)",
            self.name,
            self.version,
        )
        return True

    @property
    def rekeys_here(self) -> bool:
        """Whether a state may hold events of any partition (re-keyed, folded from the
        source): then no one partition's owner answers for a key."""
        return self._rekeys and not self.repartitioned

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
                    if self.trailing is not None:
                        self._trail(msgs)
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
        """End the fold: store what is folded, commit, close the consumer; then the store,
        unless the runner retires (`retire`: its store answers until `stop()`)."""
        retiring = self._retiring
        if self.stats.state != "failed" and not retiring:
            self.stats.state = "stopped"
        final: dict[TP, int] | None = None
        try:
            self._write_pending_unless_failed()
            final = dict(self.stats.positions)  # revoking on close empties them
            self._commit_to_kafka(list(self._uncommitted))
            self._consumer.close()
        except Exception:  # the store must still close; the group will expire the member
            log.exception("%s v%d: closing the consumer failed", self.name, self.version)
        finally:
            if retiring:
                if final is not None:
                    self.stats.positions = final
                self.stats.assigned = ()
                if self.stats.state != "failed":
                    self.stats.state = "retired"  # only once its positions are final
            with self._store_lock:
                keep = self._retiring
                self._ended.set()
            try:
                if not keep:
                    self._close_store()
            finally:
                with self._changed:
                    self._changed.notify_all()

    # -- bounded folding (rebuilds) ---------------------------------------------------------

    def assign_all(self, partitions: Collection[int] | None = None) -> dict[TP, int]:
        """Own every partition of the source topics (no group: a rebuild reads them all), or
        those with the given numbers, from the store's offsets; returns the high watermarks."""
        stored = self.store.offsets()
        owned = [
            (topic, p)
            for topic in self.topics
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
        return self._write_pending()  # False: a state could not be stored, folding again

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
        self._folding = True
        self._process_batch(msgs)
        self._folding = False

    def _process_batch(self, msgs: list[Message]) -> None:
        pending = self._pending
        if not pending.batches:
            pending.since = time.monotonic()
        while True:
            try:
                stop, dead = self._fold(msgs)
                break
            except Poison as p:
                if self._came_unstorable(p, msgs):
                    return  # an earlier record left the state it failed on: find that one
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
        under their own keys (`_fold_keyed`, the hot loop), under the keys `key()` names
        (`_fold_rekeyed`), or as the repartition topic routed them (`_fold_repartitioned`;
        both in refold.engine.runner_rekeyed)."""
        stop: tuple[Message, str] | None = None
        dead: list[tuple[Message, str]] = []
        passed: dict[TP, int] = {}
        if self._poison:
            msgs, stop, dead, passed = self._without_poison(msgs)
        if self.repartitioned:
            fold = self._fold_repartitioned
        else:
            fold = self._fold_rekeyed if self._rekeys else self._fold_keyed
        if self._suspects:
            self._fold_checked(msgs, fold)
        else:
            fold(msgs)
        next_offsets = self._pending.offsets
        for tp, nxt in passed.items():
            next_offsets[tp] = max(next_offsets.get(tp, 0), nxt)
        return stop, dead

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
                    raise Poison(msg, reason) from exc
                except DecodeError as exc:
                    raise Poison(msg, f"undecodable: {exc}") from exc
                event = Event(type_name, key, data, topic, partition, offset, 0, None, msg)
                if offset < replay_floor:
                    event.replay = True
                try:
                    state = cache.get(key, _MISSING)
                    state = apply(initial(key) if state is _MISSING else state, event)
                except Exception as exc:  # a bug or bad data in user code: poison, not a crash
                    reason = f"{event.type}: {type(exc).__name__}: {exc}"
                    raise Poison(msg, reason, key) from exc
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

    def _consume_error(self, msg: Message) -> None:
        error = msg.error()
        if error.fatal() or error.code() == KafkaError._FATAL:  # e.g. refused by the group
            self.rejoin(f"the consumer failed: {error}")
            return
        if error.code() != KafkaError._PARTITION_EOF:
            log.warning("%s: consume error %s", self.name, error)

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
                if remaining <= 0 or self.stats.state in ("stopped", "failed", "retired"):
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
