"""The command processor's retry policy for steps that fail while a broker recovers: backing off
from 0.5 s to 5 s, counted, logged once per kind of error (then every 20th), not once per retry.
The policy runs on a stand-in for the processor's own fields; the pauses are recorded, not
slept."""

from __future__ import annotations

import logging
import threading

import pytest
from confluent_kafka import KafkaError, KafkaException
from refold.engine.command_processor import CommandProcessor, ProcessorStats

from tests.unit.recorded import RecordedStop


class Reader:
    def close(self) -> None:
        pass


class StandIn(CommandProcessor):
    """The processor's retry policy over only the fields it uses (no broker, no store)."""

    def __init__(self, stop: threading.Event) -> None:
        self.name = "accounts"
        self.stats = ProcessorStats()
        self._stop = stop
        self._reader = Reader()  # type: ignore[assignment]
        self.renewed_readers = 0

    def _new_reader(self) -> Reader:  # type: ignore[override]
        self.renewed_readers += 1
        return Reader()


def test_a_failing_step_backs_off_is_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stop = RecordedStop()
    processor = StandIn(stop)
    calls = {"n": 0}

    def step() -> None:
        calls["n"] += 1
        if calls["n"] <= 12:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "broker down"))

    with caplog.at_level(logging.INFO, logger="refold.engine.transactions"):
        processor._retrying("the catch-up", step)
    assert calls["n"] == 13 and processor.stats.retries == 12
    assert processor.renewed_readers == 12  # a failover may leave a reader's metadata stale
    assert stop.pauses == [0.5, 1.0, 2.0, 4.0] + [5.0] * 8
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "broker down" in warnings[0].getMessage()
    assert any("after 12 retries" in r.getMessage() for r in caplog.records)
    assert warnings[0].getMessage().startswith("commands accounts: the catch-up failed 1 time(s)")
    from refold.engine.status import metrics_text

    text = metrics_text([], None, {}, {"accounts": processor})  # type: ignore[arg-type]
    assert 'refold_command_retries_total{aggregate="accounts"} 12' in text.splitlines()
