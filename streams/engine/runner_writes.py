"""The projection runner's store writes (commit steps 4 and 5 of `refold.engine.runtime`).

Folded batches wait in a `PendingWrite` until ONE RocksDB WriteBatch stores their states, re-key
links, counters and every partition's next offset (moved past transaction markers where the
consumer's position is further); then the stored offsets go to Kafka, advisory and at most once
per `KAFKA_COMMIT_INTERVAL_S`. `RunnerWrites` is the part of `ProjectionRunner` that does this.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition
from refold.core.config import Config
from refold.engine.runner_stats import TP, RunnerStats
from refold.store.rocksdb import Store, UnstorableValue

log = logging.getLogger(__name__)

MAX_CACHED_STATES = 200_000
# Kafka's copy of the offsets only informs monitoring, so it may trail the store's by this much.
# (Committing it after every batch sent hundreds of OffsetCommit requests a second at light load,
# broker and client work on the path of every fresh event.)
KAFKA_COMMIT_INTERVAL_S = 1.0
#: Batches folded during a backlog share one store write up to this many events or seconds.
COMMIT_EVERY = 50_000
COMMIT_INTERVAL_S = 0.5


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


Where = tuple[str, int, int]  # topic, partition, offset


@dataclass(slots=True)
class PendingWrite:
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


class RunnerWrites:
    """Writing folded batches to the store, then their offsets to Kafka (see the module)."""

    name: str
    version: int
    store: Store
    stats: RunnerStats
    on_commit: Callable[[Iterable[str]], None] | None
    _consumer: Consumer
    _stop: threading.Event
    _changed: threading.Condition
    _pending: PendingWrite
    _next: dict[TP, int]
    _bounds: dict[TP, int]
    _beyond: dict[TP, int]
    _paused: set[TP]
    _poison: dict[Where, str]
    _dead_lettered: set[Where]
    _cache: dict[str, Any]
    _cache_complete: bool
    #: keys whose folded state could not be stored, with the partitions' offsets up to which
    #: each record's effect on them is checked (`refold.engine.runner_poison`)
    _suspects: dict[str, str]
    _suspect_until: dict[TP, int]
    _uncommitted: dict[TP, int]
    _kafka_committed_at: float
    _folding: bool

    def _write_pending_unless_failed(self, past_markers: bool = True) -> None:
        """Store the batches folded but not yet written (they are complete: folding happens
        between consume() calls). Not after a failure: the batch that failed may have left its
        records in the pending write without their dead letters. Not when a batch's fold was
        cut short (`_folding`: Ctrl-C, an error raised through it): its pending offsets
        already count records whose effect is not in the states (the stored offsets stay, and
        the next run folds from them)."""
        if self._folding:
            log.info("%s v%d: a batch was cut short: not written", self.name, self.version)
            return
        if self.stats.state != "failed" and self._pending.offsets:
            self._write_pending(past_markers)

    def _rewind(self, msgs: list[Message]) -> None:
        raise NotImplementedError  # refold.engine.runtime

    def _write_pending(self, past_markers: bool = True) -> bool:
        """Step 4: the pending batches' states, links, counters and offsets in one WriteBatch.
        `past_markers`: every record the consumer returned is folded, so its position may be
        stored where it is further (see `_past_markers`).

        A state that cannot be stored (not JSON, an integer beyond 64 bits) writes nothing:
        its key becomes a suspect and the batches are folded again, checking that key after
        each record, so the record that made it unstorable is dead-lettered like any poison
        record. Returns False then (nothing was written)."""
        pending = self._pending
        next_offsets = pending.offsets
        if not next_offsets:
            pending.clear()
            return True
        if past_markers:
            self._past_markers(next_offsets)
        stats = self.stats
        folded, skipped, dead = pending.folded, pending.skipped, pending.dead
        meta: dict[str, Any] = {"events_folded": stats.folded + folded}
        if dead:
            meta["dead_letters"] = stats.dead_letters + dead
        if skipped:
            meta["skipped"] = stats.skipped + skipped
        try:
            self.store.commit(pending.changed, next_offsets, links=pending.links, meta=meta)
        except UnstorableValue as exc:
            if exc.kind != "state" or exc.key not in pending.changed:
                raise
            assert isinstance(exc.key, str)  # a key of `changed`
            self._suspect(exc.key, str(exc))
            return False
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
        if self._suspects and all(
            self._next.get(tp, 0) >= until for tp, until in self._suspect_until.items()
        ):
            self._suspects.clear()
            self._suspect_until.clear()
        if len(self._cache) > MAX_CACHED_STATES:
            self._cache.clear()
            self._cache_complete = False
        with self._changed:
            self._changed.notify_all()
        self._uncommitted.update(next_offsets)
        self._commit_to_kafka_due()
        return True

    def _suspect(self, key: str, reason: str, msgs: list[Message] | None = None) -> None:
        """The state of `key` cannot be stored: fold the pending batches (and `msgs`) again from
        the stored offsets, checking `key` after each record (see `_write_pending`)."""
        log.warning("%s v%d: %s; folding again to find the record", self.name, self.version, reason)
        self._suspects[key] = reason
        until = self._suspect_until
        for tp, offset in self._pending.offsets.items():
            until[tp] = max(until.get(tp, 0), offset)
        for msg in msgs or ():
            if msg.error() is None:
                tp = (msg.topic(), msg.partition())
                until[tp] = max(until.get(tp, 0), msg.offset() + 1)
        self._cache.clear()  # holds the unstorable state
        self._cache_complete = False
        self._rewind(msgs or [])

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
