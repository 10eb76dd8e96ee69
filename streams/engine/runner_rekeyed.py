"""Folding under other keys than the aggregate id (`Projection.key`), the part of
`ProjectionRunner` (refold.engine.runtime) that re-keyed projections use.

Two ways: `_fold_rekeyed` routes each source event itself (a process that reads every source
partition: a replay, a rebuild); `_fold_repartitioned` folds the repartition topic, whose records
the source partitions' readers already routed (a worker among others: refold.engine.repartition).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from confluent_kafka import Message
from refold.core.errors import DecodeError
from refold.core.projection import Projection
from refold.core.serde import HEADER_LEN, Codec, Event
from refold.engine.repartition import source_of
from refold.engine.runner_poison import Poison
from refold.engine.runner_stats import TP
from refold.engine.runner_writes import PendingWrite
from refold.store.rocksdb import Store

_MISSING = object()


class RunnerRekeyed:
    """Re-keyed folding for `ProjectionRunner` (see the module)."""

    projection: Projection
    codec: Codec
    store: Store
    _cache: dict[str, Any]
    _pending: PendingWrite
    _next: dict[TP, int]
    _bounds: dict[TP, int]
    _beyond: dict[TP, int]
    _replay_below: dict[TP, int]

    def _consume_error(self, msg: Message) -> None:
        raise NotImplementedError  # refold.engine.runtime

    def _fold_rekeyed(self, msgs: list[Message]) -> None:
        """Fold each record under the key `projection.key(event)` names; None folds it under
        the key its aggregate was last routed to (a link, stored with the states), and an
        aggregate never routed is skipped."""
        projection, store, cache, pending = self.projection, self.store, self._cache, self._pending
        links = pending.links
        folded = skipped = 0
        try:
            for msg, event in self._events(msgs):
                key = None
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
                    reason = f"{event.type}: {type(exc).__name__}: {exc}"
                    raise Poison(msg, reason, key) from exc
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
                raise Poison(msg, f"undecodable: {exc}") from exc
            key = raw_key.decode("utf-8", "replace")
            event = Event(type_name, key, data, topic, partition, offset, 0, None, msg)
            event.replay = offset < self._replay_below.get(tp, 0)
            yield msg, event

    def _fold_repartitioned(self, msgs: list[Message]) -> None:
        """Fold each record of the repartition topic under its own key (the key `key()` named
        where it was routed) as the source event it carries: its aggregate key, topic,
        partition and offset are the source's (refold.engine.repartition). A measured hot loop
        (bench/repartition.py), inline like `_fold_keyed`."""
        projection, store, cache, pending = self.projection, self.store, self._cache, self._pending
        apply, initial = projection.apply, projection.initial
        decode, raw = self.codec.decode, self.codec.raw_decoders
        next_offsets, changed, expected = pending.offsets, pending.changed, self._next
        bounds, beyond = self._bounds, self._beyond
        topic, partition, tp = "", -1, ("", -1)
        floor = 0
        bound: int | None = None
        folded = 0
        try:
            for msg in msgs:
                if msg.error() is not None:
                    self._consume_error(msg)
                    continue
                if msg.partition() != partition or msg.topic() != topic:
                    topic, partition = msg.topic(), msg.partition()
                    tp = (topic, partition)
                    floor = max(expected.get(tp, 0), next_offsets.get(tp, 0))
                    bound = bounds.get(tp) if bounds else None
                offset = msg.offset()
                if offset < floor:
                    continue  # already folded: a redelivery after a seek
                if bound is not None and offset >= bound:
                    beyond.setdefault(tp, offset)  # a rebuild's bound: read again later
                    continue
                floor = next_offsets[tp] = offset + 1
                raw_key, value = msg.key(), msg.value()
                try:
                    if raw_key is None:
                        raise DecodeError("record has no key (events are keyed by aggregate id)")
                    found = raw.get(value[:HEADER_LEN]) if value else None
                    if found is not None:
                        type_name = found[0]
                        data = found[1](value)
                    else:
                        type_name, data = decode(value)
                    source = source_of(msg)
                    if source is None:
                        raise DecodeError("repartitioned record without its source header")
                except (IndexError, ValueError, UnicodeDecodeError) as exc:
                    raise Poison(msg, f"undecodable: {type(exc).__name__}: {exc}") from exc
                except DecodeError as exc:
                    raise Poison(msg, f"undecodable: {exc}") from exc
                key = raw_key.decode("utf-8", "replace")
                src_topic, src_partition, src_offset, aggregate = source
                event = Event(
                    type_name, aggregate, data, src_topic, src_partition, src_offset, 0, None, msg
                )
                try:
                    state = cache.get(key, _MISSING)
                    if state is _MISSING:
                        state = store.get(key)
                        if state is None:
                            state = initial(key)
                    state = apply(state, event)
                except Exception as exc:  # a bug or bad data in user code: poison, not a crash
                    reason = f"{event.type}: {type(exc).__name__}: {exc}"
                    raise Poison(msg, reason, key) from exc
                cache[key] = state
                changed[key] = state
                folded += 1
        finally:
            pending.folded += folded
