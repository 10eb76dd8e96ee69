"""The aggregate states of a command processor (refold.engine.command_processor), from Kafka.

On assignment of command partitions, and after any aborted transaction, the processor folds its
event partitions (read_committed) from the store's offsets to their ends into the aggregate
states, and reads its results partitions into the set of decided command ids; both go to the
RocksDB store with their offsets in one WriteBatch, so a restart resumes where the store stopped.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message
from refold.core.commands import Decider
from refold.core.errors import CommandError, DecodeError
from refold.core.serde import Codec
from refold.engine.decisions import Aggregate, copy_state, fold, new_aggregate
from refold.engine.tail import event_from_message
from refold.kafka.log import read_to_end
from refold.store.rocksdb import RocksStore, UnstorableValue

log = logging.getLogger("refold.engine.command_processor")

AGG = "a/"  # store keys: an aggregate's state
RES = "r/"  # store keys: a command's result


class CatchUp:
    """The folding half of a `CommandProcessor` (its fields, set by the processor)."""

    name: str
    decider: Decider
    codec: Codec
    store: RocksStore
    stats: Any
    _cache: dict[str, Any]
    _reader: Consumer
    _stop: threading.Event

    def _catch_up(self, partitions: list[int]) -> None:
        """Fold event and results partitions from the store's offsets to their current ends."""
        self._cache.clear()
        if not partitions:
            return
        d = self.decider
        stored = self.store.offsets()
        starts = {
            (t, p): stored.get((t, p), OFFSET_BEGINNING)
            for p in partitions
            for t in (d.events_topic, d.results_topic)
        }
        folded = 0
        for batch in read_to_end(self._reader, starts, batch_size=5000, stopped=self._stop.is_set):
            folded += self._fold_records(batch)
        if folded:
            log.info(
                "commands %s: folded %d records of partitions %s", self.name, folded, partitions
            )

    def _fold_records(self, msgs: list[Message]) -> int:
        """Fold events / learn results read back from Kafka; store them with their offsets.

        An event the decider cannot fold, or after which the state cannot be stored (written
        by someone else than this processor, e.g. `POST /events`), is skipped with a warning
        and counted (`skipped_events`): the batch is folded again carefully, each event on a
        copy of the state, checked. A stopped processor would leave every command pending."""
        try:
            return self._fold_batch(msgs, careful=False)
        except (CommandError, UnstorableValue) as exc:
            log.warning("commands %s: folding again, carefully: %s", self.name, exc)
            self._cache.clear()  # the folds may have changed cached states in place
            return self._fold_batch(msgs, careful=True)

    def _fold_batch(self, msgs: list[Message], careful: bool) -> int:
        d = self.decider
        changed: dict[str, Any] = {}
        offsets: dict[tuple[str, int], int] = {}
        for msg in msgs:
            topic, offset = msg.topic(), msg.offset()
            offsets[(topic, msg.partition())] = offset + 1
            if topic == d.results_topic:
                try:
                    result = orjson.loads(msg.value() or b"")
                    changed[RES + result["command_id"]] = result
                except (ValueError, KeyError, TypeError):
                    log.warning(
                        "commands %s: unreadable result at %s[%d]@%d",
                        self.name,
                        topic,
                        msg.partition(),
                        offset,
                    )
                continue
            try:
                event = event_from_message(self.codec, msg)
            except DecodeError as exc:  # not an event (foreign bytes): it cannot change state
                log.warning(
                    "commands %s: skipping %s[%d]@%d: %s",
                    self.name,
                    topic,
                    msg.partition(),
                    offset,
                    exc,
                )
                continue
            key = AGG + event.key
            if careful:
                try:
                    wrapper = changed.get(key) or self._load(event.key)
                    folded = fold(d, copy_state(wrapper), event)
                    orjson.dumps(folded)
                except (CommandError, TypeError, ValueError) as exc:
                    self.stats.skipped_events += 1
                    log.warning(
                        "commands %s: skipping %s[%d]@%d, its state cannot be kept: %s",
                        self.name,
                        topic,
                        msg.partition(),
                        offset,
                        exc,
                    )
                    continue
                changed[key] = folded
            else:
                changed[key] = fold(d, changed.get(key) or self._load(event.key), event)
        if offsets:
            self.store.commit(changed, offsets)
        self._cache.clear()
        return len(msgs)

    def _load(self, key: str) -> Aggregate:
        wrapper = self._cache.get(key)
        if wrapper is None:
            wrapper = self.store.get(AGG + key)
            if wrapper is None:
                wrapper = new_aggregate(self.decider, key)
        return wrapper
