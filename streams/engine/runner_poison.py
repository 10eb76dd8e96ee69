"""Poison records in the projection runner: records that cannot be folded (undecodable, or the
fold raised). Their positions are remembered, taken out of the batch when it is folded again,
and produced to the dead-letter topic (flushed) before their partition's offset moves past
them (commit step 3 of `refold.engine.runtime`); a projection that stops on errors stops there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from confluent_kafka import Message, Producer
from refold.core.errors import ProjectionError
from refold.core.projection import Projection
from refold.engine.repartition import SOURCE_HEADER, source_of
from refold.engine.runner_stats import TP
from refold.engine.runner_writes import PendingWrite, Where
from refold.store.rocksdb import unstorable

log = logging.getLogger(__name__)


class Poison(Exception):
    """A record that cannot be folded (undecodable, or the fold raised), and why."""

    def __init__(self, msg: Message, reason: str, key: str | None = None) -> None:
        self.msg = msg
        self.reason = reason
        self.key = key  # the state key the fold raised on, if it got that far


class RunnerPoison:
    """Skipping and dead-lettering the poison positions a `ProjectionRunner` found."""

    projection: Projection
    name: str
    version: int
    dlq_topic: str
    repartitioned: bool
    _dlq: Producer
    _pending: PendingWrite
    _next: dict[TP, int]
    _bounds: dict[TP, int]
    _poison: dict[Where, str]
    _dead_lettered: set[Where]
    _suspects: dict[str, str]
    _suspect: Callable[[str, str, list[Message]], None]

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

    def _fold_checked(self, msgs: list[Message], fold: Callable[[list[Message]], None]) -> None:
        """Fold record by record, checking after each that the suspect keys' states can still
        be stored; the first record that makes one unstorable is poison. Only after a write
        found such a state (`RunnerWrites._suspect`), so the hot loop stays unchecked."""
        changed, suspects = self._pending.changed, self._suspects
        for msg in msgs:
            fold([msg])
            for key in suspects:
                state = changed.get(key)
                problem = None if state is None else unstorable(state)
                if problem is not None:
                    raise Poison(msg, f"the state of {key!r} cannot be stored: {problem}")

    def _came_unstorable(self, poison: Poison, msgs: list[Message]) -> bool:
        """True if the fold raised on a state that an earlier record of the pending write left
        unstorable (a fold that returned a `set`, then the next one failed on it): that earlier
        record is the poison, so fold again from the store checking the key (`_suspect`)."""
        key = poison.key
        if key is None or key in self._suspects:
            return False  # checked already: the states before this record were storable
        state = self._pending.changed.get(key)
        problem = None if state is None else unstorable(state)
        if problem is None:
            return False
        self._suspect(
            key, f"the fold of {key!r} raised on a state that cannot be stored: {problem}", msgs
        )
        return True

    def _unfolded(self, where: Where) -> bool:
        """True if the fold would take a record at `where`: not folded yet, within bounds."""
        tp, offset = where[:2], where[2]
        if offset < max(self._next.get(tp, 0), self._pending.offsets.get(tp, 0)):
            return False
        bound = self._bounds.get(tp) if self._bounds else None
        return bound is None or offset < bound

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
            headers = [h for h in msg.headers() or [] if h[0] != SOURCE_HEADER]
            # A repartitioned record is dead-lettered as the source event it carries.
            source = source_of(msg) if self.repartitioned else None
            topic, partition, offset = source[:3] if source else _where(msg)
            key = source[3].encode() if source else msg.key()
            headers += [
                ("refold_dlq_reason", reason.encode()),
                ("refold_dlq_projection", f"{self.name}.v{self.version}".encode()),
                ("refold_dlq_topic", topic.encode()),
                ("refold_dlq_partition", str(partition).encode()),
                ("refold_dlq_offset", str(offset).encode()),
            ]
            self._dlq.produce(self.dlq_topic, msg.value(), key, headers=headers)
        if self._dlq.flush(30):
            # Without the dead letter durable, the offset must not move past the poison record.
            raise ProjectionError(f"{self.name}: dead-letter topic {self.dlq_topic} unreachable")
        self._dead_lettered.update((m.topic(), m.partition(), m.offset()) for m, _ in records)


def _where(msg: Message) -> tuple[str, int, int]:
    return msg.topic(), msg.partition(), msg.offset()
