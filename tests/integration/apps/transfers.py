"""The bank's transfers saga over the command tests' vault decider, for the saga tests.

The saga's name comes from REFOLD_TEST_SAGA and the decider's from VAULT_NAME / VAULT_TOPIC, so
every test (and its worker subprocesses) gets fresh topics and groups. `TestStubborn` is a
transfer whose deposit always fails and whose refund goes to the closed account `closed-0`, so
its compensation is rejected every time.
"""

from __future__ import annotations

import os
from typing import Any

from refold.examples.bank import Transfers
from refold.sagas import Saga, Send, Step

from tests.integration.apps.vault import Vault

__all__ = ["TestStubborn", "TestTransfers", "Vault"]


class TestTransfers(Transfers):
    name = os.environ.get("REFOLD_TEST_SAGA", "transfers")
    aggregate = Vault.name
    step_timeout_s = float(os.environ.get("REFOLD_TEST_STEP_TIMEOUT_S", "60"))


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
