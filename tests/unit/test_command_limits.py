"""The record sizes a command processor holds its events to (refold.engine.command_limits):
the event topic's max.message.bytes when lower than the producer's, and which commands a
refusal rejects. The topic's limit is set here as the processor would have read it."""

from __future__ import annotations

from refold.core.config import Config
from refold.core.serde import MAX_EVENT_BYTES
from refold.engine.command_limits import RECORD_MARGIN, SizeLimits


def limits(topic_max: int | None, **overrides: str) -> SizeLimits:
    out = SizeLimits(Config(client_overrides=overrides), "bank.accounts")
    out.topic_max = topic_max
    return out


def test_a_topic_that_takes_less_than_the_producer_bounds_events_and_batches() -> None:
    assert limits(None).allowed == MAX_EVENT_BYTES and limits(None).batch_bytes() is None
    default = limits(1_048_588)  # Kafka's default: the producer's own limits hold
    assert default.allowed == MAX_EVENT_BYTES and default.batch_bytes() is None
    small = limits(20_000)
    assert small.allowed == small.batch_bytes() == 20_000 - RECORD_MARGIN
    assert small.too_large("bank.MoneyDeposited", small.allowed) is None
    reason = small.too_large("bank.MoneyDeposited", 30_000)
    assert reason == (
        "bank.MoneyDeposited is 30000 bytes as a record (key, value and headers); "
        "topic 'bank.accounts' takes at most 19488 (max.message.bytes=20000)"
    )
    assert limits(20_000, **{"batch.size": "4096"}).batch_bytes() is None  # smaller already


def test_a_refusal_rejects_the_commands_over_the_limit_else_the_largest() -> None:
    small = limits(20_000)
    refused = {("c", 0, 1): ("bank.MoneyDeposited", 300), ("c", 0, 2): ("bank.X", 30_000)}
    assert list(small.refusals(refused)) == [("c", 0, 2)]  # the 300-byte one was collateral
    unknown = limits(None)  # no limit known: one command per refusal, the largest
    assert list(unknown.refusals(refused)) == [("c", 0, 2)]
    assert "max.message.bytes=unknown" in unknown.refusals(refused)[("c", 0, 2)]
