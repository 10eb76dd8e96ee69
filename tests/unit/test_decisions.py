"""The command processor's pure decision step, without Kafka or a store: the bank's `accounts`
decider deciding batches of command records against given states."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from refold.core.commands import Command, Decider, EventSpec
from refold.core.errors import EncodeError
from refold.core.serde import Event
from refold.engine.decisions import (
    Aggregate,
    BatchDecision,
    CommandRecord,
    decide_batch,
    new_aggregate,
)
from refold.examples.bank.accounts import Accounts

ACCOUNTS = Accounts()
NOW = 1_800_000_000_000
HORIZON = NOW - 7 * 24 * 3600 * 1000
_offsets = iter(range(1_000_000))


def record(
    cid: str,
    type_name: str,
    data: dict[str, Any] | None = None,
    *,
    key: str = "acc-1",
    expected_version: int | None = None,
    record_key: str | None = None,
) -> CommandRecord:
    command = Command(cid, "accounts", key, type_name, data or {}, expected_version)
    raw_key = (record_key if record_key is not None else key).encode()
    return CommandRecord(cid, command, "", raw_key, "bank.accounts.commands", 3, next(_offsets))


def open_account(key: str = "acc-1", balance: int = 0, version: int = 1) -> Aggregate:
    state = {"status": "open", "owner": "ada", "balance_cents": balance}
    return {"version": version, "state": state}


def accept_all(_command: Command, _type: str, _data: Any) -> None:
    pass


def decide(
    records: list[CommandRecord],
    states: dict[str, Aggregate] | None = None,
    decided_at: dict[str, int] | None = None,
    *,
    decider: Decider = ACCOUNTS,
    check: Any = accept_all,
    claims: dict[str, str] | None = None,
) -> BatchDecision:
    return decide_batch(
        decider,
        check,
        records,
        states or {},
        decided_at or {},
        claims=claims,
        horizon_ms=HORIZON,
        now_ms=NOW,
    )


def outcomes(batch: BatchDecision) -> list[tuple[str, int, str | None]]:
    return [(d.record.command_id, d.version, d.reason) for d in batch.decisions]


def test_several_commands_for_one_key_see_each_others_events() -> None:
    batch = decide(
        [
            record("c1", "bank.OpenAccount", {"owner": "ada"}),
            record("c2", "bank.Deposit", {"amount_cents": 100}),
            record("c3", "bank.Withdraw", {"amount_cents": 150}),
            record("c4", "bank.Withdraw", {"amount_cents": 60}),
        ]
    )
    assert outcomes(batch) == [
        ("c1", 1, None),
        ("c2", 2, None),
        ("c3", 2, "insufficient funds: balance 100 cents, withdrawal 150 cents"),
        ("c4", 3, None),
    ]
    assert [d.events[0][0] for d in batch.decisions if d.accepted] == [
        "bank.AccountOpened",
        "bank.MoneyDeposited",
        "bank.MoneyWithdrawn",
    ]
    assert batch.before == {"acc-1": new_aggregate(ACCOUNTS, "acc-1")}
    assert batch.after["acc-1"] == {
        "version": 3,
        "state": {"status": "open", "owner": "ada", "balance_cents": 40},
    }
    assert batch.duplicates == 0


def test_keys_are_decided_apart_and_the_given_states_are_not_modified() -> None:
    states = {"acc-1": open_account(balance=500, version=4), "acc-2": open_account(version=1)}
    given = copy.deepcopy(states)
    batch = decide(
        [
            record("c1", "bank.Withdraw", {"amount_cents": 200}, key="acc-1"),
            record("c2", "bank.Withdraw", {"amount_cents": 200}, key="acc-2"),
            record("c3", "bank.Deposit", {"amount_cents": 5}, key="acc-3"),
        ],
        states,
    )
    assert outcomes(batch) == [
        ("c1", 5, None),
        ("c2", 1, "insufficient funds: balance 0 cents, withdrawal 200 cents"),
        ("c3", 0, "unknown account acc-3"),
    ]
    assert states == given
    assert batch.before == {**given, "acc-3": new_aggregate(ACCOUNTS, "acc-3")}
    assert batch.after["acc-1"]["state"]["balance_cents"] == 300
    assert batch.after["acc-2"] == given["acc-2"]


def test_a_stale_expected_version_is_a_conflict_with_the_current_version() -> None:
    states = {"acc-1": open_account(balance=100, version=3)}
    batch = decide(
        [
            record("c1", "bank.Deposit", {"amount_cents": 1}, expected_version=2),
            record("c2", "bank.Deposit", {"amount_cents": 1}, expected_version=3),
            # c2 moved the aggregate to version 4 within the batch: 3 is stale now.
            record("c3", "bank.Deposit", {"amount_cents": 1}, expected_version=3),
            record("c4", "bank.Deposit", {"amount_cents": 1}, expected_version=4),
        ],
        states,
    )
    conflict = "conflict: expected version {}, the aggregate is at version {}"
    assert outcomes(batch) == [
        ("c1", 3, conflict.format(2, 3)),
        ("c2", 4, None),
        ("c3", 4, conflict.format(3, 4)),
        ("c4", 5, None),
    ]
    assert [d.current_version for d in batch.decisions] == [3, None, 4, None]


def test_a_repeated_command_id_is_decided_once() -> None:
    states = {"acc-1": open_account(balance=100)}
    batch = decide(
        [
            record("same", "bank.Withdraw", {"amount_cents": 70}),
            record("same", "bank.Withdraw", {"amount_cents": 70}),  # a retry in the same batch
            record("old", "bank.Withdraw", {"amount_cents": 70}),  # decided in an earlier batch
            record("expired", "bank.Deposit", {"amount_cents": 1}),  # outside the window
        ],
        states,
        decided_at={"old": NOW - 1000, "expired": HORIZON - 1},
    )
    assert outcomes(batch) == [("same", 2, None), ("expired", 3, None)]
    assert batch.duplicates == 2
    assert batch.after["acc-1"]["state"]["balance_cents"] == 31


def test_an_id_first_claimed_by_another_command_is_a_conflict_and_not_decided() -> None:
    mine = record("shared", "bank.Deposit", {"amount_cents": 5})
    other = record("shared", "bank.Deposit", {"amount_cents": 6})  # same id, another body
    same = record("same", "bank.Deposit", {"amount_cents": 7})
    assert mine.command is not None and other.command is not None and same.command is not None
    claims = {"shared": other.command.fingerprint, "same": same.command.fingerprint}
    batch = decide([mine, same], {"acc-1": open_account()}, claims=claims)
    assert outcomes(batch) == [("same", 2, None)]
    assert batch.conflicts == 1 and batch.duplicates == 0
    assert batch.after["acc-1"]["state"]["balance_cents"] == 7


def test_malformed_and_misrouted_commands_are_rejected() -> None:
    malformed = CommandRecord(
        "bank.accounts.commands-3-9", None, "malformed command: not JSON", b"acc-9", "t", 3, 9
    )
    batch = decide(
        [
            malformed,
            record("c1", "bank.Deposit", {"amount_cents": 1}, record_key="acc-2"),
            record("c2", "bank.Deposit", {"amount_cents": "lots"}),
            record("c3", "bank.Teleport", {}),
        ],
        {"acc-1": open_account()},
    )
    reasons = [d.reason for d in batch.decisions]
    assert reasons[0] == "malformed command: not JSON"
    assert batch.decisions[0].record.key == "acc-9"
    assert reasons[1] == "the record key differs from the command's key"
    assert "amount_cents" in (reasons[2] or "") and "integer" in (reasons[2] or "")
    assert "no command type 'bank.Teleport'" in (reasons[3] or "")
    assert not any(d.events for d in batch.decisions)
    assert batch.after["acc-1"] == open_account()


def test_an_invalid_event_or_a_decider_bug_rejects_only_that_command() -> None:
    class Buggy(Accounts):
        def decide_Deposit(self, command: Command, state: Any) -> list[EventSpec]:
            if command.data["amount_cents"] == 13:
                raise ZeroDivisionError("unlucky")
            return super().decide_Deposit(command, state)

    def no_memos(_command: Command, type_name: str, data: Any) -> None:
        if data.get("memo") == "bad":
            raise EncodeError(f"{type_name}: memo refused")

    batch = decide(
        [
            record("c1", "bank.Deposit", {"amount_cents": 13}),
            record("c2", "bank.Deposit", {"amount_cents": 5, "memo": "bad"}),
            record("c3", "bank.Deposit", {"amount_cents": 5}),
        ],
        {"acc-1": open_account()},
        decider=Buggy(),
        check=no_memos,
    )
    assert outcomes(batch) == [
        ("c1", 1, "decider error: ZeroDivisionError: unlucky"),
        (
            "c2",
            1,
            "decider 'accounts' produced an invalid event: bank.MoneyDeposited: memo refused",
        ),
        ("c3", 2, None),
    ]


def test_a_decide_that_yields_its_events_emits_them_and_a_non_list_is_a_rejection() -> None:
    class Yielding(Accounts):
        def decide(self, command: Command, state: Any) -> Any:  # the README allows overriding
            if command.data["amount_cents"] == 1:
                return None
            return iter(super().decide(command, state))  # what a generator gives, too

    batch = decide(
        [
            record("c1", "bank.Deposit", {"amount_cents": 5}),
            record("c2", "bank.Deposit", {"amount_cents": 1}),
        ],
        {"acc-1": open_account()},
        decider=Yielding(),
    )
    assert outcomes(batch) == [
        ("c1", 2, None),
        ("c2", 2, "decider error: TypeError: 'NoneType' object is not iterable"),
    ]
    assert [type_name for type_name, _data in batch.decisions[0].events] == ["bank.MoneyDeposited"]
    assert batch.after["acc-1"]["state"]["balance_cents"] == 5


def test_a_key_without_an_initial_state_rejects_its_commands_and_others_are_decided() -> None:
    class Picky(Accounts):
        def initial(self, key: str) -> Any:
            if key == "bad-set":
                return {"seen": {1}}  # not storable
            if key.startswith("bad"):
                raise ValueError("keys are acc-*")
            return super().initial(key)

    batch = decide(
        [
            record("c1", "bank.OpenAccount", {"owner": "x"}, key="bad-1"),
            record("c2", "bank.OpenAccount", {"owner": "x"}, key="bad-set"),
            record("c3", "bank.OpenAccount", {"owner": "ada"}, key="acc-2"),
        ],
        decider=Picky(),
    )
    assert outcomes(batch) == [
        (
            "c1",
            0,
            "decider 'accounts' has no initial state for 'bad-1': ValueError: keys are acc-*",
        ),
        (
            "c2",
            0,
            "decider 'accounts' has no initial state for 'bad-set': "
            "TypeError: Type is not JSON serializable: set",
        ),
        ("c3", 1, None),
    ]
    assert set(batch.after) == {"acc-2"}


def test_decide_sees_a_copy_of_the_state() -> None:
    class Meddling(Accounts):
        def decide_Deposit(self, command: Command, state: Any) -> list[EventSpec]:
            state["balance_cents"] = 10**9  # must not leak into the batch's states
            return super().decide_Deposit(command, state)

    batch = decide(
        [record("c1", "bank.Deposit", {"amount_cents": 5})],
        {"acc-1": open_account()},
        decider=Meddling(),
    )
    assert batch.after["acc-1"]["state"]["balance_cents"] == 5


def test_events_folded_in_the_batch_carry_the_command_partition() -> None:
    seen: list[Event] = []

    class Watching(Accounts):
        def on_MoneyDeposited(self, state: Any, event: Event) -> Any:
            seen.append(event)
            return super().on_MoneyDeposited(state, event)

    decide(
        [record("c1", "bank.Deposit", {"amount_cents": 5})],
        {"acc-1": open_account()},
        decider=Watching(),
    )
    assert [(e.partition, e.offset, e.timestamp_ms) for e in seen] == [(3, -1, NOW)]


@pytest.mark.parametrize("amount", [0, -5])
def test_amounts_must_be_positive(amount: int) -> None:
    batch = decide(
        [record("c1", "bank.Deposit", {"amount_cents": amount})], {"acc-1": open_account()}
    )
    assert batch.decisions[0].reason == f"amount_cents must be positive, not {amount}"


class Unbounded(Accounts):
    """The bank's decider without its amount bound: only the processor's check is left."""

    name = "accounts"

    def decide_Deposit(self, command: Command, state: dict[str, Any]) -> list[EventSpec]:
        data = {"account_id": command.key, "amount_cents": command.data["amount_cents"]}
        return [("bank.MoneyDeposited", {**data, "memo": ""})]


def test_a_command_whose_state_could_not_be_stored_is_rejected_and_later_ones_decided() -> None:
    big = 2**63 - 1
    batch = decide(
        [
            record("c1", "bank.Deposit", {"amount_cents": 5}),
            record("c2", "bank.Deposit", {"amount_cents": big}),  # 2**63 + 4: still 64 bits
            record("c3", "bank.Deposit", {"amount_cents": big}),  # 2**64 + 3: beyond 64 bits
            record("c4", "bank.Deposit", {"amount_cents": 1}),
        ],
        {"acc-1": open_account()},
        decider=Unbounded(),
    )
    got = outcomes(batch)
    assert [(cid, reason is None) for cid, _v, reason in got] == [
        ("c1", True),
        ("c2", True),
        ("c3", False),
        ("c4", True),
    ]
    assert "could not be stored" in (got[2][2] or "") and got[2][1] == 3
    assert batch.after["acc-1"] == {
        "version": 4,
        "state": {"status": "open", "owner": "ada", "balance_cents": 2**63 + 5},
    }
    assert batch.before["acc-1"] == open_account()  # untouched


@pytest.mark.parametrize(
    "amount, reason",
    [(10**15 + 1, "at most"), (2**63 - 1, "at most"), (10**15, None)],
)
def test_the_bank_bounds_amounts(amount: int, reason: str | None) -> None:
    batch = decide(
        [record("c1", "bank.Deposit", {"amount_cents": amount})], {"acc-1": open_account()}
    )
    assert (batch.decisions[0].reason is None) == (reason is None)
    if reason:
        assert reason in (batch.decisions[0].reason or "")


def test_the_bank_bounds_balances() -> None:
    batch = decide(
        [record("c1", "bank.Deposit", {"amount_cents": 10})],
        {"acc-1": open_account(balance=10**15 - 9)},
    )
    assert "balance limit" in (batch.decisions[0].reason or "")
