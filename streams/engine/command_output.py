"""What a command processor writes in a batch's transaction (steps 4-5 of
`refold.engine.command_processor`): the decisions' events, then one result per command, each
record with a delivery report that fills a box with its position; and the check that keeps each
event within what Kafka takes (`refold.engine.command_limits`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from refold.core import envelope
from refold.core.commands import Command, CommandResult, Decider
from refold.core.errors import EncodeError
from refold.core.serde import Codec
from refold.engine.command_limits import TOO_LARGE, Position, SizeLimits
from refold.engine.decisions import Decision

#: The longest rejection reason a result keeps: a decider's `Rejected` (or an exception in it)
#: may say anything, and a result too large for a record would abort its batch at every try.
MAX_REASON_CHARS = 4000

Where = tuple[int, int]  # (partition, offset) from a delivery report
DeliveryCallback = Callable[[KafkaError | None, Message], None]
Box = list[Where | None]


class Abort(Exception):
    """The current transaction must be aborted (a delivery failed, an abortable Kafka error).
    `refusals`: commands to reject when the batch is decided again (position -> reason);
    `renew`: the producer must be replaced (its settings changed), not only aborted."""

    def __init__(
        self, reason: str, *, refusals: dict[Position, str] | None = None, renew: bool = False
    ) -> None:
        super().__init__(reason)
        self.refusals = refusals or {}
        self.renew = renew


@dataclass(slots=True)
class Deliveries:
    """What the delivery reports of one transaction said: its failures, and which event records
    were refused as too large (command position -> the event's type and record bytes)."""

    failures: list[str] = field(default_factory=list)
    too_large: dict[Position, tuple[str, int]] = field(default_factory=dict)


class Output:
    """The writing half of a `CommandProcessor` (its fields, set by the processor)."""

    decider: Decider
    codec: Codec
    _producer: Producer
    _source: str
    _limits: SizeLimits

    def _check_event(self, command: Command, type_name: str, data: Any) -> None:
        """decide_batch's check of each event: it encodes (strictly, as it will be produced)
        and its record fits in Kafka's limits, counted as they count it: key, value and headers
        (which carry the command id twice). An event the producer refuses would abort the
        transaction at every try and block its partition; this way it rejects its command."""
        value = self.codec.encode(type_name, data)
        size = len(command.key.encode()) + len(value) + self._headers_size(type_name, command)
        reason = self._limits.too_large(type_name, size)  # the event topic's limit, if lower
        if reason is not None:
            raise EncodeError(reason)

    def _headers(self, type_name: str, command_id: str) -> envelope.Headers:
        """The envelope of an event `command_id` caused (`_headers_size` counts it)."""
        return envelope.headers(
            type_name, source=self._source, correlation_id=command_id, causation_id=command_id
        )

    def _headers_size(self, type_name: str, command: Command) -> int:
        cid = command.command_id
        return envelope.size(type_name, source=self._source, correlation_id=cid, causation_id=cid)

    def _produce_results(
        self, decisions: list[Decision], events: list[list[Box]], deliveries: Deliveries
    ) -> list[tuple[CommandResult, Box]]:
        """Step 4: flush the decisions' events (their positions go into the results), then
        produce one result per command on the results topic; each result with a box its
        delivery report fills (the commit flushes them)."""
        d = self.decider
        self._flush(deliveries)
        now_ms = int(time.time() * 1000)
        results = [
            self._result(decision, [delivered(box) for box in boxes], now_ms)
            for decision, boxes in zip(decisions, events, strict=True)
        ]
        out: list[tuple[CommandResult, Box]] = []
        for decision, result in zip(decisions, results, strict=True):
            box: Box = [None]
            self._producer.produce(
                d.results_topic,
                result.encode(),
                result.command_id.encode(),
                partition=decision.record.partition,
                on_delivery=on_delivery(box, deliveries),
            )
            out.append((result, box))
        return out

    def _produce_events(self, decisions: list[Decision], deliveries: Deliveries) -> list[list[Box]]:
        """Produce every accepted command's events to its partition; per decision, one box per
        event that its delivery report fills with (partition, offset). A record refused as too
        large, by the producer now or the broker later, is noted in `deliveries.too_large`."""
        d = self.decider
        out: list[list[Box]] = []
        for decision in decisions:
            record, boxes = decision.record, []
            key = record.key.encode()
            for type_name, data in decision.events:
                box: Box = [None]
                value = self.codec.encode(type_name, data)
                headers = self._headers(type_name, record.command_id)
                refused = Refused(deliveries, record.position, type_name, key, value, headers)
                try:
                    self._producer.produce(
                        d.events_topic,
                        value,
                        key,
                        partition=record.partition,
                        headers=headers,
                        on_delivery=on_delivery(box, deliveries, refused),
                    )
                except KafkaException as exc:  # refused at once: over message.max.bytes
                    if exc.args[0].code() not in TOO_LARGE:
                        raise
                    refused(exc.args[0])
                boxes.append(box)
            out.append(boxes)
        return out

    def _result(self, decision: Decision, events: list[Where], now_ms: int) -> CommandResult:
        d, record = self.decider, decision.record
        return CommandResult(
            command_id=record.command_id,
            status="accepted" if decision.accepted else "rejected",
            aggregate=d.name,
            key=record.key,
            type=record.command.type if record.command is not None else "",
            events=tuple(
                {"type": type_name, "topic": d.events_topic, "partition": p, "offset": o}
                for (type_name, _data), (p, o) in zip(decision.events, events, strict=True)
            ),
            reason=clipped(decision.reason),
            current_version=decision.current_version,
            version=decision.version,
            decided_at_ms=now_ms,
            fingerprint=record.fingerprint,
            command_position={
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
            },
        )

    def _flush(self, deliveries: Deliveries) -> None:
        remaining = self._producer.flush(30)
        failures = deliveries.failures
        if deliveries.too_large:  # decided again with the commands those records name rejected
            renew = self._limits.learn()  # a new producer if it must batch less now
            refusals = self._limits.refusals(deliveries.too_large)
            reason = f"records of {len(deliveries.too_large)} command(s) refused as too large"
            raise Abort(f"{reason}: {failures[0]}", refusals=refusals, renew=renew)
        if failures or remaining:
            raise Abort(failures[0] if failures else f"{remaining} records not acknowledged")


def on_delivery(
    box: Box, deliveries: Deliveries, refused: Callable[[KafkaError], None] | None = None
) -> DeliveryCallback:
    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is None:
            box[0] = (msg.partition(), msg.offset())
        elif refused is not None and err.code() in TOO_LARGE:
            refused(err)
        else:
            deliveries.failures.append(str(err))

    return on_delivery


@dataclass(slots=True)
class Refused:
    """Notes an event record refused as too large, with its weight as the limits count it."""

    deliveries: Deliveries
    command: Position
    type_name: str
    key: bytes
    value: bytes
    headers: envelope.Headers

    def __call__(self, err: KafkaError) -> None:
        size = len(self.key) + len(self.value) + sum(len(n) + len(v) for n, v in self.headers)
        self.deliveries.failures.append(f"{self.type_name} ({size} bytes) refused: {err}")
        known = self.deliveries.too_large.get(self.command, ("", 0))
        if size > known[1]:
            self.deliveries.too_large[self.command] = (self.type_name, size)


def delivered(box: Box) -> Where:
    """A delivery report's (partition, offset); the flush before this guarantees one."""
    if box[0] is None:
        raise Abort("an event was flushed without a delivery report")
    return box[0]


def clipped(reason: str | None) -> str | None:
    """`reason`, cut to MAX_REASON_CHARS characters (saying how many more there were)."""
    if reason is None or len(reason) <= MAX_REASON_CHARS:
        return reason
    return f"{reason[:MAX_REASON_CHARS]}... ({len(reason) - MAX_REASON_CHARS} more characters)"
