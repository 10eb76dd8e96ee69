"""A command's fingerprint is computed once and is what it always was; a result's bytes are
what `json.dumps(separators=(",", ":"), ensure_ascii=False)` gives (orjson, for speed); the id
of a command record that does not parse is read where it can be."""

from __future__ import annotations

import hashlib
import json

import pytest
from refold.core.commands import Command, CommandResult, readable_id
from refold.core.errors import InputError


def _fresh_fingerprint(command: Command) -> str:
    body = {k: v for k, v in command.to_json().items() if k != "command_id"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def test_the_fingerprint_is_cached_and_unchanged() -> None:
    data = {"amount_cents": 12, "memo": "für Müller", "z": [1.5, None, {"b": 1, "a": 2}]}
    command = Command("c-1", "bank", "acc-1", "bank.Deposit", data, 3)
    first = command.fingerprint
    assert first == _fresh_fingerprint(command) and command.fingerprint is first
    same = Command("c-2", "bank", "acc-1", "bank.Deposit", dict(data), 3)
    assert same.fingerprint == first  # the id is not part of it
    assert Command("c-1", "bank", "acc-1", "bank.Deposit", data, 4).fingerprint != first
    # The cache is no field of the command: not in its JSON, its equality or its repr.
    fresh = Command("c-1", "bank", "acc-1", "bank.Deposit", data, 3)
    assert fresh == command and "_fingerprint" not in command.to_json()
    assert "_fingerprint" not in repr(command)


def test_a_result_encodes_as_compact_json_did() -> None:
    result = CommandResult(
        command_id="c-ü",
        status="rejected",
        aggregate="bank",
        key="acc-\u2603",
        type="bank.Withdraw",
        events=({"type": "bank.X", "topic": "t", "partition": 2, "offset": 9},),
        reason='insufficient funds: 5 < 7 — "quoted"\n',
        current_version=None,
        version=4,
        decided_at_ms=1_700_000_000_000,
        command_position={"topic": "t.commands", "partition": 2, "offset": 10},
        fingerprint="ab" * 16,
    )
    expected = json.dumps(result.to_json(), separators=(",", ":"), ensure_ascii=False).encode()
    assert result.encode() == expected
    assert CommandResult.from_json(json.loads(result.encode())) == result


@pytest.mark.parametrize(
    ("value", "headers", "expected"),
    [
        (b'{"command_id": "c-1", "data": [1]}', [("ce_id", b"h-1")], "c-1"),
        (b'{"command_id": 5, "data": [1]}', [("ce_id", b"h-1")], "h-1"),
        (b'{"command_id": "", "key": 1}', [("ce_id", b"h-1")], "h-1"),
        (b"\xff not JSON", [("ce_id", b"h-1")], "h-1"),
        (b'["c-1"]', None, None),
        (b'{"command_id": "\\ud800"}', [("ce_id", b"\xff")], None),  # no text: no id
        (None, [("ce_id", None)], None),
        # longer than the API allows: no id to key a result by (but a header that fits is)
        (json.dumps({"command_id": "x" * 201}).encode(), [("ce_id", b"h-1")], "h-1"),
        (b"{}", [("ce_id", b"y" * 201)], None),
    ],
)
def test_the_id_of_a_malformed_command_is_read_where_it_can_be(
    value: bytes | None, headers: list | None, expected: str | None
) -> None:
    assert readable_id(value, headers) == expected


def test_a_command_record_with_an_id_longer_than_the_api_allows_is_malformed() -> None:
    body = {"key": "acc-1", "type": "bank.Deposit", "data": {"amount_cents": 1}}
    fits = Command.decode(json.dumps({**body, "command_id": "c" * 200}).encode(), None)
    assert fits.command_id == "c" * 200
    with pytest.raises(InputError, match="at most 200 characters, not one of 100000"):
        Command.decode(json.dumps({**body, "command_id": "c" * 100_000}).encode(), None)
    with pytest.raises(InputError, match="at most 200 characters"):  # from the header too
        Command.decode(json.dumps(body).encode(), [("ce_id", b"h" * 201)])
