"""What a command processor holds its batches to (refold.engine.command_limits): the event
topic's max.message.bytes when lower than the producer's, and which commands a refusal
rejects (the topic's limit is set here as the processor would have read it); batches decided
within the consumer's max.poll.interval.ms."""

from __future__ import annotations

from refold.core.config import Config
from refold.core.serde import MAX_EVENT_BYTES
from refold.engine.command_limits import RECORD_MARGIN, PollBudget, SizeLimits
from refold.engine.decisions import CommandRecord


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


def at(offset: int) -> CommandRecord:
    return CommandRecord(f"c-{offset}", None, "", b"k", "bank.accounts.commands", 0, offset)


def test_a_batch_past_the_poll_interval_rejects_its_slow_commands_else_halves() -> None:
    budget = PollBudget(Config(client_overrides={"max.poll.interval.ms": "6000"}), 500)
    assert budget.interval_ms == 6000 and not budget.overran(5.9) and budget.overran(6.0)
    # one decide of half the interval or more: rejected, the batch size stays
    refusals = budget.overrun(40, [(at(1), 0.1), (at(2), 3.2), (at(3), 0.1)])
    assert list(refusals) == [at(2).position] and budget.batch == 500
    assert refusals[at(2).position].startswith("decide took 3200 ms, longer than")
    assert "max.poll.interval.ms (6000 ms)" in refusals[at(2).position]
    # slow only together: half as many commands, down to one
    assert budget.overrun(40, [(at(i), 0.2) for i in range(40)]) == {} and budget.batch == 20
    budget.overrun(3, [(at(i), 2.5) for i in range(3)])
    assert budget.batch == 1
    budget.overrun(1, [(at(1), 1.0)])  # not the decide: a slow broker; tried again as it is
    assert budget.batch == 1
    # they grow back after full batches that take under a quarter of the interval
    budget.committed(1, 1.4)
    budget.committed(1, 1.6)
    assert budget.batch == 2
    budget.committed(1, 0.1)  # not full: says nothing of what a full one takes
    assert budget.batch == 2
    for _ in range(12):
        budget.committed(budget.batch, 0.1)
    assert budget.batch == 500
    assert PollBudget(Config(), 500).interval_ms == 300_000  # librdkafka's default
