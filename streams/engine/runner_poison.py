"""Poison records in the projection runner: records that cannot be folded (undecodable, or the
fold raised). Their positions are remembered, taken out of the batch when it is folded again,
and produced to the dead-letter topic (flushed) before their partition's offset moves past
them (commit step 3 of `refold.engine.runtime`); a projection that stops on errors stops there.
A dead letter too large for the dead-letter topic or the producer is written without the
record's bytes (they stay at its position, which the letter names), so the fold goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from refold.core.errors import ProjectionError
from refold.core.projection import Projection
from refold.engine.command_limits import TOO_LARGE
from refold.engine.command_output import MAX_REASON_CHARS
from refold.engine.repartition import SOURCE_HEADER, source_of
from refold.engine.runner_stats import TP
from refold.engine.runner_writes import PendingWrite, Where
from refold.store.rocksdb import unstorable

log = logging.getLogger(__name__)

#: The longest key a dead letter without the record's bytes keeps (a longer one stays with them).
MAX_KEPT_KEY_BYTES = 1000


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
        """Produce a dead letter for each record and flush. One refused as too large for the
        dead-letter topic (a foreign record near its own topic's limit, with refold's headers
        on top) is written again without the record's bytes, which stay at its position."""
        letters = []
        for msg, reason in records:
            log.warning(
                "%s: dead-lettering %s[%d]@%d: %s",
                self.name,
                msg.topic(),
                msg.partition(),
                msg.offset(),
                reason,
            )
            letters.append(self._letter(msg, reason))
        refused = self._send(letters)
        if refused:
            for letter, refusal in refused:
                log.warning(
                    "%s: the dead letter of %s is too large (%s): written without the record's "
                    "bytes, which stay there",
                    self.name,
                    letter.source,
                    refusal,
                )
            if self._send([letter.cut(refusal) for letter, refusal in refused]):
                raise ProjectionError(  # refold's headers alone: only a broken topic config
                    f"{self.name}: dead-letter topic {self.dlq_topic} refuses even a dead letter "
                    f"without the record's bytes, for {refused[0][0].source}"
                )
        self._dead_lettered.update((m.topic(), m.partition(), m.offset()) for m, _ in records)

    def _letter(self, msg: Message, reason: str) -> DeadLetter:
        # A repartitioned record is dead-lettered as the source event it carries.
        source = source_of(msg) if self.repartitioned else None
        topic, partition, offset = source[:3] if source else _where(msg)
        return DeadLetter(
            topic,
            partition,
            offset,
            source[3].encode() if source else msg.key(),
            msg.value(),
            tuple(h for h in msg.headers() or () if h[0] != SOURCE_HEADER),
            reason,
            f"{self.name}.v{self.version}",
        )

    def _send(self, letters: list[DeadLetter]) -> list[tuple[DeadLetter, str]]:
        """Produce the letters and flush them; returns those refused as too large, with the
        refusal. Any other failure raises: without the dead letter durable, the offset must
        not move past the poison record (a delivery error is not seen by `flush` alone)."""
        refused: list[tuple[DeadLetter, str]] = []
        failed: list[tuple[DeadLetter, str]] = []

        def report(letter: DeadLetter) -> Callable[[KafkaError | None, Message], None]:
            def delivered(err: KafkaError | None, _msg: Message) -> None:
                if err is not None:
                    (refused if err.code() in TOO_LARGE else failed).append((letter, err.str()))

            return delivered

        for letter in letters:
            try:
                self._dlq.produce(
                    self.dlq_topic,
                    letter.value,
                    letter.key,
                    headers=letter.headers(),
                    on_delivery=report(letter),
                )
            except KafkaException as exc:  # refused before sending: over message.max.bytes
                error = exc.args[0]
                if error.code() not in TOO_LARGE:
                    raise ProjectionError(
                        f"{self.name}: cannot dead-letter {letter.source}: {error.str()}"
                    ) from exc
                refused.append((letter, error.str()))
        if self._dlq.flush(30):
            raise ProjectionError(f"{self.name}: dead-letter topic {self.dlq_topic} unreachable")
        if failed:
            letter, error = failed[0]
            raise ProjectionError(
                f"{self.name}: dead-letter topic {self.dlq_topic} refused the dead letter of "
                f"{letter.source}: {error}"
            )
        return refused


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A poison record as it goes to the dead-letter topic: its bytes, and refold's headers
    saying why and where it is (`refold dead-letters` reads them)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    record_headers: tuple[tuple[str, bytes | None], ...]
    reason: str
    projection: str
    dropped: str | None = None

    @property
    def source(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"

    def headers(self) -> list[tuple[str, bytes | None]]:
        headers = [
            *self.record_headers,
            ("refold_dlq_reason", self.reason.encode()),
            ("refold_dlq_projection", self.projection.encode()),
            ("refold_dlq_topic", self.topic.encode()),
            ("refold_dlq_partition", str(self.partition).encode()),
            ("refold_dlq_offset", str(self.offset).encode()),
        ]
        if self.dropped is not None:
            headers.append(("refold_dlq_dropped", self.dropped.encode()))
        return headers

    def cut(self, refusal: str) -> DeadLetter:
        """This letter without the record's value and headers (and its key if that is long),
        the reason cut to MAX_REASON_CHARS, and `refold_dlq_dropped` saying what is left out
        and that it stays at the source position."""
        key = self.key if self.key is None or len(self.key) <= MAX_KEPT_KEY_BYTES else None
        header_bytes = sum(len(k) + len(v or b"") for k, v in self.record_headers)
        parts = [f"value ({len(self.value or b'')} bytes)"]
        if key is not self.key:
            parts.append(f"key ({len(self.key or b'')} bytes)")
        parts.append(f"headers ({len(self.record_headers)}, {header_bytes} bytes)")
        dropped = (
            f"the record's {', '.join(parts[:-1])} and {parts[-1]} are left out: the dead letter "
            f"was refused as too large ({refusal}); they stay at {self.source}"
        )
        reason = self.reason[:MAX_REASON_CHARS]
        return replace(self, key=key, value=None, record_headers=(), reason=reason, dropped=dropped)


def _where(msg: Message) -> tuple[str, int, int]:
    return msg.topic(), msg.partition(), msg.offset()
