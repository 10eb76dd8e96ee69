"""The bank's transfers saga over the command tests' vault decider, for the saga tests.

The saga's name comes from REFOLD_TEST_SAGA and the decider's from VAULT_NAME / VAULT_TOPIC, so
every test (and its worker subprocesses) gets fresh topics and groups. `TestStubborn` is a
transfer whose deposit always fails and whose refund goes to the closed account `closed-0`, so
its compensation is rejected every time. A transfer with `data.fickle` has a steps() that fails
in the saga runner; one with `data.unsendable_refund` a refund too large for a Kafka record;
one with `data.misdirected` a deposit to an aggregate the app has no decider for.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from refold.examples.bank import Transfers
from refold.sagas import Saga, Send, Step

from tests.integration.apps.vault import Vault

__all__ = ["TestStubborn", "TestTransfers", "Vault"]


class TestTransfers(Transfers):
    name = os.environ.get("REFOLD_TEST_SAGA", "transfers")
    aggregate = Vault.name
    step_timeout_s = float(os.environ.get("REFOLD_TEST_STEP_TIMEOUT_S", "60"))
    _calls: Counter[str] = Counter()

    def steps(self, saga_id: str, data: dict[str, Any]) -> list[Step]:
        # data.fickle: steps() raises from its third call for the saga id in this process on
        # (the start's check and the fold pass, the runner's decision fails): a user's bug
        if data.get("fickle"):
            self._calls[saga_id] += 1
            if self._calls[saga_id] > 2:
                raise RuntimeError(f"steps() of {saga_id} changed its mind")
        steps = list(super().steps(saga_id, data))
        if data.get("unsendable_refund"):  # a refund no record can carry: it is never decided
            refund = {"amount_cents": data["amount_cents"], "memo": "m" * 1_100_000}
            undo = Send(Vault.name, data["from"], "bank.Deposit", refund)
            steps[0] = Step(steps[0].name, steps[0].do, undo)
        if data.get("misdirected"):  # refused at the start: no decider takes it
            steps[1] = Step("deposit", Send("no-such-aggregate", data["to"], "bank.Deposit", {}))
        return steps


class TestStubborn(Saga):
    name = f"{TestTransfers.name}-stubborn"
    max_compensation_attempts = 2
    compensation_backoff_s = 0.2

    def steps(self, saga_id: str, data: dict[str, Any]) -> list[Step]:
        amount = {"amount_cents": data["amount_cents"]}
        return [
            Step(
                "withdraw",
                do=Send(Vault.name, data["from"], "bank.Withdraw", {**amount, "memo": saga_id}),
                undo=Send(Vault.name, "closed-0", "bank.Deposit", {**amount, "memo": saga_id}),
            ),
            Step("deposit", do=Send(Vault.name, "missing", "bank.Deposit", amount)),
        ]
