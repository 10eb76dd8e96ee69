"""The command processor's decision step, pure: commands and aggregate states in, events,
outcomes and new states out. No Kafka, no store — the processor reads the inputs (command
records, states from its store, the ids already decided) and writes the outputs (one Kafka
transaction, then one store batch); see `refold.engine.command_processor`.

Rules, applied to a batch's commands in order (step 3 of the processor):
- a command id decided before (its result is within the idempotency window) or earlier in the
  same batch is a duplicate: no decision, nothing emitted, the first result stands;
- a command whose id was first claimed by another command (another fingerprint, see
  `refold.engine.claims`; a malformed command's is that of its bytes) is a conflict: never
  decided here, no result of its own;
- a malformed command, or one whose record key differs from its key, is rejected;
- a command for a key the decider has no initial state for (`initial` raised) is rejected;
- a command the processor refused (its events cannot be written) is rejected with the reason;
- a stale `expected_version` is rejected as a conflict, with `current_version`;
- otherwise `decide` sees the state left by the batch's earlier commands for the same key and
  gives events (schema-checked) or a rejection; a bug in it rejects that command only.
An aggregate's version is its event count; each emitted event adds one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from confluent_kafka import Message
from refold.core.commands import (
    Command,
    Decider,
    EventSpec,
    Rejected,
    malformed_fingerprint,
    readable_id,
)
from refold.core.errors import CommandError, EncodeError, InputError
from refold.core.serde import Event

log = logging.getLogger(__name__)

#: An aggregate as the processor stores it: {"version": events folded, "state": decider state}.
Aggregate = dict[str, Any]
#: `check(command, type, data)` raises EncodeError unless the event `command` causes fits its
#: type's schema and a Kafka record.
EventCheck = Callable[[Command, str, Any], None]


@dataclass(frozen=True, slots=True)
class CommandRecord:
    """A command as read from its topic: the parsed command (None when malformed, with the
    `problem` and the `malformed` fingerprint of its bytes), the record's own key and its
    position."""

    command_id: str
    command: Command | None
    problem: str
    record_key: bytes | None
    topic: str
    partition: int
    offset: int
    malformed: str = ""

    @property
    def fingerprint(self) -> str:
        """What its id is claimed with (refold.engine.claims), malformed or not."""
        return self.command.fingerprint if self.command is not None else self.malformed

    @property
    def position(self) -> tuple[str, int, int]:
        """Where the command record is: (topic, partition, offset)."""
        return (self.topic, self.partition, self.offset)

    @property
    def key(self) -> str:
        """The aggregate the command is about (the record key when it does not parse)."""
        if self.command is not None:
            return self.command.key
        return (self.record_key or b"").decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one command: accepted with `events`, or rejected with a `reason`.
    `version` is the aggregate's version after it (accepted) or when it was decided."""

    record: CommandRecord
    version: int
    events: tuple[EventSpec, ...] = ()
    reason: str | None = None
    current_version: int | None = None

    @property
    def accepted(self) -> bool:
        return self.reason is None


@dataclass(slots=True)
class BatchDecision:
    """A batch decided: its decisions in order, how many commands were duplicates or conflicts
    (their id claimed by another command), the states of the keys it touched before and
    after (events folded at positions unknown yet), and how long each command that was
    decided took to decide (seconds)."""

    decisions: list[Decision] = field(default_factory=list)
    duplicates: int = 0
    conflicts: int = 0
    before: dict[str, Aggregate] = field(default_factory=dict)
    after: dict[str, Aggregate] = field(default_factory=dict)
    timed: list[tuple[CommandRecord, float]] = field(default_factory=list)


@dataclass(slots=True)
class Progress:
    """Which command `decide_batch` is deciding, for a watchdog in another thread
    (refold.engine.command_watchdog): its record and since when (time.monotonic), None between
    commands; `cancelled` makes a batch whose decision was given up stop at the next command."""

    current: tuple[CommandRecord, float] | None = None
    cancelled: bool = False


def new_aggregate(decider: Decider, key: str) -> Aggregate:
    """The aggregate of a key without events; CommandError when the decider's `initial` fails
    or gives a state that cannot be stored (a bug in user code must not stop the processor)."""
    try:
        state = decider.initial(key)
        orjson.dumps(state)
    except Exception as exc:
        raise CommandError(
            f"decider {decider.name!r} has no initial state for {key!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return {"version": 0, "state": state}


def decide_batch(
    decider: Decider,
    check: EventCheck,
    records: Sequence[CommandRecord],
    states: Mapping[str, Aggregate],
    decided_at: Mapping[str, int],
    *,
    claims: Mapping[str, str] | None = None,
    refused: Mapping[tuple[str, int, int], str] | None = None,
    horizon_ms: float,
    now_ms: int,
    progress: Progress | None = None,
) -> BatchDecision:
    """Decide `records` in order. `states` holds the committed state of each key (a key
    missing there has no events yet); `decided_at` maps command ids that already have a result
    to when they were decided; results older than `horizon_ms` no longer count; `claims` maps
    command ids to the fingerprint of their first claim; `refused` maps the positions of
    commands to reject without deciding them to the reason (the processor learned that their
    transaction cannot commit). The inputs are not modified. `progress`, if given, says which
    command is being decided (the decider's `initial`, `decide` and fold)."""
    batch = BatchDecision()
    seen: set[str] = set()
    progress = progress or Progress()
    for record in records:
        if progress.cancelled:  # given up by the watchdog: nobody reads this batch
            break
        progress.current = (record, time.monotonic())
        cid = record.command_id
        first = decided_at.get(cid)
        if cid in seen or (first is not None and first >= horizon_ms):
            batch.duplicates += 1
            continue
        seen.add(cid)
        winner = (claims or {}).get(cid)
        if winner and winner != record.fingerprint:
            batch.conflicts += 1  # the id means another command: never executed here
            continue
        key = record.key
        if key not in batch.after:
            try:
                committed = states.get(key) or new_aggregate(decider, key)
            except CommandError as exc:  # this key cannot be decided; the others can
                batch.decisions.append(Decision(record, 0, reason=str(exc)))
                continue
            batch.before[key] = committed
            batch.after[key] = _copy(committed)  # decisions must not touch committed states
        refusal = refused.get(record.position) if refused else None
        if refusal is not None:
            batch.decisions.append(Decision(record, batch.after[key]["version"], reason=refusal))
            continue
        started = time.perf_counter()
        decision = decide_one(decider, check, record, batch.after[key])
        batch.timed.append((record, time.perf_counter() - started))
        if decision.events:
            problem = _fold_decision(decider, batch.after, key, decision, now_ms)
            if problem is not None:  # the state the events leave could not be stored
                accepted = [d for d in batch.decisions if d.record.key == key and d.events]
                batch.after[key] = _refold(decider, batch.before[key], key, accepted, now_ms)
                decision = Decision(record, decision.version - len(decision.events), reason=problem)
        batch.decisions.append(decision)
    progress.current = None
    return batch


def _fold_decision(
    decider: Decider, after: dict[str, Aggregate], key: str, decision: Decision, now_ms: int
) -> str | None:
    """Fold an accepted decision's events into `after[key]`; the reason to reject it instead
    if the decider cannot fold them or the state they leave cannot be stored (not JSON, an
    integer beyond 64 bits): accepting it would stop the processor at its store write. On a
    reason, `after[key]` may be half-changed (folds mutate states)."""
    record = decision.record
    try:
        for type_name, data in decision.events:
            event = Event(type_name, key, data, "", record.partition, -1, now_ms)
            after[key] = fold(decider, after[key], event)
        orjson.dumps(after[key])
    except CommandError as exc:
        return str(exc)
    except (TypeError, ValueError) as exc:  # orjson.JSONEncodeError is a TypeError
        return f"the state of {key!r} after these events could not be stored: {exc}"
    return None


def _refold(
    decider: Decider, before: Aggregate, key: str, accepted: list[Decision], now_ms: int
) -> Aggregate:
    """`before` with the events of the batch's accepted decisions for `key` folded again."""
    state = _copy(before)
    for decision in accepted:
        for type_name, data in decision.events:
            event = Event(type_name, key, data, "", decision.record.partition, -1, now_ms)
            state = fold(decider, state, event)
    return state


def decide_one(
    decider: Decider, check: EventCheck, record: CommandRecord, aggregate: Aggregate
) -> Decision:
    """One command against its aggregate's current state."""
    version = aggregate["version"]
    command = record.command
    if command is None or record.problem:
        return Decision(record, version, reason=record.problem or "malformed command")
    if record.record_key != command.key.encode():  # its events would land in another partition
        return Decision(record, version, reason="the record key differs from the command's key")
    if command.expected_version is not None and command.expected_version != version:
        reason = (
            f"conflict: expected version {command.expected_version}, "
            f"the aggregate is at version {version}"
        )
        return Decision(record, version, reason=reason, current_version=version)
    try:
        specs = checked_events(decider, check, command, aggregate["state"])
    except Rejected as rej:
        return Decision(record, version, reason=rej.reason, current_version=rej.current_version)
    return Decision(record, version + len(specs), events=tuple(specs))


def checked_events(
    decider: Decider, check: EventCheck, command: Command, state: Any
) -> list[EventSpec]:
    """The decider's events for `command`, each checked against its schema; Rejected on any
    problem, including a bug in the decider."""
    if command.aggregate and command.aggregate != decider.name:
        raise Rejected(f"command is for aggregate {command.aggregate!r}, not {decider.name!r}")
    try:
        decider.check_command(command.type, command.data)
    except InputError as exc:
        raise Rejected(str(exc)) from exc
    try:
        # decide must not touch the state shown; a list even if it gave an iterator (a
        # generator would be used up by the checks and leave an accepted command no events)
        specs = list(decider.decide(command, _copy(state)))
        for type_name, data in specs:
            check(command, type_name, data)
    except Rejected:
        raise
    except EncodeError as exc:
        raise Rejected(f"decider {decider.name!r} produced an invalid event: {exc}") from exc
    except Exception as exc:  # a bug in user code rejects this command, not the worker
        log.exception("commands %s: decide failed for %s", decider.name, command.command_id)
        raise Rejected(f"decider error: {type(exc).__name__}: {exc}") from exc
    return specs


def fold(decider: Decider, aggregate: Aggregate, event: Event) -> Aggregate:
    """The aggregate after `event`; CommandError when the decider cannot fold it (deciding on
    a state it could not fold would break its invariants)."""
    try:
        state = decider.apply(aggregate["state"], event)
    except Exception as exc:
        raise CommandError(
            f"decider {decider.name!r} cannot fold {event!r}: {type(exc).__name__}: {exc}"
        ) from exc
    return {"version": aggregate["version"] + 1, "state": state}


def copy_state(value: Any) -> Any:
    """A deep copy of a JSON-compatible state."""
    return orjson.loads(orjson.dumps(value))


_copy = copy_state


def record_of(msg: Message) -> CommandRecord:
    """A consumed command record, parsed; a malformed one is kept, to be rejected under its
    command id where one can be read (its sender asks for that id), else its position."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    try:
        command = Command.decode(msg.value(), msg.headers())
    except InputError as exc:
        cid = readable_id(msg.value(), msg.headers()) or f"{topic}-{partition}-{offset}"
        problem = f"malformed command: {exc}"
        malformed = malformed_fingerprint(msg.value())
        return CommandRecord(cid, None, problem, msg.key(), topic, partition, offset, malformed)
    return CommandRecord(command.command_id, command, "", msg.key(), topic, partition, offset)
