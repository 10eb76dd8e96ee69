"""The generated encoders must write fastavro's bytes for every value they take, and refuse
(None, so the codec falls back to fastavro's strict path) every value they would not."""

from __future__ import annotations

import io
import random

import fastavro
import pytest
from refold.core.fastencode import generate

from tests.unit.test_fastdecode import SCHEMA, random_record

PREFIX = b"\xc3\x01" + b"F" * 8

DEFAULTS = fastavro.parse_schema(
    {
        "type": "record",
        "name": "Defaults",
        "namespace": "t",
        "fields": [
            {"name": "id", "type": "string"},
            {"name": "n", "type": "int", "default": 7},
            {"name": "o", "type": ["null", "string"], "default": None},
            {"name": "a", "type": {"type": "array", "items": "string"}, "default": []},
            {"name": "flag", "type": "boolean", "default": True},
        ],
    }
)


def fastavro_bytes(schema: dict, record: dict) -> bytes:
    buf = io.BytesIO()
    buf.write(PREFIX)
    fastavro.schemaless_writer(buf, schema, record)
    return buf.getvalue()


def test_agrees_with_fastavro_on_random_records() -> None:
    encode = generate(SCHEMA, PREFIX)
    assert encode is not None
    rng = random.Random(4321)
    for _ in range(3000):
        record = random_record(rng)
        assert encode(record) == fastavro_bytes(SCHEMA, record), record


def test_every_varint_width_agrees_with_fastavro() -> None:
    """Varints of up to three bytes are written inline, longer ones by a loop: each width's
    edges, for numbers (zigzag) and for string lengths (a shift), both signs."""
    encode = generate(SCHEMA, PREFIX)
    assert encode is not None
    base = random_record(random.Random(7))
    edges = [2**k + d for k in (6, 7, 13, 14, 20, 21, 27, 28, 62) for d in (-1, 0, 1)]
    for n in [0, *edges, 2**63 - 1]:
        for value in (n, -n - 1):
            record = {**base, "l": value}
            assert encode(record) == fastavro_bytes(SCHEMA, record), value
    for length in (63, 64, 8191, 8192, 1048575, 1048576):
        record = {**base, "s": "x" * length, "y": b"y" * length}
        assert encode(record) == fastavro_bytes(SCHEMA, record), length


def test_missing_fields_take_their_defaults() -> None:
    encode = generate(DEFAULTS, PREFIX)
    assert encode is not None
    for record in (
        {"id": "x"},
        {"id": "x", "n": -3, "o": "é", "a": ["p", "q"], "flag": False},
        {"id": "", "o": None, "a": []},
    ):
        assert encode(record) == fastavro_bytes(DEFAULTS, record), record
    assert encode({"n": 1}) is None  # no default: fastavro's error, from the fallback


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("l", 5.5),
        ("l", True),
        ("l", 2**63),
        ("i", 2**31),
        ("i", "1"),
        ("b", 1),
        ("d", "5.5"),
        ("d", 2**64),
        ("s", b"bytes"),
        ("y", "text"),
        ("o", 3),
        ("u", 2.5),
        ("n", 0),
        ("a", ("tuple",)),
        ("al", [1, 2.0]),
        ("s", "\ud800"),  # a lone surrogate is not UTF-8
    ],
)
def test_refuses_what_strict_encoding_would_not_write_alike(field: str, value: object) -> None:
    encode = generate(SCHEMA, PREFIX)
    assert encode is not None
    record = random_record(random.Random(9))
    record[field] = value
    assert encode(record) is None


def test_schemas_it_cannot_write_straight_are_left_to_fastavro() -> None:
    def schema(ftype: object, **extra: object) -> dict:
        field = {"name": "x", "type": ftype, **extra}
        return {"type": "record", "name": "R", "fields": [field]}

    assert generate(schema(["null", "long", "double"]), PREFIX) is None  # an int fits both
    assert generate(schema(["int", "long"]), PREFIX) is None
    assert generate(schema({"type": "map", "values": "string"}), PREFIX) is None
    assert generate(schema({"type": "long", "logicalType": "timestamp-millis"}), PREFIX) is None
    assert generate(schema("bytes", default="\u00ff"), PREFIX) is None
    assert generate({"type": "enum", "name": "E", "symbols": ["A"]}, PREFIX) is None
