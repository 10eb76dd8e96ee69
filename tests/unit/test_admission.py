"""The admission rule of POST /commands (refold.http.admission), with no broker."""

from __future__ import annotations

import time

from refold.http import admission
from refold.http.admission import Backlog


def _close(backlog: Backlog, ids: list[str], now: float | None = None) -> None:
    for command_id in ids:
        backlog.closed(command_id, now)


def test_a_small_backlog_is_always_admitted_and_a_slow_one_refused() -> None:
    backlog = Backlog(max_queue_s=1.0, min_backlog=10)
    for i in range(9):
        backlog.opened(f"c{i}", lambda: None)
    assert backlog.refuse() is None  # below the floor: no rate needed
    backlog.opened("c9", lambda: None)
    assert backlog.refuse() == 1.0  # 10 open, nothing came back yet: no rate, wait a second
    _close(backlog, ["c0"])  # one result: a peak of 1/s, 9 open -> below the floor again
    assert len(backlog) == 9 and backlog.refuse() is None
    backlog.opened("c10", lambda: None)
    # 10 s of work at 1/s: refused, told to come back after at most MAX_RETRY_AFTER_S
    assert admission.MAX_RETRY_AFTER_S == 5.0
    assert len(backlog) == 10 and backlog.refuse() == 5.0
    assert backlog.refused == 2
    backlog.closed("c0")  # a repeat of a result changes nothing
    assert len(backlog) == 10


def test_the_bound_is_the_peak_drain_rate_not_the_admitted_rate() -> None:
    backlog = Backlog(max_queue_s=1.0, min_backlog=10)
    now = time.monotonic()
    for i in range(400):
        backlog.opened(f"c{i}", lambda: None)
    _close(backlog, [f"c{i}" for i in range(300)], now)  # 300 results within one second
    assert len(backlog) == 100 and backlog.refuse(now) is None  # 100 open: 1/3 s at 300/s
    for i in range(400, 600):
        backlog.opened(f"c{i}", lambda: None)
    assert len(backlog) == 300 and backlog.refuse(now) is None  # exactly 1 s of work
    backlog.opened("one-more", lambda: None)
    assert backlog.refuse(now) == 2.0  # just over a second: come back in 2
    # Seconds later only a trickle came back (what was admitted under overload, say): the
    # peak still says what this worker can decide, so the door stays as wide as it was.
    later = now + 3
    assert backlog.rate(later) == 300.0
    _close(backlog, ["c300", "c301"], later)
    assert backlog.refuse(later) is None  # 299 open at a peak of 300/s
    # A peak older than the window no longer counts.
    assert backlog.rate(later + admission.PEAK_WINDOW_S + 1) == 0.0


def test_a_command_not_appended_after_all_leaves_the_backlog_without_a_result() -> None:
    backlog = Backlog(max_queue_s=1.0, min_backlog=1)
    cancelled: list[str] = []
    backlog.opened("failed", lambda: cancelled.append("failed"))
    backlog.dropped("failed")
    assert len(backlog) == 0 and cancelled == ["failed"]  # its watch on the index ends
    assert backlog.rate(time.monotonic()) == 0.0  # and it is no result: the rate is unchanged
    backlog.dropped("failed")  # twice changes nothing


def test_entries_whose_result_never_came_are_forgotten() -> None:
    backlog = Backlog(max_queue_s=1.0, min_backlog=2)
    cancelled: list[str] = []
    backlog.opened("lost-1", lambda: cancelled.append("lost-1"))
    backlog.opened("lost-2", lambda: cancelled.append("lost-2"))
    assert backlog.refuse() == 1.0
    later = time.monotonic() + admission.FORGET_S + 1
    assert backlog.refuse(now=later) is None and len(backlog) == 0
    assert cancelled == ["lost-1", "lost-2"]  # their watches on the results index end too


def test_a_result_closes_its_entry_from_any_thread_even_at_once() -> None:
    import threading

    backlog = Backlog(max_queue_s=1.0, min_backlog=10)
    callbacks: dict[str, object] = {}

    def known_at_once(command_id: str, callback):  # the result was in the index already
        callback({"command_id": command_id})
        return lambda: None

    def later(command_id: str, callback):
        callbacks[command_id] = callback
        return lambda: callbacks.pop(command_id, None)

    backlog.watch("c0", known_at_once)
    assert len(backlog) == 0 and backlog.rate(time.monotonic()) == 1.0  # not left open
    backlog.watch("c1", later)
    assert len(backlog) == 1
    thread = threading.Thread(target=callbacks["c1"], args=({"command_id": "c1"},))
    thread.start()
    thread.join()
    assert len(backlog) == 0  # closed, and counted (1 or 2 per second: a second may turn)
    assert backlog.rate(time.monotonic()) >= 1.0


def test_a_loop_that_keeps_running_late_refuses_commands_and_a_lone_pause_does_not() -> None:
    import asyncio

    async def scenario() -> tuple[float, float, float]:
        loop = asyncio.get_running_loop()
        lag = admission.LoopLag().start(loop)
        await asyncio.sleep(0.1)
        idle = lag.lag_s
        time.sleep(0.06)  # one pause of 60 ms: a collection, a long batch
        await asyncio.sleep(0.02)
        after_pause = lag.lag_s
        await asyncio.sleep(0.2)
        recovered = lag.lag_s
        return idle, after_pause, recovered

    idle, after_pause, recovered = asyncio.run(scenario())
    assert idle < 0.02  # ticks on time (a loaded machine may add a few ms)
    # a fifth of the 60 ms (the pause may straddle two ticks): below the 40 ms bound
    assert 0.003 < after_pause < admission.MAX_LAG_S
    assert recovered < 0.02

    async def busy() -> tuple[float | None, float | None, float | None, int]:
        loop = asyncio.get_running_loop()
        lag = admission.LoopLag().start(loop)
        backlog = Backlog(max_queue_s=1.0, min_backlog=10_000, lag=lag)
        for i in range(admission.LAG_MIN_BACKLOG):
            backlog.opened(f"c{i}", lambda: None)
        for _ in range(25):  # 25 callbacks of 50 ms each: the loop is behind all along
            time.sleep(0.05)
            await asyncio.sleep(0)
        late = backlog.refuse()
        few = Backlog(max_queue_s=1.0, min_backlog=10_000, lag=lag)  # late, but little in flight
        for i in range(admission.LAG_MIN_BACKLOG - 1):
            few.opened(f"c{i}", lambda: None)
        too_few = few.refuse()
        await asyncio.sleep(0.3)  # it catches up: admitted again
        return late, too_few, backlog.refuse(), backlog.refused_late

    late, too_few, caught_up, refused_late = asyncio.run(busy())
    assert late == 1.0 and refused_late == 1
    assert too_few is None
    assert caught_up is None
