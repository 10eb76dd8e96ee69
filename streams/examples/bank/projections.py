"""The bank passbook, refold's guiding example: balances are folds, never stored as truth."""

from __future__ import annotations

from typing import Any

from refold import Event, Projection

ACCOUNTS = "bank.accounts"


class Balances(Projection):
    """Balance and counts per account."""

    name = "balances"
    topics = (ACCOUNTS,)
    version = 1

    def initial(self, key: str) -> dict[str, Any]:
        return {"balance_cents": 0, "deposits": 0, "withdrawals": 0, "events": 0, "owner": None}

    def apply(self, state: dict[str, Any], event: Event) -> dict[str, Any]:
        t = event.type
        if t == "bank.MoneyDeposited":
            state["balance_cents"] += event.data["amount_cents"]
            state["deposits"] += 1
        elif t == "bank.MoneyWithdrawn":
            state["balance_cents"] -= event.data["amount_cents"]
            state["withdrawals"] += 1
        elif t == "bank.AccountOpened":
            state["owner"] = event.data["owner"]
        state["events"] += 1
        return state


class Passbook(Projection):
    """Per account, every entry in order with the balance after it (served in pages)."""

    name = "passbook"
    topics = (ACCOUNTS,)
    version = 1

    def initial(self, key: str) -> dict[str, Any]:
        return {"owner": None, "balance_cents": 0, "entries": []}

    def on_AccountOpened(self, state: dict[str, Any], event: Event) -> dict[str, Any]:
        state["owner"] = event.data["owner"]
        return state

    def on_MoneyDeposited(self, state: dict[str, Any], event: Event) -> dict[str, Any]:
        return self._entry(state, event, event.data["amount_cents"])

    def on_MoneyWithdrawn(self, state: dict[str, Any], event: Event) -> dict[str, Any]:
        return self._entry(state, event, -event.data["amount_cents"])

    @staticmethod
    def _entry(state: dict[str, Any], event: Event, amount: int) -> dict[str, Any]:
        state["balance_cents"] += amount
        state["entries"].append(
            {
                "time": event.time,
                "memo": event.data.get("memo", ""),
                "amount_cents": amount,
                "balance_cents": state["balance_cents"],
                "offset": event.offset,
            }
        )
        return state


class Owners(Projection):
    """Per owner: their accounts with balances, and the total.

    AccountOpened names the owner; later events of the account carry only the account id, so
    `key` returns None for them and the runtime routes them to the owner the account opened under.
    """

    name = "owners"
    topics = (ACCOUNTS,)
    version = 1

    def key(self, event: Event) -> str | None:
        if event.type == "bank.AccountOpened":
            return str(event.data["owner"])
        return None

    def initial(self, key: str) -> dict[str, Any]:
        return {"accounts": {}, "total_cents": 0}

    def apply(self, state: dict[str, Any], event: Event) -> dict[str, Any]:
        account = event.key
        if event.type == "bank.AccountOpened":
            state["accounts"].setdefault(account, 0)
            return state
        if event.type == "bank.MoneyDeposited":
            delta = event.data["amount_cents"]
        elif event.type == "bank.MoneyWithdrawn":
            delta = -event.data["amount_cents"]
        else:
            return state
        state["accounts"][account] = state["accounts"].get(account, 0) + delta
        state["total_cents"] += delta
        return state
