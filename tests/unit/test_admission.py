"""The admission rule of POST /commands (refold.http.admission), with no broker."""

from __future__ import annotations

import time

from refold.http import admission
from refold.http.admission import Backlog


def test_a_small_backlog_is_always_admitted_and_a_slow_one_refused() -> None:
    backlog = Backlog(max_queue_s=1.0, min_backlog=10)
    cancelled: list[str] = []
    for i in range(9):
        backlog.opened(f"c{i}", lambda i=i: cancelled.append(f"c{i}"))
    assert backlog.refuse() is None  # below the floor: no rate needed
    backlog.opened("c9", lambda: None)
    assert backlog.refuse() == 1.0  # 10 open, nothing came back yet: no rate, wait a second
    for i in range(3):  # 3 results in the 3 s window: 1/s, 7 open -> 7 s of work
        backlog.closed(f"c{i}")
    assert len(backlog) == 7 and backlog.refuse() is None  # below the floor again
    backlog.opened("c10", lambda: None)
    backlog.opened("c11", lambda: None)
    backlog.opened("c12", lambda: None)
    # 10 s of work at 1/s: refused, told to come back after at most MAX_RETRY_AFTER_S
    assert admission.MAX_RETRY_AFTER_S == 5.0
    assert len(backlog) == 10 and backlog.refuse() == 5.0
    assert backlog.refused == 2
    backlog.closed("c0")  # a repeat of a result changes nothing
    assert len(backlog) == 10


def test_a_fast_drain_admits_a_large_backlog() -> None:
    backlog = Backlog(max_queue_s=1.0, min_backlog=10)
    for i in range(400):
        backlog.opened(f"c{i}", lambda: None)
    for i in range(300):  # 100 results a second over the window
        backlog.closed(f"c{i}")
    assert len(backlog) == 100 and backlog.refuse() is None  # 1 s of work at 100/s
    backlog.opened("one-more", lambda: None)
    assert backlog.refuse() == 2.0  # 101 at 100/s: just over a second
    for i in range(101, 400):  # 400 open at 100/s: 4 s of work -> come back in 4 s
        backlog.opened(f"more-{i}", lambda: None)
    assert backlog.refuse() == 4.0


def test_entries_whose_result_never_came_are_forgotten() -> None:
    backlog = Backlog(max_queue_s=1.0, min_backlog=2)
    cancelled: list[str] = []
    backlog.opened("lost-1", lambda: cancelled.append("lost-1"))
    backlog.opened("lost-2", lambda: cancelled.append("lost-2"))
    assert backlog.refuse() == 1.0
    later = time.monotonic() + admission.FORGET_S + 1
    assert backlog.refuse(now=later) is None and len(backlog) == 0
    assert cancelled == ["lost-1", "lost-2"]  # their watches on the results index end too
