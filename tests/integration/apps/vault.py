"""A decider for the command tests: the bank's `accounts` rules over a topic of the test's own.

Name and event topic come from the environment, so every test (and its worker subprocesses) gets
fresh topics and groups. VAULT_DECIDE_DELAY_S makes every decision take that long, standing in
for a slow processor: commands queue behind it, so a saga step's timeout races them for sure.

A command's `memo` can ask for more, per command: `sleep:<seconds>` makes its decision take that
long (a slow decider), `pad:<n>` makes its event's memo n characters long (a big event from a
small command).
"""

from __future__ import annotations

import os
import time
from typing import Any

from refold.core.commands import Command, EventSpec
from refold.examples.bank.accounts import Accounts

DECIDE_DELAY_S = float(os.environ.get("VAULT_DECIDE_DELAY_S", "0"))


class Vault(Accounts):
    name = os.environ.get("VAULT_NAME", "vault")
    events_topic = os.environ.get("VAULT_TOPIC", "vault.accounts")

    def decide(self, command: Command, state: Any) -> list[EventSpec]:
        if DECIDE_DELAY_S:
            time.sleep(DECIDE_DELAY_S)
        memo = str(command.data.get("memo", ""))
        if memo.startswith("sleep:"):
            time.sleep(float(memo.removeprefix("sleep:")))
        events = super().decide(command, state)
        if memo.startswith("pad:"):
            size = int(memo.removeprefix("pad:"))
            events = [(t, {**data, "memo": "p" * size}) for t, data in events]
        return events
