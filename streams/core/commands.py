"""Commands with consistency on Kafka: the decider API, the command and result values.

A decider is a pure function pair over one aggregate type, keyed by aggregate id:

- the fold `initial(key)` + `apply(state, event) -> state` rebuilds an aggregate from its own
  events (the same `Event` objects projections see), and
- `decide(command, state) -> [(event type, data), ...]` accepts a command by naming the events it
  causes, or raises `Rejected(reason)`.

Commands travel as JSON on a command topic co-partitioned with the aggregate's event topic (same
key, same partition count, same murmur2 partitioner), so partition p of the command topic holds
exactly the commands for the aggregates whose events are in partition p of the event topic. The
command processor (`refold.engine.command_processor`) owns command partitions through a consumer
group and is the single writer of the matching event partitions. Every decided command has
exactly one result on `<commands_topic>.results` (same partition, keyed by command id,
compacted and kept for the idempotency window).

An aggregate's version is the number of events folded for its key (0: it has no events).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson
from refold.core import envelope
from refold.core.envelope import Headers
from refold.core.errors import CommandError, InputError
from refold.core.ids import random_uuid
from refold.core.serde import Event

#: The idempotency window: results (and with them "this command id was decided") are kept this
#: long on the results topic, and a command id seen again within it gets the first result.
DEFAULT_RESULT_RETENTION_MS = 7 * 24 * 3600 * 1000
CONTENT_TYPE = "application/json"
MAX_COMMAND_ID = 200

EventSpec = tuple[str, dict[str, Any]]
_TYPES: dict[type, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    dict: "an object",
    list: "an array",
}


class Rejected(CommandError):
    """Raised by `Decider.decide`: the command is refused; `reason` is shown to the caller."""

    def __init__(self, reason: str, *, current_version: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.current_version = current_version


@dataclass(frozen=True, slots=True)
class Command:
    """A request to change one aggregate. `command_id` is the idempotency key."""

    command_id: str
    aggregate: str
    key: str
    type: str
    data: dict[str, Any]
    expected_version: int | None = None
    # The fingerprint once computed (a processor asks for it three times per command).
    _fingerprint: str = field(default="", init=False, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "command_id": self.command_id,
            "aggregate": self.aggregate,
            "key": self.key,
            "type": self.type,
            "data": self.data,
            "expected_version": self.expected_version,
        }

    def encode(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":"), ensure_ascii=False).encode()

    @property
    def fingerprint(self) -> str:
        """What makes two commands with one id the same command: aggregate, key, type, data and
        expected version (canonical JSON, SHA-256). A repeat with another fingerprint is a
        conflict, never a second execution."""
        if self._fingerprint:
            return self._fingerprint
        body = {k: v for k, v in self.to_json().items() if k != "command_id"}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        fingerprint = hashlib.sha256(canonical.encode()).hexdigest()[:32]
        object.__setattr__(self, "_fingerprint", fingerprint)  # frozen: set once, same value
        return fingerprint

    def headers(self, source: str) -> Headers:
        """The CloudEvents envelope: the command id is `ce_id`, its type `ce_type`, JSON."""
        return envelope.headers(
            self.type, source=source, id=self.command_id, content_type=CONTENT_TYPE
        )

    @classmethod
    def decode(
        cls, value: bytes | None, headers: Sequence[tuple[str, bytes | None]] | None
    ) -> Command:
        """Parse a command record; InputError says what is wrong (callers add the position)."""
        try:
            obj = json.loads(value or b"")
        except ValueError as exc:  # not JSON, not UTF-8, or an integer of over 4300 digits
            raise InputError(f"command is not JSON: {exc}") from exc
        except RecursionError as exc:  # nested deeper than the interpreter's stack
            raise InputError("command is not JSON: nested too deeply") from exc
        if not isinstance(obj, dict):
            raise InputError("command is not a JSON object")
        command_id = obj.get("command_id") or envelope.read_id(headers)
        version = obj.get("expected_version")
        if not (
            isinstance(command_id, str)
            and isinstance(obj.get("key"), str)
            and isinstance(obj.get("type"), str)
            and isinstance(obj.get("data"), dict)
            and (version is None or _is_int(version))
        ):
            raise InputError("command lacks command_id/key/type/data or has mistyped fields")
        if not command_id or len(command_id) > MAX_COMMAND_ID:  # as the API refuses it
            raise InputError(
                f"command_id must be a non-empty string of at most {MAX_COMMAND_ID} characters, "
                f"not one of {len(command_id)}"
            )
        command = cls(
            command_id, str(obj.get("aggregate", "")), obj["key"], obj["type"], obj["data"], version
        )
        try:  # json.loads lets a lone surrogate (an escape like \ud800) through; nothing encodes it
            command_id.encode()
            command.fingerprint  # noqa: B018 (every string but the id, encoded; kept for later)
        except UnicodeEncodeError as exc:
            raise InputError(f"command is not UTF-8 text: {exc.reason}") from exc
        return command


def readable_id(
    value: bytes | None, headers: Sequence[tuple[str, bytes | None]] | None
) -> str | None:
    """The command id of a command record that `Command.decode` refused, if one can be read:
    its JSON `command_id` (a string), else its `ce_id` header (UTF-8 text); None if neither.
    A malformed command's result is keyed by it, so its sender finds the rejection."""
    try:
        obj = json.loads(value or b"")
    except (ValueError, RecursionError):
        obj = None
    header = next((raw for name, raw in headers or () if name == envelope.ID and raw), b"")
    candidates = (
        obj.get("command_id") if isinstance(obj, dict) else None,
        header.decode("utf-8", "surrogateescape"),  # bytes that are no UTF-8: no text, below
    )
    for candidate in candidates:
        if isinstance(candidate, str) and 0 < len(candidate) <= MAX_COMMAND_ID:
            try:
                candidate.encode()  # a lone surrogate (JSON's \ud800, or bad bytes) is no id
            except UnicodeEncodeError:
                continue
            return candidate
    return None


def malformed_fingerprint(value: bytes | None) -> str:
    """The fingerprint of a command record that does not parse, for claiming its id like any
    command's: its bytes, hashed; never equal to a `Command.fingerprint`."""
    return "malformed-" + hashlib.sha256(value or b"").hexdigest()[:22]


@dataclass(frozen=True, slots=True)
class CommandResult:
    """The one outcome of a command, as stored on the results topic and answered by the API.

    `events` are the positions of the events an accepted command appended (topic, partition,
    offset, type); `version` is the aggregate's version after the command (accepted) or at the
    time it was decided (rejected); `current_version` is set for version conflicts.
    """

    command_id: str
    status: str  # accepted | rejected
    aggregate: str = ""
    key: str = ""
    type: str = ""
    events: tuple[dict[str, Any], ...] = ()
    reason: str | None = None
    current_version: int | None = None
    version: int | None = None
    decided_at_ms: int = 0
    command_position: dict[str, Any] = field(default_factory=dict)
    #: The decided command's `Command.fingerprint` (`malformed_fingerprint` for a malformed
    #: command's record; "" in results written before malformed commands were claimed).
    fingerprint: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "command_id": self.command_id,
            "status": self.status,
            "aggregate": self.aggregate,
            "key": self.key,
            "type": self.type,
            "events": list(self.events),
            "reason": self.reason,
            "current_version": self.current_version,
            "version": self.version,
            "decided_at_ms": self.decided_at_ms,
            "command_position": self.command_position,
            "fingerprint": self.fingerprint,
        }

    def encode(self) -> bytes:
        # orjson: the same bytes as json.dumps(separators=(",", ":"), ensure_ascii=False) for
        # what a result holds (strings, ints, None; no float), 10x faster.
        return orjson.dumps(self.to_json())

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> CommandResult:
        return cls(
            command_id=str(obj["command_id"]),
            status=str(obj["status"]),
            aggregate=str(obj.get("aggregate", "")),
            key=str(obj.get("key", "")),
            type=str(obj.get("type", "")),
            events=tuple(obj.get("events") or ()),
            reason=obj.get("reason"),
            current_version=obj.get("current_version"),
            version=obj.get("version"),
            decided_at_ms=int(obj.get("decided_at_ms") or 0),
            command_position=dict(obj.get("command_position") or {}),
            fingerprint=str(obj.get("fingerprint") or ""),
        )


def is_conflict(result: Mapping[str, Any], command: Command) -> bool:
    """True when `result` was decided for another command with the same id. Results written
    before fingerprints existed carry none and are taken as the same command."""
    first = result.get("fingerprint")
    return bool(first) and first != command.fingerprint


def pending(command_id: str) -> dict[str, Any]:
    """The answer for a command that has no result yet (same shape as a result)."""
    return {
        "command_id": command_id,
        "status": "pending",
        "events": [],
        "reason": None,
        "current_version": None,
    }


class Decider:
    """Subclass and set `name`, `events_topic`, `commands`; override `initial`, `apply`, `decide`.

    `commands` declares each command type's data fields: `{"bank.Deposit": {"amount_cents": int,
    "memo?": str}}` (a trailing `?` marks an optional field). Commands are checked against it
    before they are appended, so a malformed command never reaches the log.

    Like a projection's, the fold must be pure and deterministic; `decide` must be pure too: it
    sees the state of every earlier command of the same aggregate and nothing else.
    """

    name: ClassVar[str] = ""
    events_topic: ClassVar[str] = ""
    #: The command topic; empty means `<events_topic>.commands`.
    commands_topic: ClassVar[str] = ""
    commands: ClassVar[Mapping[str, Mapping[str, type]]] = {}
    result_retention_ms: ClassVar[int] = DEFAULT_RESULT_RETENTION_MS

    @property
    def command_topic(self) -> str:
        return self.commands_topic or f"{self.events_topic}.commands"

    @property
    def results_topic(self) -> str:
        return f"{self.command_topic}.results"

    @property
    def claims_topic(self) -> str:
        """Where processors claim command ids, keyed by id: the first claim of an id wins, so
        an id means one command across all partitions (refold.engine.claims)."""
        return f"{self.command_topic}.ids"

    def initial(self, key: str) -> Any:
        return {}

    def apply(self, state: Any, event: Event) -> Any:
        """Fold one event; by default `on_<Name>(state, event)` for type `<ns>.<Name>`."""
        handler = getattr(self, "on_" + event.type.rpartition(".")[2], None)
        return state if handler is None else handler(state, event)

    def decide(self, command: Command, state: Any) -> list[EventSpec]:
        """The events `command` causes, or raise Rejected; by default `decide_<Name>`."""
        handler = getattr(self, "decide_" + command.type.rpartition(".")[2], None)
        if handler is None:
            raise Rejected(f"{self.name} has no handler for command type {command.type!r}")
        return list(handler(command, state))

    # -- checks -----------------------------------------------------------------------------

    def check_command(self, type_name: str, data: Any) -> None:
        """InputError (4xx-worthy) unless `data` fits the declared fields of `type_name`."""
        spec = self.commands.get(type_name)
        if spec is None:
            raise InputError(
                f"aggregate {self.name!r} has no command type {type_name!r}",
                hint="known: " + ", ".join(sorted(self.commands)),
            )
        if not isinstance(data, dict):
            raise InputError(f"{type_name}: data must be a JSON object")
        fields = {name.rstrip("?"): (kind, not name.endswith("?")) for name, kind in spec.items()}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise InputError(f"{type_name}: unknown field(s) {unknown}; fields are {list(fields)}")
        for name, (kind, required) in fields.items():
            if name not in data or data[name] is None:
                if required:
                    raise InputError(f"{type_name}: missing field {name!r} ({_TYPES[kind]})")
                continue
            value = data[name]
            ok = (
                _is_int(value)
                if kind is int
                else isinstance(value, kind) and not (kind is float and isinstance(value, bool))
            )
            if not ok:
                raise InputError(
                    f"{type_name}: field {name!r} must be {_TYPES[kind]}, "
                    f"not {json.dumps(value)[:40]}"
                )

    @classmethod
    def validate(cls) -> None:
        """CommandError if the class cannot be run."""
        where = f"{cls.__module__}.{cls.__qualname__}"
        if not cls.name or not all(ch.isalnum() or ch in "-_." for ch in cls.name):
            raise CommandError(f"{where}: decider name {cls.name!r} must be letters, digits, -_.")
        if not cls.events_topic:
            raise CommandError(f"{where}: decider {cls.name!r} needs events_topic = '...'")
        for type_name, spec in cls.commands.items():
            for fname, kind in spec.items():
                if kind not in _TYPES:
                    raise CommandError(
                        f"{where}: {type_name}.{fname}: type must be one of "
                        "str, int, float, bool, dict, list"
                    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_command(decider: Decider, obj: Any, *, key: str | None = None) -> Command:
    """A command from user JSON `{"command_id"?, "key", "type", "data", "expected_version"?}`.

    Raises InputError naming the problem; nothing about it has been sent anywhere.
    """
    if not isinstance(obj, dict):
        raise InputError(f"a command must be a JSON object, not {type(obj).__name__}")
    unknown = sorted(set(obj) - {"command_id", "key", "type", "data", "expected_version"})
    if unknown:
        raise InputError(
            f"unexpected field(s) {unknown}; a command has command_id, key, type, "
            "data, expected_version"
        )
    key = obj.get("key", key)
    if not isinstance(key, str) or not key:
        raise InputError('missing "key" (the aggregate id, a non-empty string)')
    type_name = obj.get("type")
    if not isinstance(type_name, str) or not type_name:
        raise InputError('missing "type" (the command type, e.g. "bank.Deposit")')
    data = obj.get("data", {})
    decider.check_command(type_name, data)
    version = obj.get("expected_version")
    if version is not None and (not _is_int(version) or version < 0):
        raise InputError(f'"expected_version" must be a non-negative integer, not {version!r}')
    command_id = obj.get("command_id")
    if command_id is None:
        command_id = random_uuid()
    elif not isinstance(command_id, str) or not command_id or len(command_id) > MAX_COMMAND_ID:
        raise InputError(
            f'"command_id" must be a non-empty string of at most {MAX_COMMAND_ID} characters'
        )
    return Command(command_id, decider.name, key, type_name, data, version)


def decider_named(deciders: Mapping[str, Decider], name: str) -> Decider:
    try:
        return deciders[name]
    except KeyError:
        raise InputError(
            f"unknown aggregate {name!r}", hint="known: " + (", ".join(sorted(deciders)) or "none")
        ) from None
