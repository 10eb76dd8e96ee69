"""Avro single-object encoding, and the decoded `Event` folds see (its envelope attributes are
read by `refold.core.envelope`).

Wire format of a value: ``C3 01`` + 8-byte CRC-64-AVRO fingerprint (little-endian) + Avro binary
body, written with the newest schema of the type. Decoding finds the writer schema by fingerprint
and resolves it to the newest (reader) schema; where a type registers upcasters, data written at an
old version is decoded with its own schema and lifted one version at a time instead.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from fastavro import schemaless_reader, schemaless_writer
from fastavro.validation import ValidationError, validate
from refold.core import envelope
from refold.core.catalog import Catalog, SchemaVersion
from refold.core.errors import DecodeError, EncodeError, SchemaError
from refold.core.fastdecode import generate
from refold.core.fastencode import Encoder
from refold.core.fastencode import generate as generate_encoder

MAGIC = b"\xc3\x01"
#: A writer schema's encoding: single-object prefix, schema, strict check, generated encoder.
_Writer = tuple[bytes, Any, Callable[[dict[str, Any]], None] | None, Encoder | None]
HEADER_LEN = 10
#: The largest event record refold writes: key and value, and the headers where they can grow
#: (the command processor's carry the command id twice). Kafka's producer refuses records over
#: 1,000,000 bytes (message.max.bytes, framing and headers included); fixed-size envelope
#: headers fit in the rest.
MAX_EVENT_BYTES = 900_000


@dataclass(frozen=True, slots=True)
class Position:
    """Where a record sits in the log."""

    topic: str
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


class Event:
    """A decoded event as folds see it: `data` is at the reader (newest) schema.

    Envelope fields (`id`, `time`, `source`, correlation and causation ids) are read from the
    CloudEvents headers on first access only, so folds that never look at them pay nothing.
    """

    __slots__ = (
        "_envelope",
        "_headers",
        "_record",
        "_timestamp_ms",
        "data",
        "key",
        "offset",
        "partition",
        "replay",
        "topic",
        "type",
    )

    def __init__(
        self,
        type: str,
        key: str,
        data: dict[str, Any],
        topic: str,
        partition: int,
        offset: int,
        timestamp_ms: int = 0,
        headers: Sequence[tuple[str, bytes | None]] | None = None,
        record: Any = None,
    ) -> None:
        self.type = type
        self.key = key
        self.data = data
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self._timestamp_ms = timestamp_ms
        self._headers = headers
        self._record = record  # the Kafka message, read lazily for headers and timestamp
        self._envelope: dict[str, str] | None = None
        #: True while a rebuild folds a position the live version already processed: handlers
        #: with side effects (notifications, dispatch) must not repeat them then.
        self.replay = False

    @property
    def timestamp_ms(self) -> int:
        if self._record is not None and not self._timestamp_ms:
            self._timestamp_ms = self._record.timestamp()[1]
        return self._timestamp_ms

    def _env(self) -> dict[str, str]:
        if self._envelope is None:
            if self._headers is None and self._record is not None:
                self._headers = self._record.headers()
            self._envelope = envelope.read(self._headers)
        return self._envelope

    @property
    def id(self) -> str:
        return self._env().get(envelope.ID) or f"{self.topic}-{self.partition}-{self.offset}"

    @property
    def time(self) -> str:
        return self._env().get(envelope.TIME) or iso_from_ms(self.timestamp_ms)

    @property
    def source(self) -> str:
        return self._env().get(envelope.SOURCE, "")

    @property
    def correlation_id(self) -> str | None:
        return self._env().get(envelope.CORRELATION_ID)

    @property
    def causation_id(self) -> str | None:
        return self._env().get(envelope.CAUSATION_ID)

    @property
    def position(self) -> Position:
        return Position(self.topic, self.partition, self.offset)

    def __repr__(self) -> str:
        return f"Event({self.type}, key={self.key!r}, {self.topic}[{self.partition}]@{self.offset})"

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "key": self.key,
            "data": self.data,
            "id": self.id,
            "time": self.time,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
        }


def iso_from_ms(ms: int) -> str:
    return (
        datetime.fromtimestamp(ms / 1000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


class Codec:
    """Encodes and decodes event payloads against one catalog.

    `on_unknown_fingerprint` is asked (once per fingerprint) to find a writer schema elsewhere —
    the registry topic — before decoding fails.
    """

    def __init__(
        self,
        catalog: Catalog,
        on_unknown_fingerprint: Callable[[bytes], SchemaVersion | None] | None = None,
    ) -> None:
        self.catalog = catalog
        self._on_unknown = on_unknown_fingerprint
        self._decoders: dict[bytes, Callable[[bytes], tuple[str, dict[str, Any]]]] = {}
        #: value header (magic + fingerprint) -> (type, generated decoder) for writers that need
        #: no resolution: the fold loop calls these directly (they raise IndexError/ValueError/
        #: UnicodeDecodeError on bad bytes) and falls back to `decode` for anything else.
        self.raw_decoders: dict[bytes, tuple[str, Callable[[bytes], dict[str, Any]]]] = {}
        self._writers: dict[str, _Writer] = {}

    # -- encode ------------------------------------------------------------------------------

    def writer_for(self, type_name: str) -> SchemaVersion:
        return self.catalog.event_type(type_name).latest

    def encode(self, type_name: str, data: dict[str, Any]) -> bytes:
        """Single-object encode `data` with the newest schema of `type_name`, strictly: a value
        that fastavro would coerce (5.5 or true for a long, 1 for a boolean, "5.5" for a double)
        or an integer out of its type's range is an EncodeError (see `strict_check`)."""
        writer = self._writers.get(type_name)
        if writer is None:
            sv = self.writer_for(type_name)
            check = strict_check(sv.schema)
            prefix = MAGIC + sv.fingerprint
            fast = generate_encoder(sv.schema, prefix)
            writer = self._writers[type_name] = (prefix, sv.schema, check, fast)
        prefix, schema, strict, fast = writer
        if fast is not None and type(data) is dict:
            encoded = fast(data)
            if encoded is not None:
                return (
                    encoded  # else fastavro, below, applies what is missing or says what is wrong
                )
        buf = io.BytesIO()
        buf.write(prefix)
        try:
            if not isinstance(data, dict):
                raise TypeError("data must be an object")
            if strict is not None:
                strict(data)
            schemaless_writer(buf, schema, data)
        except Exception as exc:  # fastavro raises TypeError/ValueError/... on bad data
            raise EncodeError(self._explain(type_name, data, exc)) from exc
        return buf.getvalue()

    def _explain(self, type_name: str, data: Any, exc: Exception) -> str:
        try:
            self.catalog.validate(type_name, data)
        except ValidationError as verr:
            return f"{type_name}: {_validation_reason(verr)}"
        except SchemaError:
            raise
        return f"{type_name}: {exc}"

    def check(self, type_name: str, data: Any) -> None:
        """Validate without encoding; raises EncodeError naming the field and the problem."""
        try:
            self.catalog.validate(type_name, data)
        except ValidationError as verr:
            raise EncodeError(f"{type_name}: {_validation_reason(verr)}") from verr

    # -- decode ------------------------------------------------------------------------------

    def decode(self, value: bytes | None) -> tuple[str, dict[str, Any]]:
        """Return (type, data at the reader schema); DecodeError says why not."""
        if value is None:
            raise DecodeError("empty value (tombstone)")
        fingerprint = value[2:HEADER_LEN]
        decoder = self._decoders.get(fingerprint)
        if decoder is None or value[:2] != MAGIC:
            if value[:2] != MAGIC or len(value) < HEADER_LEN:
                raise DecodeError(
                    "not an Avro single-object encoded refold event "
                    f"(starts with {value[:4]!r}, {len(value)} bytes)"
                )
            decoder = self._decoder_for(fingerprint)
        return decoder(value)

    def _decoder_for(self, fingerprint: bytes) -> Callable[[bytes], tuple[str, dict[str, Any]]]:
        sv = self.catalog.by_fingerprint.get(fingerprint)
        if sv is None and self._on_unknown is not None:
            sv = self._on_unknown(fingerprint)
        if sv is None:
            raise DecodeError(f"unknown writer schema fingerprint {fingerprint.hex()}")
        decoder = self._build_decoder(sv)
        self._decoders[fingerprint] = decoder
        return decoder

    def _build_decoder(
        self, writer: SchemaVersion
    ) -> Callable[[bytes], tuple[str, dict[str, Any]]]:
        type_name = writer.type
        event_type = self.catalog.types.get(type_name)
        reader = event_type.latest if event_type else writer
        chain = [
            self.catalog.upcasters[(type_name, v)]
            for v in range(writer.version, reader.version)
            if (type_name, v) in self.catalog.upcasters
        ]
        schema_w = writer.schema
        if chain:
            # Upcasters lift old data version by version; Avro resolution fills what they leave.
            def decode_upcast(value: bytes) -> tuple[str, dict[str, Any]]:
                data = _read(value, schema_w, None)
                for step in chain:
                    data = step(data)
                return type_name, data

            return decode_upcast
        schema_r = None if reader.fingerprint == writer.fingerprint else reader.schema
        fast = generate(schema_w, HEADER_LEN) if schema_r is None else None
        if fast is not None:
            self.raw_decoders[MAGIC + writer.fingerprint] = (type_name, fast)

            def decode_fast(value: bytes) -> tuple[str, dict[str, Any]]:
                try:
                    return type_name, fast(value)
                except (IndexError, ValueError, UnicodeDecodeError) as exc:
                    raise DecodeError(f"Avro body does not decode: {exc}") from exc

            return decode_fast

        def decode_resolved(value: bytes) -> tuple[str, dict[str, Any]]:
            return type_name, _read(value, schema_w, schema_r)

        return decode_resolved


def _read(value: bytes, writer: Any, reader: Any) -> dict[str, Any]:
    buf = io.BytesIO(value)
    buf.seek(HEADER_LEN)
    try:
        data = schemaless_reader(buf, writer, reader)
    except Exception as exc:  # truncated or garbage body, or an unresolvable schema pair
        raise DecodeError(f"Avro body does not decode: {exc!r}") from exc
    if buf.tell() != len(value):
        raise DecodeError(f"{len(value) - buf.tell()} trailing bytes after the Avro body")
    return data  # type: ignore[return-value]


_RANGES = {"int": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}
_NUMERIC = frozenset(("int", "long", "float", "double", "boolean"))


def strict_check(schema: dict[str, Any]) -> Callable[[dict[str, Any]], None] | None:
    """What fastavro's writer does not refuse, for one record schema: it writes `int(5.5)`
    for an int or long, `bool(x)` for a boolean and `float("5.5")` for a double, and a value
    beyond 64 bits may still pass as a double. Unions, strings and bytes it checks already.
    Returns a function raising ValueError for such a value, or None if no field needs one.

    Only the top-level fields of these types are checked, by type identity (a few hundred
    nanoseconds per event on the bulk path); a record with a nested record, array or map that
    holds one of them is validated whole by fastavro (slower, exact)."""
    ints: list[tuple[str, str, int, int]] = []
    flags: list[str] = []
    reals: list[tuple[str, str]] = []
    for f in schema.get("fields", ()):
        name, ftype = f["name"], f["type"]
        if isinstance(ftype, dict) and ftype.get("type") in _NUMERIC and "logicalType" not in ftype:
            ftype = ftype["type"]
        if not isinstance(ftype, str):
            if isinstance(ftype, dict) and _holds_numbers(ftype):
                return _whole_record(schema)
        elif ftype in _RANGES:
            ints.append((name, ftype, *_RANGES[ftype]))
        elif ftype == "boolean":
            flags.append(name)
        elif ftype in ("float", "double"):
            reals.append((name, ftype))
    if not (ints or flags or reals):
        return None

    def check(data: dict[str, Any]) -> None:
        get = data.get
        for name, kind, low, high in ints:
            value = get(name)
            if type(value) is not int or not low <= value <= high:
                if value is None and name not in data:
                    continue  # missing: fastavro applies the default or refuses
                raise ValueError(f"field {name!r}: {_wanted(kind)}, not {_shown(value)}")
        for name in flags:
            value = get(name)
            if type(value) is not bool and (value is not None or name in data):
                raise ValueError(f"field {name!r}: expected a boolean, not {_shown(value)}")
        for name, kind in reals:
            value = get(name)
            if type(value) is not float and (type(value) is not int or abs(value) > 2**63):
                if value is None and name not in data:
                    continue
                raise ValueError(f"field {name!r}: expected a number ({kind}), not {_shown(value)}")

    # The bulk path runs one generated expression (all fields right: ~0.1-0.2 us for the bank's
    # one long); `check` above only runs to say what is wrong (or that a field is missing).
    conds = [
        f"(type(v{i} := get({n!r})) is int and {lo} <= v{i} <= {hi})"
        for i, (n, _kind, lo, hi) in enumerate(ints)
    ]
    conds += [f"type(get({n!r})) is bool" for n in flags]
    conds += [
        f"(type(r{i} := get({n!r})) is float"
        f" or (type(r{i}) is int and -{2**63} <= r{i} <= {2**63}))"
        for i, (n, _kind) in enumerate(reals)
    ]
    body = " and ".join(conds)
    source = f"def fast(data):\n    get = data.get\n    if not ({body}):\n        slow(data)\n"
    namespace: dict[str, Any] = {"slow": check}
    exec(compile(source, f"<strict check of {schema.get('name')}>", "exec"), namespace)
    return cast(Callable[[dict[str, Any]], None], namespace["fast"])


def _holds_numbers(ftype: Any) -> bool:
    """True if a complex type has an int, long, float, double or boolean anywhere inside."""
    if isinstance(ftype, str):
        return ftype in _NUMERIC
    if isinstance(ftype, list):
        return any(_holds_numbers(t) for t in ftype)
    kind = ftype.get("type")
    if kind == "record":
        return any(_holds_numbers(f["type"]) for f in ftype.get("fields", ()))
    if kind == "array":
        return _holds_numbers(ftype["items"])
    if kind == "map":
        return _holds_numbers(ftype["values"])
    return kind in _NUMERIC


def _whole_record(schema: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    def check(data: dict[str, Any]) -> None:
        try:
            validate(data, schema, raise_errors=True)
        except ValidationError as exc:
            raise ValueError(_validation_reason(exc)) from exc

    return check


def _wanted(kind: str) -> str:
    low, high = _RANGES[kind]
    return f"expected an integer ({kind}) from {low} to {high}"


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _validation_reason(err: ValidationError) -> str:
    # fastavro's message lists every failing path; keep it on one line.
    return " ".join(str(err).split())
