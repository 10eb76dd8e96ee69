"""Events as JSON (`{"type", "key", "data"}`): parsing and validation for the CLI and HTTP.

Every problem is reported with where it was found (line number for files) and nothing is sent
unless every event is valid.

`LineEncoder` is the bulk path for files: orjson, the field checks of each event type built once,
and a generated Avro encoder (`refold.core.fastencode`) per type; it gives `EncodedBatch` columns
(no data dict kept per event). Any line it does not take as is goes through `event_from_json`,
the reference validation, so both paths accept and refuse the same lines with the same reasons.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from refold.core import envelope
from refold.core.errors import EncodeError, InputError, SchemaError
from refold.core.fastencode import generate
from refold.core.serde import MAGIC, MAX_EVENT_BYTES, Codec


@dataclass(frozen=True, slots=True)
class EventInput:
    """An event to publish, validated against its schema and already encoded."""

    type: str
    key: str
    data: dict[str, Any]
    value: bytes


@dataclass(frozen=True, slots=True)
class LineProblem:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


def event_from_json(obj: Any, codec: Codec) -> EventInput:
    """Validate one decoded JSON value; raises InputError with a one-line reason."""
    if not isinstance(obj, dict):
        raise InputError(f"an event must be a JSON object, not {type(obj).__name__}")
    unknown = set(obj) - {"type", "key", "data"}
    if unknown:
        raise InputError(f"unexpected field(s) {sorted(unknown)}; an event has type, key, data")
    type_name = obj.get("type")
    if not isinstance(type_name, str) or not type_name:
        raise InputError('missing "type" (the event type, e.g. "bank.MoneyDeposited")')
    key = obj.get("key")
    if not isinstance(key, str) or not key:
        raise InputError('missing "key" (the aggregate id, a non-empty string)')
    if not key.isascii():  # the record key is its UTF-8: a lone surrogate has none
        try:
            key.encode()
        except UnicodeEncodeError as exc:
            raise InputError(f'"key" is not valid Unicode text: {exc.reason}') from exc
    data = obj.get("data")
    if not isinstance(data, dict):
        raise InputError('"data" must be a JSON object')
    try:
        fields = codec.catalog.event_type(type_name).field_names
        unknown_fields = set(data) - set(fields)
        if unknown_fields:
            raise InputError(
                f"{type_name}: unknown field(s) {sorted(unknown_fields)}; fields are {list(fields)}"
            )
        value = codec.encode(type_name, data)
    except (SchemaError, EncodeError) as exc:
        raise InputError(str(exc), hint=exc.hint) from exc
    return EventInput(type_name, key, data, value)


def events_from_lines(
    lines: Iterable[str | bytes], codec: Codec
) -> tuple[list[EventInput], list[LineProblem]]:
    """Parse JSON lines (text, or bytes decoded as UTF-8 here so that a binary file is a
    problem on its line, not a crash); blank lines are skipped. Returns events and every
    problem found."""
    events: list[EventInput] = []
    problems: list[LineProblem] = []
    for number, raw in enumerate(lines, start=1):
        if isinstance(raw, bytes):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                problems.append(
                    LineProblem(number, f"not UTF-8 text: {exc.reason} at byte {exc.start}")
                )
                continue
        else:
            line = raw
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(LineProblem(number, f"invalid JSON: {exc.msg} at column {exc.colno}"))
            continue
        except ValueError as exc:  # an integer of over 4300 digits
            problems.append(LineProblem(number, f"invalid JSON: {exc}"))
            continue
        except RecursionError:
            problems.append(LineProblem(number, "invalid JSON: nested too deeply"))
            continue
        event = line_event(obj, codec)
        if isinstance(event, str):
            problems.append(LineProblem(number, event))
            continue
        events.append(event)
    return events, problems


def line_event(obj: Any, codec: Codec) -> EventInput | str:
    """The event of a parsed line, or why the line is refused: not a valid event, or too large
    for any Kafka record (the producer would refuse it only once the lines before it are sent)."""
    try:
        event = event_from_json(obj, codec)
    except InputError as exc:
        return str(exc)
    return too_large(event) or event


def too_large(event: EventInput, source: str | None = None) -> str | None:
    """Why no Kafka record carries `event`, or None: counted as Kafka counts it, with the
    envelope a publisher of `source` (by default: of this host, as `Publisher`'s) gives it."""
    size = record_bytes(event, source)
    if size > MAX_EVENT_BYTES:
        return (
            f"the event is {size} bytes as a record (key, value and headers); "
            f"at most {MAX_EVENT_BYTES} fit in a record"
        )
    return None


def record_bytes(event: EventInput, source: str | None = None) -> int:
    """The record `event` makes when published (the envelope's id and time have one length)."""
    headers = envelope.size(event.type, source=source or envelope.default_source())
    return len(event.key.encode()) + len(event.value) + headers


@dataclass(slots=True)
class EncodedBatch:
    """Validated, encoded events in file order, as columns: the i-th event is `types[i]`,
    `keys[i]`, `values[i]` (cheap to pickle between processes: equal type names are one object)."""

    types: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    values: list[bytes] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.values)

    def add(self, event: EventInput) -> None:
        self.types.append(event.type)
        self.keys.append(event.key)
        self.values.append(event.value)


#: (field names, fast encoder, whether it has a float or double field)
_Spec = tuple[frozenset[str], Callable[[dict[str, Any]], bytes | None], bool]
#: An integer literal orjson would read as a float (beyond 64 bits), where the json module, the
#: reference, reads an int that a double field refuses: such lines take the reference path.
_BIG_INTEGER = re.compile(rb"(?<![.\deE+-])-?\d{19,}(?![.\deE])")
_REALS = frozenset(("double", "float"))


class LineEncoder:
    """Parses, validates and encodes JSON lines with the checks of each type built once."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self._specs: dict[str, _Spec | None] = {}
        # what the fast path leaves for key and value: the envelope goes in the record too
        self._room: dict[str, int] = {}

    def _spec(self, type_name: str) -> _Spec | None:
        """The field names and fast encoder of a known type; None for an unknown one."""
        if type_name not in self._specs:
            try:
                event_type = self.codec.catalog.event_type(type_name)
            except SchemaError:
                self._specs[type_name] = None
                return None
            sv = event_type.latest
            fast = generate(sv.schema, MAGIC + sv.fingerprint)
            reals = any(_REALS & set(_type_names(f["type"])) for f in sv.schema.get("fields", ()))
            self._specs[type_name] = (frozenset(event_type.field_names), fast or _never, reals)
            source = envelope.default_source()
            self._room[type_name] = MAX_EVENT_BYTES - envelope.size(type_name, source=source)
        return self._specs[type_name]

    def encode(self, chunk: bytes, first_line: int = 1) -> tuple[EncodedBatch, list[LineProblem]]:
        """Every line of `chunk` (lines end with b"\\n"; the first is line `first_line`).

        A measured hot loop, hence long: a valid line costs one orjson parse, a few type checks
        and one generated encoder call; anything else takes the reference path, once."""
        batch = EncodedBatch()
        types, keys, values = batch.types, batch.keys, batch.values
        problems: list[LineProblem] = []
        specs, loads, decode_error = self._specs, orjson.loads, orjson.JSONDecodeError
        big = _BIG_INTEGER.search
        for number, raw in enumerate(chunk.split(b"\n"), start=first_line):
            try:
                obj = loads(raw)
            except decode_error:
                obj = _reference_parse(raw, number, problems)
            else:
                if type(obj) is dict and len(obj) == 3:
                    t, k, d = obj.get("type"), obj.get("key"), obj.get("data")
                    if type(t) is str and type(k) is str and k and type(d) is dict:
                        spec = specs[t] if t in specs else self._spec(t)
                        if spec is not None and spec[0].issuperset(d):
                            value = spec[1](d)
                            # A key's UTF-8 is at most 4 bytes a character: an event that may
                            # not fit in a record takes the reference path, which measures it.
                            if (
                                value is not None
                                and not (spec[2] and big(raw))
                                and len(value) + 4 * len(k) <= self._room[t]
                            ):
                                types.append(t)
                                keys.append(k)
                                values.append(value)
                                continue
                # The reference reads it again: orjson reads integers beyond 64 bits as floats.
                obj = _reference_parse(raw, number, problems)
            if obj is _SKIP:
                continue
            event = line_event(obj, self.codec)
            if isinstance(event, str):
                problems.append(LineProblem(number, event))
                continue
            batch.add(event)
        return batch, problems


def _type_names(avro_type: Any) -> list[str]:
    """The primitive type names a field type names at its top level (through unions)."""
    if isinstance(avro_type, str):
        return [avro_type]
    if isinstance(avro_type, list):
        return [n for t in avro_type for n in _type_names(t)]
    if isinstance(avro_type, dict):
        return _type_names(avro_type.get("type"))
    return []


def _never(_data: dict[str, Any]) -> None:
    """The encoder of a type `fastencode` does not handle: every event takes the reference path."""
    return None


_SKIP: Any = object()


def _reference_parse(raw: bytes, number: int, problems: list[LineProblem]) -> Any:
    """A line orjson refused, read as `events_from_lines` reads it: a blank line or a problem
    is `_SKIP`; a line that the json module still accepts (an integer beyond 64 bits) goes on
    to `event_from_json`, which says what is wrong with it."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.append(LineProblem(number, f"not UTF-8 text: {exc.reason} at byte {exc.start}"))
        return _SKIP
    if not line.strip():
        return _SKIP
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        problems.append(LineProblem(number, f"invalid JSON: {exc.msg} at column {exc.colno}"))
        return _SKIP
    except ValueError as exc:  # an integer of over 4300 digits
        problems.append(LineProblem(number, f"invalid JSON: {exc}"))
        return _SKIP
    except RecursionError:
        problems.append(LineProblem(number, "invalid JSON: nested too deeply"))
        return _SKIP
