"""The bundled `accounts` decider and the command checks, without Kafka."""

from __future__ import annotations

from typing import Any

import pytest
from refold.core.app import load_deciders
from refold.core.commands import Command, Decider, Rejected, parse_command
from refold.core.errors import InputError
from refold.core.serde import Event
from refold.examples.bank.accounts import Accounts

ACCOUNTS = Accounts()


def run(history: list[tuple[str, dict[str, Any]]], key: str = "acc-1") -> dict[str, Any]:
    """Decide each command in order, folding the accepted events: what the processor does."""
    state = ACCOUNTS.initial(key)
    offset = 0
    for type_name, data in history:
        command = parse_command(ACCOUNTS, {"key": key, "type": type_name, "data": data})
        for event_type, event_data in ACCOUNTS.decide(command, state):
            event = Event(event_type, key, event_data, "bank.accounts", 0, offset)
            state = ACCOUNTS.apply(state, event)
            offset += 1
    return state


def decide(state: dict[str, Any], type_name: str, data: dict[str, Any]) -> list:
    return ACCOUNTS.decide(Command("c1", "accounts", "acc-1", type_name, data), state)


OPEN = ("bank.OpenAccount", {"owner": "ada"})


def test_open_deposit_withdraw_close():
    state = run(
        [
            OPEN,
            ("bank.Deposit", {"amount_cents": 500}),
            ("bank.Withdraw", {"amount_cents": 200, "memo": "rent"}),
        ]
    )
    assert state == {"status": "open", "owner": "ada", "balance_cents": 300}
    assert decide(state, "bank.Withdraw", {"amount_cents": 300}) == [
        ("bank.MoneyWithdrawn", {"account_id": "acc-1", "amount_cents": 300, "memo": ""})
    ]
    state = run(
        [
            OPEN,
            ("bank.Deposit", {"amount_cents": 5}),
            ("bank.Withdraw", {"amount_cents": 5}),
            ("bank.CloseAccount", {}),
        ]
    )
    assert state["status"] == "closed"


@pytest.mark.parametrize(
    ("history", "command", "reason"),
    [
        ([OPEN], ("bank.Withdraw", {"amount_cents": 1}), "insufficient funds"),
        (
            [OPEN, ("bank.Deposit", {"amount_cents": 10})],
            ("bank.Withdraw", {"amount_cents": 11}),
            "insufficient funds",
        ),
        ([], ("bank.Withdraw", {"amount_cents": 1}), "unknown account"),
        ([], ("bank.Deposit", {"amount_cents": 1}), "unknown account"),
        ([OPEN], ("bank.OpenAccount", {"owner": "bob"}), "already exists"),
        ([OPEN], ("bank.Deposit", {"amount_cents": 0}), "must be positive"),
        ([OPEN], ("bank.Withdraw", {"amount_cents": -5}), "must be positive"),
        ([OPEN, ("bank.Deposit", {"amount_cents": 1})], ("bank.CloseAccount", {}), "balance of 1"),
        ([OPEN, ("bank.CloseAccount", {})], ("bank.Deposit", {"amount_cents": 1}), "is closed"),
        ([OPEN, ("bank.CloseAccount", {})], ("bank.Withdraw", {"amount_cents": 1}), "is closed"),
        ([], ("bank.OpenAccount", {"owner": "  "}), "owner must not be empty"),
    ],
)
def test_rejections(history, command, reason):
    state = run(history)
    with pytest.raises(Rejected, match=reason):
        decide(state, *command)


def test_decide_does_not_change_the_state_it_is_shown():
    state = run([OPEN, ("bank.Deposit", {"amount_cents": 10})])
    before = dict(state)
    decide(state, "bank.Withdraw", {"amount_cents": 10})
    assert state == before


D = "bank.Deposit"


@pytest.mark.parametrize(
    ("obj", "problem"),
    [
        ({"key": "a", "type": "bank.Nope", "data": {}}, "no command type 'bank.Nope'"),
        ({"key": "a", "type": "bank.Deposit", "data": {}}, "missing field 'amount_cents'"),
        ({"key": "a", "type": D, "data": {"amount_cents": "5"}}, "must be an integer"),
        ({"key": "a", "type": D, "data": {"amount_cents": True}}, "must be an integer"),
        ({"key": "a", "type": D, "data": {"amount_cents": 5, "x": 1}}, "unknown field"),
        (
            {"key": "a", "type": "bank.Deposit", "data": {"amount_cents": 5, "memo": 3}},
            "'memo' must be a string",
        ),
        ({"type": "bank.Deposit", "data": {"amount_cents": 5}}, 'missing "key"'),
        ({"key": "a", "data": {}}, 'missing "type"'),
        (
            {"key": "a", "type": "bank.CloseAccount", "data": {}, "expected_version": -1},
            "non-negative",
        ),
        ({"key": "a", "type": "bank.CloseAccount", "data": {}, "command_id": ""}, "command_id"),
        ({"key": "a", "type": "bank.CloseAccount", "data": {}, "extra": 1}, "unexpected field"),
        (["not", "an", "object"], "JSON object"),
    ],
)
def test_malformed_commands_are_input_errors(obj, problem):
    with pytest.raises(InputError, match=problem):
        parse_command(ACCOUNTS, obj)


def test_parse_command_fills_in_an_id_and_keeps_the_version():
    command = parse_command(
        ACCOUNTS, {"key": "a", "type": "bank.CloseAccount", "expected_version": 3}
    )
    assert command.command_id and command.expected_version == 3 and command.data == {}
    again = Command.decode(command.encode(), command.headers("test"))
    assert again == command


def test_the_bank_app_brings_its_decider_and_nothing_is_bundled():
    assert load_deciders() == {}
    deciders = load_deciders(["refold.examples.bank"])
    assert isinstance(deciders["accounts"], Accounts)
    assert ACCOUNTS.command_topic == "bank.accounts.commands"
    assert ACCOUNTS.results_topic == "bank.accounts.commands.results"


def test_projections_tolerate_account_closed():
    from refold.examples.bank.projections import Balances, Owners, Passbook

    closed = Event("bank.AccountClosed", "acc-1", {"account_id": "acc-1"}, "bank.accounts", 0, 9)
    for projection in (Balances(), Passbook()):
        state = projection.apply(projection.initial("acc-1"), closed)
        assert state["balance_cents"] == 0
    owners = Owners()
    assert owners.apply(owners.initial("ada"), closed) == {"accounts": {}, "total_cents": 0}


def test_default_decide_rejects_types_without_handler():
    class Empty(Decider):
        name = "empty"
        events_topic = "x"
        commands = {"x.Do": {}}

    with pytest.raises(Rejected, match="no handler"):
        Empty().decide(Command("c", "empty", "k", "x.Do", {}), {})
