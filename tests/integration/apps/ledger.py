"""A projection for the runtime tests: its topic and name come from the environment so each test
gets its own; it raises on an event folded twice or out of order, so a double-apply cannot hide.
"""

from __future__ import annotations

import os
from typing import Any

from refold import Event, Projection


class Ledger(Projection):
    name = os.environ.get("LEDGER_NAME", "ledger")
    topics = (os.environ.get("LEDGER_TOPIC", "ledger.events"),)
    version = 1

    def initial(self, key: str) -> dict[str, Any]:
        return {"balance_cents": 0, "events": 0, "last_offset": -1}

    def apply(self, state: dict[str, Any], event: Event) -> dict[str, Any]:
        if event.data.get("memo") == "boom":
            raise ValueError("memo says boom")
        if event.offset <= state["last_offset"]:
            raise AssertionError(f"offset {event.offset} folded after {state['last_offset']}")
        amount = event.data["amount_cents"]
        state["balance_cents"] += amount if event.type == "bank.MoneyDeposited" else -amount
        state["events"] += 1
        state["last_offset"] = event.offset
        return state
