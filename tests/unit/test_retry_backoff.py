"""The backoff of steps that keep failing (`refold.engine.transactions.Backoff`), without Kafka:
its schedule, its reset on success, which failures it logs; and the routing stage's retries
(`Repartitioner._retrying`) following it up to 30 s (the command processor's stay within 5 s:
tests/unit/test_command_retries.py)."""

from __future__ import annotations

import logging
import threading

import pytest
from confluent_kafka import KafkaError, KafkaException
from refold.engine.repartition import Repartitioner, RepartitionStats
from refold.engine.transactions import RETRY_LOG_EVERY, Backoff, failure_kind

from tests.unit.recorded import RecordedStop


def test_the_pauses_double_from_half_a_second_to_the_cap_and_start_over_after_a_success() -> None:
    backoff = Backoff(first=0.5, cap=30.0)
    pauses = [backoff.failed("X")[0] for _ in range(9)]
    assert pauses == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert backoff.succeeded() == 9
    assert [backoff.failed("X")[0] for _ in range(3)] == [0.5, 1.0, 2.0]
    many = Backoff(first=0.5, cap=30.0)
    assert [many.failed("X")[0] for _ in range(5000)][-1] == 30.0  # no overflow, ever


def test_each_kind_of_failure_is_logged_once_then_every_nth() -> None:
    backoff = Backoff()
    kinds = ["_STATE", "MSG_SIZE_TOO_LARGE"] * 30  # one error, surfacing as two codes in turn
    logged = [n + 1 for n, kind in enumerate(kinds) if backoff.failed(kind)[1]]
    assert logged == [1, 2, RETRY_LOG_EVERY, 2 * RETRY_LOG_EVERY, 3 * RETRY_LOG_EVERY]
    backoff.succeeded()
    assert backoff.failed("_STATE")[1]  # a new run of failures: said again


def test_a_failure_s_kind_is_its_kafka_error_code_not_its_text() -> None:
    one = KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "base seq 1"))
    two = KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "base seq 2"))
    assert failure_kind(one) == failure_kind(two) == "MSG_SIZE_TOO_LARGE"
    assert failure_kind(TimeoutError("late")) == "TimeoutError"


class StandIn(Repartitioner):
    """The routing stage's retry policy over only the fields it uses (no broker)."""

    def __init__(self, stop: threading.Event) -> None:
        self.name = "owners.v1.repartition"
        self.stats = RepartitionStats()
        self._stop = stop


def test_the_routing_stage_retries_back_off_to_30s_logging_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stop = RecordedStop()
    stage = StandIn(stop)
    calls = {"n": 0}

    def step() -> None:
        calls["n"] += 1
        if calls["n"] <= 10:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, f"broker down ({calls['n']})"))

    with caplog.at_level(logging.INFO, logger="refold.engine.transactions"):
        stage._retrying("the rewind", step)
    assert calls["n"] == 11 and stage.stats.retries == 10
    assert stop.pauses == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("owners.v1.repartition: the rewind failed 1 time(s)")
    assert any("succeeded after 10 retries" in r.getMessage() for r in caplog.records)
