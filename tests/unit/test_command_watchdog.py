"""The watched decide thread (refold.engine.command_watchdog), without Kafka."""

from __future__ import annotations

import threading
import time

import pytest
from refold.engine.command_watchdog import DecideHung, DecideThread
from refold.engine.decisions import CommandRecord, Progress

RECORD = CommandRecord("cmd-1", None, "", b"k", "t.commands", 2, 7)


def test_a_decision_that_returns_gives_its_value_and_an_error_is_raised_here() -> None:
    thread = DecideThread("decide-test", timeout_s=5)
    assert thread.run(lambda progress: 42) == 42
    with pytest.raises(ZeroDivisionError):
        thread.run(lambda progress: 1 / 0)
    thread.close()


def test_a_decision_past_the_timeout_is_given_up_naming_its_command_and_where_it_hangs() -> None:
    release = threading.Event()

    def stuck_in_decide(progress: Progress) -> int:
        for _ in range(3):  # the batch would go on with more commands if the call returned
            progress.current = (RECORD, time.monotonic())
            release.wait()
        return 1

    thread = DecideThread("decide-test", timeout_s=0.2)
    with pytest.raises(DecideHung) as hung:
        thread.run(stuck_in_decide)
    assert hung.value.record is RECORD
    assert hung.value.reason.startswith("decide did not return within 0.2 s")
    assert "stuck_in_decide" in hung.value.stack
    assert thread.is_alive()
    release.set()  # the call returns: the abandoned thread ends instead of taking more work
    thread._thread.join(5)
    assert not thread.is_alive()
