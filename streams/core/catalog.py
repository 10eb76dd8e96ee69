"""Schema catalog: every `.avsc` under the schema directories, parsed once.

Invariants:
- one event type (the Avro full name, e.g. ``bank.MoneyDeposited``) has versions 1..n, one file each
  (``MoneyDeposited.avsc`` is version 1, ``MoneyDeposited.v2.avsc`` version 2);
- the newest version is the reader schema every consumer decodes to;
- every version is a writer schema, addressed by its 8-byte CRC-64-AVRO fingerprint, which is what
  single-object encoded payloads carry.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import fastavro
import fastavro.schema
from fastavro.validation import ValidationError, validate
from refold.core.errors import SchemaError

log = logging.getLogger(__name__)

_FILE_NAME = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:\.v(?P<version>[1-9][0-9]*))?\.avsc$")

#: An upcaster turns the data of one version into the data of the next (version + 1).
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class SchemaVersion:
    """One `.avsc` file: an event type at one version."""

    type: str
    version: int
    schema: dict[str, Any]  # fastavro-parsed
    fingerprint: bytes  # 8 bytes, CRC-64-AVRO of the parsing canonical form, as written on the wire
    canonical: str
    source: Path

    @property
    def fingerprint_hex(self) -> str:
        return self.fingerprint.hex()


@dataclass(slots=True)
class EventType:
    """All versions of one event type; `latest` is the reader schema."""

    name: str
    versions: dict[int, SchemaVersion] = field(default_factory=dict)

    @property
    def latest(self) -> SchemaVersion:
        return self.versions[max(self.versions)]

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f["name"] for f in self.latest.schema.get("fields", ()))


def fingerprint_of(parsed: dict[str, Any]) -> tuple[bytes, str]:
    canonical = fastavro.schema.to_parsing_canonical_form(parsed)
    # fastavro renders the CRC-64-AVRO value as the little-endian bytes the spec puts on the wire.
    return bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO")), canonical


def _json_position(text: str, exc: json.JSONDecodeError) -> str:
    return f"line {exc.lineno}, column {exc.colno}: {exc.msg}"


def load_schema_file(path: Path) -> SchemaVersion:
    """Parse one `.avsc`; the error names the file and, for bad JSON, the line."""
    match = _FILE_NAME.match(path.name)
    if not match:
        raise SchemaError(
            f"{path}: file name must be <Name>.avsc or <Name>.v<N>.avsc",
            hint="rename the file, e.g. MoneyDeposited.v2.avsc",
        )
    text = path.read_text(encoding="utf-8")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SchemaError(
            f"{path}:{exc.lineno}: invalid JSON ({_json_position(text, exc)})",
            hint="fix the JSON in the schema file",
        ) from exc
    if not isinstance(raw, dict) or raw.get("type") != "record":
        raise SchemaError(
            f"{path}: an event schema must be an Avro record", hint='"type": "record"'
        )
    try:
        parsed = cast(dict[str, Any], fastavro.parse_schema(raw))
    except Exception as exc:  # fastavro raises several exception types for bad schemas
        raise SchemaError(f"{path}: invalid Avro schema: {exc}", hint="see the Avro spec") from exc
    full_name = parsed["name"]
    if full_name.rsplit(".", 1)[-1] != match["name"]:
        raise SchemaError(
            f"{path}: file declares record {full_name!r} but is named {path.name!r}",
            hint=f"name the file {full_name.rsplit('.', 1)[-1]}.avsc",
        )
    if "." not in full_name:
        raise SchemaError(
            f"{path}: record {full_name!r} has no namespace; the event type is namespace.Name",
            hint='add "namespace": "<domain>"',
        )
    fingerprint, canonical = fingerprint_of(parsed)
    version = int(match["version"] or 1)
    return SchemaVersion(full_name, version, parsed, fingerprint, canonical, path)


class Catalog:
    """Event types by name and writer schemas by fingerprint; loaded once, then read-only
    (except for writer schemas learned from the registry topic and upcasters registered at startup).
    """

    def __init__(self, versions: Iterable[SchemaVersion] = ()) -> None:
        self.types: dict[str, EventType] = {}
        self.by_fingerprint: dict[bytes, SchemaVersion] = {}
        self.upcasters: dict[tuple[str, int], Upcaster] = {}
        for sv in versions:
            self.add(sv)

    @classmethod
    def load(cls, dirs: Iterable[Path]) -> Catalog:
        catalog = cls()
        for directory in dirs:
            if not directory.is_dir():
                raise SchemaError(
                    f"schema directory {directory} does not exist",
                    hint="set REFOLD_SCHEMAS_DIR to a directory of .avsc files",
                )
            for path in sorted(directory.rglob("*.avsc")):
                catalog.add(load_schema_file(path))
        for event_type in catalog.types.values():
            missing = set(range(1, max(event_type.versions) + 1)) - set(event_type.versions)
            if missing:
                raise SchemaError(
                    f"{event_type.latest.source}: {event_type.name} lacks version(s) "
                    f"{sorted(missing)}",
                    hint="versions must run 1, 2, ... without gaps",
                )
        log.debug("loaded %d event types", len(catalog.types))
        return catalog

    def add(self, sv: SchemaVersion) -> None:
        event_type = self.types.setdefault(sv.type, EventType(sv.type))
        clash = event_type.versions.get(sv.version)
        if clash is not None and clash.fingerprint != sv.fingerprint:
            raise SchemaError(
                f"{sv.source}: {sv.type} v{sv.version} is also defined by {clash.source}",
                hint="each type and version must have exactly one schema file",
            )
        event_type.versions[sv.version] = sv
        self.by_fingerprint.setdefault(sv.fingerprint, sv)

    def learn(self, type_name: str, version: int, schema_json: str) -> SchemaVersion:
        """Add a writer schema read from the registry topic (not present in local files)."""
        parsed = cast(dict[str, Any], fastavro.parse_schema(json.loads(schema_json)))
        fingerprint, canonical = fingerprint_of(parsed)
        sv = SchemaVersion(type_name, version, parsed, fingerprint, canonical, Path("<registry>"))
        self.by_fingerprint.setdefault(fingerprint, sv)
        if type_name not in self.types:
            self.types[type_name] = EventType(type_name, {version: sv})
        return sv

    def register_upcaster(self, type_name: str, from_version: int, fn: Upcaster) -> None:
        """`fn` turns data written at `from_version` into data of `from_version + 1`."""
        self.event_type(type_name)
        self.upcasters[(type_name, from_version)] = fn

    def event_type(self, name: str) -> EventType:
        try:
            return self.types[name]
        except KeyError:
            # refold's own types (`refold.*`, the task events) are not the user's to publish
            users = sorted(t for t in self.types if not t.startswith("refold."))
            if not users:  # outside a project folder with schemas/, nothing names any
                hint = (
                    "no schemas are loaded: set REFOLD_SCHEMAS_DIR to a folder of .avsc files, "
                    "or name an app that declares SCHEMAS_DIRS in REFOLD_APP; "
                    "the bank example is refold.examples.bank"
                )
            else:
                hint = "known types: " + ", ".join(users)
            raise SchemaError(f"unknown event type {name!r}", hint=hint) from None

    def validate(self, type_name: str, data: Any) -> None:
        """Raise SchemaError/EncodeError-worthy detail if `data` does not fit the latest schema."""
        schema = self.event_type(type_name).latest.schema
        if not isinstance(data, dict):
            raise ValidationError(f"data must be a JSON object, not {type(data).__name__}")
        unknown = set(data) - {f["name"] for f in schema["fields"]}
        if unknown:
            raise ValidationError(f"unknown field(s) {sorted(unknown)} for {type_name}")
        validate(data, schema, raise_errors=True)
