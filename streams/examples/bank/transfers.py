"""The `transfers` saga: money from one account to another, or back where it came from.

Step 1 withdraws from `from`; step 2 deposits to `to`. When the deposit is rejected (an unknown
or closed account) the withdrawal is compensated by a deposit back to `from` with the memo
`refund <saga id>`; the saga ends `compensated`. When the withdrawal itself is rejected
(insufficient funds, unknown account) nothing was done: the saga ends `failed`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from refold.sagas import Saga, Send, Step


class Transfers(Saga):
    name = "transfers"
    fields = {"from": str, "to": str, "amount_cents": int}
    aggregate: ClassVar[str] = "accounts"  # the decider the money moves through

    def steps(self, saga_id: str, data: dict[str, Any]) -> list[Step]:
        amount = data["amount_cents"]
        return [
            Step(
                "withdraw",
                do=Send(
                    self.aggregate,
                    data["from"],
                    "bank.Withdraw",
                    {"amount_cents": amount, "memo": f"transfer {saga_id} to {data['to']}"},
                ),
                undo=Send(
                    self.aggregate,
                    data["from"],
                    "bank.Deposit",
                    {"amount_cents": amount, "memo": f"refund {saga_id}"},
                ),
            ),
            Step(
                "deposit",
                do=Send(
                    self.aggregate,
                    data["to"],
                    "bank.Deposit",
                    {"amount_cents": amount, "memo": f"transfer {saga_id} from {data['from']}"},
                ),
            ),
        ]
