"""The CloudEvents envelope: what writers put on a record is what readers get back."""

from __future__ import annotations

from refold.core import envelope
from refold.core.commands import Command
from refold.core.serde import Event

# The CloudEvents required attributes and the binding's content-type (events are Avro).
REQUIRED = {"ce_specversion", "ce_id", "ce_type", "ce_source", "ce_time", "content-type"}


def test_headers_carry_the_required_attributes_and_read_back() -> None:
    headers = envelope.headers(
        "bank.MoneyDeposited",
        source="refold://test",
        id="ev-1",
        time="2026-11-27T10:00:00.000000Z",
        correlation_id="corr",
        causation_id="cause",
    )
    assert {name for name, _ in headers} == REQUIRED | {"ce_correlationid", "ce_causationid"}
    event = Event("bank.MoneyDeposited", "acc-1", {}, "t", 0, 7, headers=headers)
    assert (event.id, event.source, event.time) == (
        "ev-1",
        "refold://test",
        "2026-11-27T10:00:00.000000Z",
    )
    assert (event.correlation_id, event.causation_id) == ("corr", "cause")
    assert envelope.read(headers)["ce_specversion"] == "1.0"
    assert envelope.read(headers)["ce_type"] == "bank.MoneyDeposited"
    assert envelope.read(headers)["content-type"] == "application/avro"
    assert "content-type" not in envelope.read(envelope.headers("t", source="s", content_type=""))


def test_headers_without_an_id_get_a_fresh_one_each() -> None:
    first = envelope.read_id(envelope.headers("t", source="s"))
    second = envelope.read_id(envelope.headers("t", source="s"))
    assert first and second and first != second
    assert {n for n, _ in envelope.headers("t", source="s")} == REQUIRED


def test_a_template_leaves_the_id_slot_for_the_writer() -> None:
    headers = envelope.template("t", source="s", time="now")
    assert headers[envelope.ID_SLOT] == (envelope.ID, b"")
    headers[envelope.ID_SLOT] = (envelope.ID, b"abc")
    assert envelope.read_id(headers) == "abc"
    assert envelope.read(headers)["ce_time"] == "now"


def test_an_event_without_headers_falls_back_to_its_position() -> None:
    event = Event("t", "k", {}, "topic", 2, 9, timestamp_ms=1_700_000_000_000)
    assert event.id == "topic-2-9"
    assert event.time == "2023-11-14T22:13:20.000Z"
    assert event.source == "" and event.correlation_id is None


def test_command_envelope_round_trips_the_command_id() -> None:
    command = Command("cmd-1", "accounts", "acc-1", "bank.Deposit", {"amount_cents": 5})
    headers = command.headers("refold://test")
    assert envelope.read(headers)["content-type"] == "application/json"
    assert envelope.read(headers)["ce_type"] == "bank.Deposit"
    # A command whose JSON lacks its id takes it from the envelope.
    body = b'{"key": "acc-1", "type": "bank.Deposit", "data": {}}'
    assert Command.decode(body, headers).command_id == "cmd-1"


def test_size_is_what_the_headers_weigh() -> None:
    """`size` counts, without building them, what headers a record would carry (the command
    processor checks an event's record against Kafka's limits with it)."""
    for cid in (None, "c", "ü" * 300, "x" * 5000):
        for content_type in (envelope.AVRO, None):
            built = envelope.headers(
                "bank.MoneyDeposited",
                source="refold://h/commands/accounts",
                correlation_id=cid,
                causation_id=cid,
                content_type=content_type,
            )
            assert envelope.size(
                "bank.MoneyDeposited",
                source="refold://h/commands/accounts",
                correlation_id=cid,
                causation_id=cid,
                content_type=content_type,
            ) == sum(len(name) + len(value) for name, value in built)
