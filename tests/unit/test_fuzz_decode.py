"""Hypothesis on what arrives from outside: record values (the Avro decoder), record headers (the
CloudEvents envelope reader), command records and JSON-lines publish files. Each gives a result
or its clean error (DecodeError, InputError, a problem with its line), never another exception
or a hang (pytest-timeout bounds each test). Seeded (`derandomize=True`) and bounded."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from refold.core import envelope
from refold.core.catalog import Catalog
from refold.core.commands import Command
from refold.core.errors import DecodeError, InputError
from refold.core.inputs import events_from_lines
from refold.core.serde import HEADER_LEN, MAGIC, Codec, Event

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
CODEC = Codec(Catalog.load([SCHEMAS]))
FINGERPRINTS = sorted(CODEC.catalog.by_fingerprint)
FUZZ = settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
DEPOSIT = CODEC.encode(
    "bank.MoneyDeposited", {"account_id": "acc-1", "amount_cents": 500, "memo": "hello"}
)


@st.composite
def values(draw: st.DrawFn) -> bytes:
    """Arbitrary bytes, bytes behind a known schema's header, and damaged real events."""
    kind = draw(st.sampled_from(["any", "known header", "damaged"]))
    if kind == "any":
        return draw(st.binary(max_size=64))
    if kind == "known header":
        fingerprint = draw(st.sampled_from(FINGERPRINTS))
        return MAGIC + fingerprint + draw(st.binary(max_size=128))
    value = bytearray(DEPOSIT)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(HEADER_LEN, len(value) - 1))
        value[at] = draw(st.integers(0, 255))
    cut = draw(st.integers(HEADER_LEN, len(value) + 8))
    return bytes(value[:cut]) + draw(st.binary(max_size=8))


@pytest.mark.timeout(120)
@FUZZ
@given(value=values())
def test_the_decoder_returns_an_event_or_a_decode_error(value: bytes) -> None:
    try:
        type_name, data = CODEC.decode(value)
    except DecodeError:
        pass
    else:
        assert type_name in CODEC.catalog.types and isinstance(data, dict)
    # The fold loop calls the generated decoders directly; they may raise only what it catches.
    fast = CODEC.raw_decoders.get(value[:HEADER_LEN])
    if fast is not None:
        with contextlib.suppress(IndexError, ValueError, UnicodeDecodeError):
            assert isinstance(fast[1](value), dict)


_NAMES = st.sampled_from(
    [
        envelope.ID,
        envelope.TYPE,
        envelope.SOURCE,
        envelope.TIME,
        envelope.CORRELATION_ID,
        envelope.CAUSATION_ID,
        envelope.SPECVERSION,
        envelope.CONTENT_TYPE,
    ]
) | st.text(max_size=12)
HEADERS = st.lists(st.tuples(_NAMES, st.none() | st.binary(max_size=24)), max_size=8) | st.none()


@pytest.mark.timeout(120)
@FUZZ
@given(headers=HEADERS)
def test_the_envelope_reader_takes_any_headers(headers: Any) -> None:
    attributes = envelope.read(headers)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in attributes.items())
    found = envelope.read_id(headers)
    assert found is None or isinstance(found, str)
    event = Event("t", "k", {}, "topic", 0, 3, headers=headers)
    assert isinstance(event.id, str) and isinstance(event.time, str)
    assert isinstance(event.source, str)
    for attribute in (event.correlation_id, event.causation_id):
        assert attribute is None or isinstance(attribute, str)
    json.dumps(event.to_json())  # what the HTTP and CLI tails print


JSON_TEXT = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
).map(json.dumps)
ODD_TEXT = st.sampled_from(
    [
        b"[" * 100_000,
        b"{" * 50_000,
        b"1" * 5_000,
        b"-" + b"9" * 4_400,
        b"1e999999",
        b"NaN",
        b"\xff\xfe",
    ]
)


@pytest.mark.timeout(120)
@FUZZ
@given(
    value=st.none() | st.binary(max_size=64) | JSON_TEXT.map(str.encode) | ODD_TEXT,
    headers=HEADERS,
)
def test_a_command_record_decodes_or_is_an_input_error(value: Any, headers: Any) -> None:
    try:
        command = Command.decode(value, headers)
    except InputError:
        return
    assert isinstance(command.command_id, str) and isinstance(command.data, dict)
    assert command.encode() and command.fingerprint  # what the processor does with it


@pytest.mark.parametrize(
    "value",
    [
        rb'{"command_id":"c1","key":"\ud800","type":"t.T","data":{}}',
        rb'{"command_id":"c1","key":"k","type":"t.T","data":{"memo":"\udfff"}}',
        rb'{"command_id":"c1","key":"k","type":"t.\uDBFF","data":{}}',
        rb'{"command_id":"\ud800","key":"k","type":"t.T","data":{}}',
        b'{"command_id":"c1","key":"\xed\xa0\x80","type":"t.T","data":{}}',  # a CESU-8 half
    ],
)
def test_a_command_with_a_lone_surrogate_is_an_input_error(value: bytes) -> None:
    """json.loads decodes these to strings nothing can encode; the processor failed on them."""
    with pytest.raises(InputError, match="not UTF-8 text"):
        Command.decode(value, None)


def _blank(line: bytes) -> bool:
    """What the parser skips: a line of only whitespace (Unicode's, once decoded)."""
    try:
        return not line.decode().strip()
    except UnicodeDecodeError:
        return False


def _event_line(key: str, amount: Any, memo: Any) -> bytes:
    data = {"account_id": key, "amount_cents": amount, "memo": memo}
    return json.dumps({"type": "bank.MoneyDeposited", "key": key, "data": data}).encode()


TEXT = st.characters(codec="utf-8")  # any character UTF-8 can carry (no lone surrogates)
GOOD_LINES = st.builds(
    _event_line,
    st.text(TEXT, min_size=1, max_size=8),
    st.integers(0, 10**6),
    st.text(TEXT, max_size=8),
)
BAD_LINES = (
    st.builds(
        _event_line,
        st.text(min_size=1, max_size=8),
        st.floats(allow_nan=False)
        | st.booleans()
        | st.integers(2**63, 2**70)
        | st.text(max_size=4),
        st.text(max_size=4),
    )
    | st.binary(min_size=1, max_size=32).filter(lambda b: not _blank(b))
    | JSON_TEXT.map(str.encode)
    | ODD_TEXT
    | st.builds(_event_line, st.just("\ud800"), st.integers(0, 9), st.just(""))  # a lone surrogate
    | st.builds(_event_line, st.just("k"), st.integers(0, 9), st.just("\udfff"))
)


@pytest.mark.timeout(120)
@FUZZ
@given(
    lines=st.lists(
        st.tuples(st.just(True), GOOD_LINES) | st.tuples(st.just(False), BAD_LINES),
        min_size=1,
        max_size=8,
    )
)
def test_every_jsonl_line_is_an_event_or_a_problem_on_its_line(
    lines: list[tuple[bool, bytes]],
) -> None:
    raw = [line + b"\n" for _, line in lines]
    events, problems = events_from_lines(raw, CODEC)
    # The oracle is how each line was made: every bad one is a problem on its own line.
    bad = {n for n, (good, line) in enumerate(lines, start=1) if not good}
    split = {n for n, (_, line) in enumerate(lines, start=1) if b"\n" in line}
    if not split:  # a line with a newline inside is two lines to the parser
        assert {p.line for p in problems} == bad
        assert len(events) == len(lines) - len(bad)
    for problem in problems:
        assert problem.reason and "\n" not in problem.reason
