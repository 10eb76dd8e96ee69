"""The bank's transfers saga over the command tests' vault decider, for the saga tests.

The saga's name comes from REFOLD_TEST_SAGA and the decider's from VAULT_NAME / VAULT_TOPIC, so
every test (and its worker subprocesses) gets fresh topics and groups.
"""

from __future__ import annotations

import os

from refold.examples.bank import Transfers

from tests.integration.apps.vault import Vault

__all__ = ["TestTransfers", "Vault"]


class TestTransfers(Transfers):
    name = os.environ.get("REFOLD_TEST_SAGA", "transfers")
    aggregate = Vault.name
    step_timeout_s = float(os.environ.get("REFOLD_TEST_STEP_TIMEOUT_S", "60"))
