"""Events as JSON (`{"type", "key", "data"}`): parsing and validation for the CLI and HTTP.

Every problem is reported with where it was found (line number for files) and nothing is sent
unless every event is valid.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from refold.core.errors import EncodeError, InputError, SchemaError
from refold.core.serde import Codec


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
        try:
            events.append(event_from_json(obj, codec))
        except InputError as exc:
            problems.append(LineProblem(number, str(exc)))
    return events, problems
