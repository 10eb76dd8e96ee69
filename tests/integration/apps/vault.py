"""A decider for the command tests: the bank's `accounts` rules over a topic of the test's own.

Name and event topic come from the environment, so every test (and its worker subprocesses) gets
fresh topics and groups.
"""

from __future__ import annotations

import os

from refold.examples.bank.accounts import Accounts


class Vault(Accounts):
    name = os.environ.get("VAULT_NAME", "vault")
    events_topic = os.environ.get("VAULT_TOPIC", "vault.accounts")
