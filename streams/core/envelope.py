"""The CloudEvents Kafka-binding envelope: the one module that writes and reads it.

Every record refold produces — events, commands — carries CloudEvents 1.0 binary-mode headers:
`ce_specversion`, `ce_id`, `ce_type`, `ce_source`, `ce_time`, plus `ce_correlationid` and
`ce_causationid` when known, and the `content-type` the Kafka protocol binding maps the event's
`datacontenttype` to: `application/avro` for events (Avro single-object encoding), so a
CloudEvents SDK reads them without a custom unmarshaller; commands, which are JSON, say so.
(What the sixth header costs `publish_bulk` is measured in bench/RESULTS.md.)

Writers build headers here (`headers`, or `template` for a publisher that sends many records
of one type and only swaps the id); readers get the attributes back with `read`.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import lru_cache

from refold.core.ids import random_uuid

SPEC_VERSION = "1.0"
SPECVERSION = "ce_specversion"
ID = "ce_id"
TYPE = "ce_type"
SOURCE = "ce_source"
TIME = "ce_time"
CORRELATION_ID = "ce_correlationid"
CAUSATION_ID = "ce_causationid"
CONTENT_TYPE = "content-type"
AVRO = "application/avro"  # every event value: Avro single-object encoded
#: Where `template` leaves the id: a writer replaces this slot per record.
ID_SLOT = 0

Headers = list[tuple[str, bytes]]
RawHeaders = Sequence[tuple[str, bytes | None]]


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def template(
    type_name: str,
    *,
    source: str,
    time: str | None = None,
    correlation_id: str | None = None,
    causation_id: str | None = None,
    content_type: str | None = AVRO,  # "" or None: no content-type header
) -> Headers:
    """The headers of a record of `type_name` with an empty id at `ID_SLOT`.

    A writer of many records reuses one template per type and replaces only the id slot
    (`produce()` copies headers before it returns), so the envelope costs no list per record.
    """
    headers: Headers = [
        (ID, b""),
        (SPECVERSION, SPEC_VERSION.encode()),
        (TYPE, type_name.encode()),
        (SOURCE, source.encode()),
        (TIME, (time or now_rfc3339()).encode()),
    ]
    if correlation_id:
        headers.append((CORRELATION_ID, correlation_id.encode()))
    if causation_id:
        headers.append((CAUSATION_ID, causation_id.encode()))
    if content_type:
        headers.append((CONTENT_TYPE, content_type.encode()))
    return headers


def headers(
    type_name: str,
    *,
    source: str,
    id: str | None = None,
    time: str | None = None,
    correlation_id: str | None = None,
    causation_id: str | None = None,
    content_type: str | None = AVRO,
) -> Headers:
    """The headers of one record; a new random id when none is given."""
    out = template(
        type_name,
        source=source,
        time=time,
        correlation_id=correlation_id,
        causation_id=causation_id,
        content_type=content_type,
    )
    out[ID_SLOT] = (ID, (id or random_uuid()).encode())
    return out


def default_source() -> str:
    """The `ce_source` of events a publisher sends when it is given none: this host."""
    return f"refold://{socket.gethostname()}"


def record_size(
    key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes | None]] | None
) -> int:
    """What a record weighs against Kafka's size limits, counted as Kafka counts it: key,
    value and headers (names and values). Every size check of refold counts so."""
    total = len(key or b"") + len(value or b"")
    return total + sum(len(name.encode()) + len(raw or b"") for name, raw in headers or ())


def size(
    type_name: str,
    *,
    source: str,
    correlation_id: str | None = None,
    causation_id: str | None = None,
    content_type: str | None = AVRO,
) -> int:
    """The bytes (names and values) of the headers `headers` gives for these arguments and a
    random id, without building them: what they add to a record against the size limits."""
    total = _fixed_size(type_name, source, content_type)
    for name, value in ((CORRELATION_ID, correlation_id), (CAUSATION_ID, causation_id)):
        if value:
            total += len(name) + len(value.encode())
    return total


@lru_cache(maxsize=1024)
def _fixed_size(type_name: str, source: str, content_type: str | None) -> int:
    # A random id and the current time have one length each (`now_rfc3339` is fixed-width).
    built = headers(type_name, source=source, content_type=content_type)
    return sum(len(name) + len(value) for name, value in built)


def read(raw: RawHeaders | None) -> dict[str, str]:
    """Every header of a record as text (the envelope's attributes under their `ce_` names)."""
    if not raw:
        return {}
    return {k: v.decode("utf-8", "replace") for k, v in raw if v is not None}


def read_id(raw: RawHeaders | None) -> str | None:
    """The record's `ce_id`, without decoding the other headers."""
    for name, value in raw or ():
        if name == ID and value is not None:
            return value.decode("utf-8", "replace")
    return None
