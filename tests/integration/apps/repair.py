"""Projections for the replay tests. Version 1 of `Repair` has a bug: withdrawals from business
accounts (keys starting with "biz-") are counted as deposits. Version 2 fixes it. Which versions
exist is chosen by REPAIR_CODE_VERSIONS ("1", "1,2", or "2": v1's class gone), as a deploy
would change the code.

REPAIR_SLOW_S makes every fold of `Repair` take that long (a replay that is still running when
the test acts on it; set only in the environment of the process meant to be slow).

REPAIR_HOLD_FILE: while that file exists, every fold of `Repair` v2 waits (a version that
cannot catch up until the test lets it).

`Effects` stands for a processor with side effects: it counts the events it would act on
(`live_effects`) and those it must not act on again because the live version already did
(`event.replay`). With REPAIR_FX_TOPIC set it also acts: it produces one record per event it
acts on to that topic, keyed by the event's position (a notification sent), so a test can count
what was sent.
"""

from __future__ import annotations

import os
import time
from typing import Any

from confluent_kafka import Producer
from refold import Event, Projection

NAME = os.environ.get("REPAIR_NAME", "repair")
TOPIC = os.environ.get("REPAIR_TOPIC", "repair.events")
CODE_VERSIONS = {int(v) for v in os.environ.get("REPAIR_CODE_VERSIONS", "1").split(",")}
SLOW_S = float(os.environ.get("REPAIR_SLOW_S", "0"))
HOLD_FILE = os.environ.get("REPAIR_HOLD_FILE")
FX_TOPIC = os.environ.get("REPAIR_FX_TOPIC")
_sender: list[Producer] = []  # created on first use, in the process that folds


class RepairV1(Projection):
    name = NAME
    topics = (TOPIC,)
    version = 1

    def initial(self, key: str) -> dict[str, Any]:
        return {"balance_cents": 0, "events": 0}

    def apply(self, state: dict[str, Any], event: Event) -> dict[str, Any]:
        if SLOW_S:
            time.sleep(SLOW_S)
        amount = event.data["amount_cents"]
        if event.type == "bank.MoneyWithdrawn" and not self.counts_biz_withdrawals_as_deposits(
            event
        ):
            amount = -amount
        state["balance_cents"] += amount
        state["events"] += 1
        return state

    def counts_biz_withdrawals_as_deposits(self, event: Event) -> bool:
        return event.key.startswith("biz-")  # the bug


class EffectsV1(Projection):
    name = NAME + "-fx"
    topics = (TOPIC,)
    version = 1

    def initial(self, key: str) -> dict[str, Any]:
        return {"live_effects": 0, "replayed": 0}

    def apply(self, state: dict[str, Any], event: Event) -> dict[str, Any]:
        state["replayed" if event.replay else "live_effects"] += 1
        if FX_TOPIC and not event.replay:
            if not _sender:
                servers = os.environ["REFOLD_BOOTSTRAP_SERVERS"]
                _sender.append(Producer({"bootstrap.servers": servers}))
            where = f"{event.topic}:{event.partition}:{event.offset}"
            _sender[0].produce(FX_TOPIC, f"v{self.version}".encode(), where.encode())
            if _sender[0].flush(30):
                raise RuntimeError("notification not sent")
        return state


class RepairV2(RepairV1):
    version = 2

    def apply(self, state: dict[str, Any], event: Event) -> dict[str, Any]:
        while HOLD_FILE and os.path.exists(HOLD_FILE):
            time.sleep(0.05)
        return super().apply(state, event)

    def counts_biz_withdrawals_as_deposits(self, event: Event) -> bool:
        return False


class EffectsV2(EffectsV1):
    version = 2


# What the deployed code holds: the app contributes only these classes.
__all__ = [
    cls.__name__
    for cls in (RepairV1, EffectsV1, RepairV2, EffectsV2)
    if cls.version in CODE_VERSIONS
]
