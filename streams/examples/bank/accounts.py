"""The `accounts` aggregate: open, deposit, withdraw (never below zero), close (only at zero).

Events go to `bank.accounts`, the topic the bundled projections fold, so a command's effect shows
in `balances`, `passbook` and `owners`. Uses only the public decider API.
"""

from __future__ import annotations

from typing import Any

from refold import Command, Decider, Event, EventSpec, Rejected

State = dict[str, Any]

#: The largest amount and balance the bank accepts, in cents (10 trillion in currency units).
#: Far above any real account and far below 2**63, so no sum of two accepted amounts overflows
#: the 64-bit integers that the Avro schemas and the stores hold.
MAX_CENTS = 10**15


class Accounts(Decider):
    """An account's state: `status` (new | open | closed), `owner`, `balance_cents`.

    Invariants: the balance never goes below zero nor above `MAX_CENTS`; a closed account takes
    no money; an account closes only at zero balance; every amount is positive and at most
    `MAX_CENTS`.
    """

    name = "accounts"
    events_topic = "bank.accounts"
    commands = {
        "bank.OpenAccount": {"owner": str},
        "bank.Deposit": {"amount_cents": int, "memo?": str},
        "bank.Withdraw": {"amount_cents": int, "memo?": str},
        "bank.CloseAccount": {},
    }

    def initial(self, key: str) -> State:
        return {"status": "new", "owner": None, "balance_cents": 0}

    # -- fold -------------------------------------------------------------------------------

    def on_AccountOpened(self, state: State, event: Event) -> State:
        state["status"] = "open"
        state["owner"] = event.data["owner"]
        return state

    def on_MoneyDeposited(self, state: State, event: Event) -> State:
        state["balance_cents"] += event.data["amount_cents"]
        return state

    def on_MoneyWithdrawn(self, state: State, event: Event) -> State:
        state["balance_cents"] -= event.data["amount_cents"]
        return state

    def on_AccountClosed(self, state: State, event: Event) -> State:
        state["status"] = "closed"
        return state

    # -- decisions --------------------------------------------------------------------------

    def decide_OpenAccount(self, command: Command, state: State) -> list[EventSpec]:
        if state["status"] != "new":
            raise Rejected(f"account {command.key} already exists ({state['status']})")
        owner = command.data["owner"].strip()
        if not owner:
            raise Rejected("owner must not be empty")
        return [("bank.AccountOpened", {"account_id": command.key, "owner": owner})]

    def decide_Deposit(self, command: Command, state: State) -> list[EventSpec]:
        amount = _amount(command)
        _must_be_open(command, state)
        if state["balance_cents"] + amount > MAX_CENTS:
            raise Rejected(
                f"balance limit: balance {state['balance_cents']} cents plus {amount} cents "
                f"would exceed {MAX_CENTS} cents"
            )
        return [
            (
                "bank.MoneyDeposited",
                {
                    "account_id": command.key,
                    "amount_cents": amount,
                    "memo": command.data.get("memo") or "",
                },
            )
        ]

    def decide_Withdraw(self, command: Command, state: State) -> list[EventSpec]:
        amount = _amount(command)
        _must_be_open(command, state)
        if amount > state["balance_cents"]:
            raise Rejected(
                f"insufficient funds: balance {state['balance_cents']} cents, "
                f"withdrawal {amount} cents"
            )
        return [
            (
                "bank.MoneyWithdrawn",
                {
                    "account_id": command.key,
                    "amount_cents": amount,
                    "memo": command.data.get("memo") or "",
                },
            )
        ]

    def decide_CloseAccount(self, command: Command, state: State) -> list[EventSpec]:
        _must_be_open(command, state)
        if state["balance_cents"] != 0:
            raise Rejected(
                f"account {command.key} has a balance of {state['balance_cents']} "
                "cents; only an empty account can be closed"
            )
        return [("bank.AccountClosed", {"account_id": command.key})]


def _amount(command: Command) -> int:
    amount = command.data["amount_cents"]
    if amount <= 0:
        raise Rejected(f"amount_cents must be positive, not {amount}")
    if amount > MAX_CENTS:
        raise Rejected(f"amount_cents must be at most {MAX_CENTS}, not {amount}")
    return int(amount)


def _must_be_open(command: Command, state: State) -> None:
    if state["status"] == "new":
        raise Rejected(f"unknown account {command.key}")
    if state["status"] == "closed":
        raise Rejected(f"account {command.key} is closed")
