"""Poison records in the projection runner: records that cannot be folded (undecodable, or the
fold raised). Their positions are remembered, taken out of the batch when it is folded again,
and produced to the dead-letter topic (flushed) before their partition's offset moves past
them (commit step 3 of `refold.engine.runtime`); a projection that stops on errors stops there.
"""

from __future__ import annotations

import logging

from confluent_kafka import Message, Producer
from refold.core.errors import ProjectionError
from refold.core.projection import Projection
from refold.engine.runner_stats import TP
from refold.engine.runner_writes import PendingWrite, Where

log = logging.getLogger(__name__)


class Poison(Exception):
    """A record that cannot be folded (undecodable, or the fold raised), and why."""

    def __init__(self, msg: Message, reason: str) -> None:
        self.msg = msg
        self.reason = reason


class RunnerPoison:
    """Skipping and dead-lettering the poison positions a `ProjectionRunner` found."""

    projection: Projection
    name: str
    version: int
    dlq_topic: str
    _dlq: Producer
    _pending: PendingWrite
    _next: dict[TP, int]
    _bounds: dict[TP, int]
    _poison: dict[Where, str]
    _dead_lettered: set[Where]

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
