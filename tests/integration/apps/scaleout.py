"""The bank's `balances` and re-keyed `owners` on a topic and under names of the test's own
(`SCALEOUT_TOPIC`, `SCALEOUT_PREFIX`), for the scale-out tests: same folds, another topic."""

from __future__ import annotations

import os

from refold.examples.bank.projections import Balances, Owners

PREFIX = os.environ.get("SCALEOUT_PREFIX", "scaleout")
TOPIC = os.environ.get("SCALEOUT_TOPIC", "scaleout.accounts")


class ScaleBalances(Balances):
    name = f"{PREFIX}-balances"
    topics = (TOPIC,)


class ScaleOwners(Owners):
    name = f"{PREFIX}-owners"
    topics = (TOPIC,)


__all__ = ["ScaleBalances", "ScaleOwners"]
