"""The file publish path without Kafka: generated Avro encoders against fastavro, the bulk line
encoder against the reference `events_from_lines`, and chunked reading in worker processes."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import random
from itertools import pairwise
from pathlib import Path

import fastavro
import orjson
import pytest
from refold.core import envelope
from refold.core.catalog import Catalog
from refold.core.fastencode import generate
from refold.core.inputs import LineEncoder, events_from_lines
from refold.core.serde import Codec
from refold.engine.file_publish import chunk_ranges, read_events, unpack_batch

REPO_SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"

FLAT = {
    "type": "record",
    "name": "Flat",
    "fields": [
        {"name": "s", "type": "string"},
        {"name": "l", "type": "long"},
        {"name": "i", "type": "int"},
        {"name": "b", "type": "boolean"},
        {"name": "d", "type": "double"},
        {"name": "f", "type": "float"},
        {"name": "ns", "type": ["null", "string"]},
        {"name": "nl", "type": ["null", "long"]},
    ],
}


def fastavro_bytes(schema: dict, data: dict) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), data)
    return buf.getvalue()


@pytest.fixture
def codec() -> Codec:
    return Codec(Catalog.load([REPO_SCHEMAS]))


def test_generated_encoder_writes_what_fastavro_writes() -> None:
    encode = generate(FLAT, b"P")
    assert encode is not None
    rng = random.Random(3)
    edges = [0, -1, 1, 63, -64, 64, -65, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63)]
    for n in range(2000):
        long_value = edges[n % len(edges)] if n < 50 else rng.randrange(-(2**63), 2**63)
        data = {
            "s": "".join(rng.choice("aé€𝄞 ") for _ in range(rng.randrange(0, 90))),
            "l": long_value,
            "i": rng.randrange(-(2**31), 2**31),
            "b": rng.random() < 0.5,
            "d": rng.uniform(-1e300, 1e300) if n % 3 else rng.randrange(-(2**53), 2**53),
            "f": rng.uniform(-1e30, 1e30),
            "ns": None if n % 2 else "x" * (n % 70),
            "nl": None if n % 5 == 0 else long_value,
        }
        assert encode(data) == b"P" + fastavro_bytes(FLAT, data), data


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("l", 5.5),  # a float where a long is due
        ("l", True),  # a bool is an int to Python, not to Avro
        ("l", "5"),
        ("l", 2**63),  # beyond 64 bits
        ("i", 2**31),
        ("b", 1),
        ("d", "5.5"),
        ("d", 2**64),
        ("s", 5),
        ("f", 1e300),  # no float holds it
        ("nl", 1.0),
    ],
)
def test_generated_encoder_leaves_anything_it_would_coerce_to_the_codec(field, value) -> None:
    encode = generate(FLAT, b"")
    assert encode is not None
    data = {"s": "", "l": 1, "i": 1, "b": True, "d": 1.0, "f": 1.0, "ns": None, "nl": None}
    assert encode(data) is not None
    assert encode({**data, field: value}) is None
    missing = dict(data)
    del missing[field]
    assert encode(missing) is None  # a default to apply, or a refusal: the codec's job


def test_schemas_it_does_not_handle_get_no_encoder() -> None:
    nested = {"type": "record", "name": "N", "fields": [{"name": "a", "type": FLAT}]}
    array = {
        "type": "record",
        "name": "A",
        "fields": [{"name": "a", "type": {"type": "array", "items": "long"}}],
    }
    stamp = {"type": "long", "logicalType": "timestamp-millis"}
    logical = {"type": "record", "name": "T", "fields": [{"name": "t", "type": stamp}]}
    assert generate(nested, b"") is None
    assert generate(logical, b"") is None
    # Arrays of primitives are written straight (tests/unit/test_fastencode.py checks them).
    encode = generate(array, b"")
    assert encode is not None and encode({"a": [1, -1]}) == b"\x04\x02\x01\x00"


def mixed_lines(n: int, seed: int = 5) -> list[bytes]:
    """Good bank events with every kind of bad line among them."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        key = f"acc-{rng.randrange(50)}"
        kind = rng.choice(["bank.MoneyDeposited", "bank.MoneyWithdrawn"])
        data: dict = {"account_id": key, "amount_cents": rng.randrange(1, 10**6), "memo": f"#{i}"}
        if i % 7 == 0:
            del data["memo"]  # the schema's default applies
        lines.append(orjson.dumps({"type": kind, "key": key, "data": data}))
    bad = [
        b"{oops",
        b"",
        b"   ",
        b"\xff\xfe not utf-8",
        b"[1, 2]",
        b'{"type": "bank.MoneyDeposited", "key": "a", "data": {"account_id": "a", '
        b'"amount_cents": 12.5}}',
        b'{"type": "bank.MoneyDeposited", "key": "a", "data": {"account_id": "a", '
        b'"amount_cents": true}}',
        b'{"type": "bank.MoneyDeposited", "key": "a", "data": {"account_id": "a", '
        b'"amount_cents": 123456789012345678901234567890}}',
        b'{"type": "bank.MoneyDeposited", "key": "a", "data": {"account_id": "a", '
        b'"amount_cents": 1, "colour": "red"}}',
        b'{"type": "bank.Nope", "key": "a", "data": {}}',
        b'{"type": "bank.MoneyDeposited", "key": "", "data": {}}',
        b'{"type": "bank.MoneyDeposited", "key": "a", "data": {}, "extra": 1}',
        b'{"type": "bank.MoneyDeposited", "key": "a", "data": []}',
    ]
    for j, line in enumerate(bad):
        lines.insert((j * 37) % len(lines), line)
    return lines


def test_line_encoder_accepts_and_refuses_what_the_reference_does(codec: Codec) -> None:
    lines = mixed_lines(500)
    reference, expected_problems = events_from_lines(lines, codec)
    batch, problems = LineEncoder(codec).encode(b"\n".join(lines) + b"\n")
    assert batch.values == [e.value for e in reference]
    assert batch.keys == [e.key for e in reference]
    assert batch.types == [e.type for e in reference]
    assert problems == expected_problems
    assert len(problems) == 11  # the blank lines are no problem


def test_a_line_too_large_for_a_record_is_a_problem_of_its_line(codec: Codec) -> None:
    """The producer refuses a record over 1,000,000 bytes only once the lines before it are
    sent: the file was published in part. It is refused with the file's other problems now,
    counted as the command processor counts an event: key, value and the envelope's headers
    (key and value alone were counted)."""

    def line(key: str, memo_bytes: int) -> bytes:
        data = {"account_id": key, "amount_cents": 1, "memo": "m" * memo_bytes}
        return orjson.dumps({"type": "bank.MoneyDeposited", "key": key, "data": data})

    # "d": key and value fit, the envelope's headers tip it over (as the producer counts it)
    lines = [line("a", 5), line("b", 1_100_000), line("c", 899_000), line("k" * 460_000, 10)]
    lines.append(line("d", 899_900))
    reference, expected_problems = events_from_lines(lines, codec)
    batch, problems = LineEncoder(codec).encode(b"\n".join(lines) + b"\n")
    assert problems == expected_problems
    assert [p.line for p in problems] == [2, 4, 5]
    headers = envelope.size("bank.MoneyDeposited", source=envelope.default_source())
    assert problems[0].reason == (
        f"the event is {1_100_018 + headers} bytes as a record (key, value and headers); "
        "at most 900000 fit in a record"
    )
    assert batch.keys == [e.key for e in reference] == ["a", "c"]


def test_chunk_ranges_cover_the_input_and_end_at_line_ends() -> None:
    data = b"".join(b"x" * (i % 300) + b"\n" for i in range(5000)) + b"last, no newline"
    ranges = chunk_ranges(len(data), lambda at: _line_end(data, at), jobs=2)
    assert len(ranges) > 3
    assert ranges[0][0] == 0 and ranges[-1][1] == len(data)
    assert all(a[1] == b[0] for a, b in pairwise(ranges))
    assert all(data[end - 1 : end] == b"\n" for _start, end in ranges[:-1])


def _line_end(data: bytes, at: int) -> int:
    found = data.find(b"\n", at)
    return len(data) if at >= len(data) or found < 0 else found + 1


@pytest.mark.parametrize("as_file", [True, False])
def test_worker_processes_give_the_serial_result_with_file_line_numbers(
    codec: Codec, tmp_path: Path, as_file: bool
) -> None:
    lines = mixed_lines(4000, seed=9)
    lines.append(b'{"type": "bank.MoneyDeposited", "key": "z", "data": {"account_id": "z"}}')
    data = b"\n".join(lines)  # no newline at the end: the last line still counts
    reference, expected_problems = events_from_lines(lines, codec)
    path = tmp_path / "events.jsonl"
    path.write_bytes(data)
    read = read_events(path if as_file else data, codec, jobs=3)
    assert len(read.batches) > 3  # several chunks went through the pool
    assert [v for b in read.batches for v in b.values] == [e.value for e in reference]
    assert [k for b in read.batches for k in b.keys] == [e.key for e in reference]
    assert read.problems == expected_problems
    assert read.problems[-1].line == len(lines)  # the missing amount, on the last line
    assert read.lines == len(lines)
    assert read.count == len(reference)


@pytest.mark.parametrize("jobs", [1, 2])
def test_under_way_runs_once_here_after_the_workers_are_forked(codec: Codec, jobs: int) -> None:
    """`refold publish` makes its Kafka producer in `under_way`: it must run in this process,
    once, and (with workers) only when every worker exists, so no worker inherits a client."""
    data = b"\n".join(mixed_lines(4000, seed=5)) + b"\n"
    seen: list[tuple[int, int]] = []

    def under_way() -> None:
        seen.append((os.getpid(), len(multiprocessing.active_children())))

    read = read_events(data, codec, jobs=jobs, under_way=under_way)
    assert seen == [(os.getpid(), 0 if jobs == 1 else jobs)]
    assert read.count == read_events(data, codec, jobs=1).count


@pytest.mark.parametrize("jobs", [1, 3])
def test_shares_split_the_events_by_key_in_file_order(codec: Codec, jobs: int) -> None:
    """`read_events(shares=N)` (for N senders): every valid event in exactly one share, every
    key in one share only, each share in file order; problems as without shares."""
    lines = mixed_lines(4000, seed=11)
    data = b"\n".join(lines) + b"\n"
    whole = read_events(data, codec, jobs=1)
    split = read_events(data, codec, jobs=jobs, shares=3)
    assert split.problems == whole.problems and split.lines == whole.lines
    assert split.count == whole.count and split.batches == []
    shares = [[unpack_batch(blob) for blob in blobs] for blobs in split.shares]
    assert len(shares) == 3
    events = [
        (t, k, v) for b in whole.batches for t, k, v in zip(b.types, b.keys, b.values, strict=True)
    ]
    owner: dict[str, int] = {}
    for i, share in enumerate(shares):
        mine = [(t, k, v) for b in share for t, k, v in zip(b.types, b.keys, b.values, strict=True)]
        for _t, key, _v in mine:
            assert owner.setdefault(key, i) == i  # one share per key
        assert mine == [e for e in events if owner.get(e[1]) == i]  # file order kept
    assert sum(len(b) for share in shares for b in share) == len(events)
    assert len(set(owner.values())) == 3  # 3 shares actually used


def test_a_single_process_read_is_the_same(codec: Codec) -> None:
    lines = mixed_lines(300, seed=2)
    data = b"\n".join(lines) + b"\n"
    one, three = read_events(data, codec, jobs=1), read_events(data, codec, jobs=3)
    assert [b.values for b in one.batches] == [b.values for b in three.batches]
    assert one.problems == three.problems
    assert json.loads(lines[1]) is not None


def test_integers_beyond_64_bits_are_refused_for_a_double_as_the_reference_does(
    tmp_path: Path,
) -> None:
    schema = {
        "type": "record",
        "namespace": "t",
        "name": "Measured",
        "fields": [{"name": "x", "type": "double"}, {"name": "note", "type": "string"}],
    }
    (tmp_path / "Measured.avsc").write_text(json.dumps(schema))
    codec = Codec(Catalog.load([tmp_path]))
    lines = [
        b'{"type": "t.Measured", "key": "k", "data": {"x": 123456789012345678901234567890, '
        b'"note": ""}}',
        b'{"type": "t.Measured", "key": "k", "data": {"x": 1.5e29, "note": ""}}',
        b'{"type": "t.Measured", "key": "k", "data": {"x": 2, "note": "12345678901234567890"}}',
    ]
    reference, expected_problems = events_from_lines(lines, codec)
    batch, problems = LineEncoder(codec).encode(b"\n".join(lines))
    assert [p.line for p in problems] == [1]
    assert problems == expected_problems
    assert batch.values == [e.value for e in reference]
