"""The generated decoders must agree with fastavro on every value, and fail on bad bytes."""

from __future__ import annotations

import io
import random

import fastavro
import pytest
from refold.core.fastdecode import generate

SCHEMA = fastavro.parse_schema(
    {
        "type": "record",
        "name": "All",
        "namespace": "t",
        "fields": [
            {"name": "s", "type": "string"},
            {"name": "l", "type": "long"},
            {"name": "i", "type": "int"},
            {"name": "b", "type": "boolean"},
            {"name": "d", "type": "double"},
            {"name": "f", "type": "float"},
            {"name": "y", "type": "bytes"},
            {"name": "o", "type": ["null", "string"]},
            {"name": "u", "type": ["long", "null", "string"]},
            {"name": "n", "type": "null"},
            {"name": "a", "type": {"type": "array", "items": "string"}},
            {"name": "al", "type": {"type": "array", "items": "long"}},
        ],
    }
)


def random_record(rng: random.Random) -> dict:
    def text() -> str:
        return "".join(rng.choice("aé€𝄞z0 ") for _ in range(rng.randrange(0, 200)))

    return {
        "s": text(),
        "l": rng.choice(
            [0, -1, 1, 63, 64, -65, 2**62, -(2**63), 2**63 - 1, rng.randrange(-(10**12), 10**12)]
        ),
        "i": rng.randrange(-(2**31), 2**31),
        "b": rng.random() < 0.5,
        "d": rng.uniform(-1e300, 1e300),
        "f": float(rng.randrange(-1000, 1000)) / 4,
        "y": bytes(rng.randrange(256) for _ in range(rng.randrange(0, 50))),
        "o": rng.choice([None, text()]),
        "u": rng.choice([None, text(), rng.randrange(-(2**40), 2**40)]),
        "n": None,
        "a": [text() for _ in range(rng.randrange(0, 4))],
        "al": [rng.randrange(-(2**40), 2**40) for _ in range(rng.randrange(0, 300))],
    }


def encode(record: dict) -> bytes:
    buf = io.BytesIO()
    buf.write(b"H" * 10)  # stands for the single-object header
    fastavro.schemaless_writer(buf, SCHEMA, record)
    return buf.getvalue()


def test_agrees_with_fastavro_on_random_records() -> None:
    decode = generate(SCHEMA, 10)
    assert decode is not None
    rng = random.Random(1234)
    for _ in range(3000):
        value = encode(random_record(rng))
        assert decode(value) == fastavro.schemaless_reader(io.BytesIO(value[10:]), SCHEMA, None)


def test_truncated_or_padded_bytes_fail() -> None:
    decode = generate(SCHEMA, 10)
    value = encode(random_record(random.Random(5)))
    for cut in (11, len(value) // 2, len(value) - 1):
        with pytest.raises((IndexError, ValueError, UnicodeDecodeError)):
            decode(value[:cut])
    with pytest.raises(ValueError, match="trailing"):
        decode(value + b"\x00")


def test_array_blocks_with_a_byte_size() -> None:
    """Writers may send a negative count followed by the block's byte size (Avro spec)."""
    schema = fastavro.parse_schema(
        {
            "type": "record",
            "name": "A",
            "fields": [{"name": "a", "type": {"type": "array", "items": "string"}}],
        }
    )
    decode = generate(schema, 0)
    assert decode is not None
    # -2 items (zigzag 3), 4 bytes (zigzag 8), "x", "y", then 1 item "z", then the end (0)
    value = bytes([3, 8, 2, ord("x"), 2, ord("y"), 2, 2, ord("z"), 0])
    assert decode(value) == {"a": ["x", "y", "z"]}
    assert decode(value) == fastavro.schemaless_reader(io.BytesIO(value), schema, None)


def test_nested_or_logical_types_fall_back_to_fastavro() -> None:
    nested = fastavro.parse_schema(
        {
            "type": "record",
            "name": "N",
            "fields": [
                {"name": "x", "type": {"type": "array", "items": {"type": "map", "values": "long"}}}
            ],
        }
    )
    logical = fastavro.parse_schema(
        {
            "type": "record",
            "name": "L",
            "fields": [{"name": "t", "type": {"type": "long", "logicalType": "timestamp-millis"}}],
        }
    )
    assert generate(nested, 10) is None
    assert generate(logical, 10) is None
