"""What the saga runner remembers per saga (`refold.engine.saga_runner`), without Kafka: the
commands it could not send (`Unsendable`: answered as rejected while their saga runs), the
commands it sent itself and the timed-out ones the processor claimed first (`CommandIds`). Each
stays bounded however many sagas a long-running worker sees."""

from __future__ import annotations

from refold.engine.saga_runner import MAX_SAGAS_REMEMBERED, CommandIds, Unsendable


def _cid(saga_id: str, step: str) -> str:
    return f"saga:transfers/{saga_id}/{step}"


def test_unsendable_commands_are_answered_until_their_saga_ends_then_forgotten() -> None:
    unsendable = Unsendable()
    unsendable.add("t-1", _cid("t-1", "withdraw/undo"), "cannot be sent: too large")
    unsendable.add("t-1", _cid("t-1", "withdraw/undo-2"), "cannot be sent: too large")
    unsendable.add("t-2", _cid("t-2", "deposit/do"), "cannot be sent: unknown aggregate")

    assert unsendable.get("t-1", _cid("t-1", "withdraw/undo-2")) == {
        "status": "rejected",
        "reason": "cannot be sent: too large",
    }
    assert unsendable.get("t-1", _cid("t-1", "deposit/do")) is None
    assert unsendable.get("t-9", _cid("t-9", "deposit/do")) is None
    unsendable.ended("t-1")  # the sweep saw it ended
    assert unsendable.get("t-1", _cid("t-1", "withdraw/undo")) is None
    assert len(unsendable) == 1
    unsendable.keep(lambda saga_id: saga_id != "t-2")  # its partition moved to another worker
    assert len(unsendable) == 0


def test_unsendable_stays_bounded_over_a_long_run_oldest_forgotten_first() -> None:
    """A worker that runs for months sees many such sagas; most end (and are forgotten), some
    are never seen to end here (the partition moved, the worker missed it): those must not
    pile up either. The dict it replaced kept every entry for the runner's life."""
    unsendable = Unsendable()
    most = 0
    for i in range(5 * MAX_SAGAS_REMEMBERED):
        saga_id = f"t-{i}"
        for step in ("withdraw/undo", "withdraw/undo-2", "withdraw/undo-3"):
            unsendable.add(saga_id, _cid(saga_id, step), "cannot be sent")
        if i % 3:  # two in three end while this runner drives them
            unsendable.ended(saga_id)
        most = max(most, len(unsendable))
    assert most == MAX_SAGAS_REMEMBERED >= len(unsendable)
    # The newest are remembered, the oldest forgotten (they are re-sent and found again).
    newest = f"t-{5 * MAX_SAGAS_REMEMBERED - 2}"  # one that did not end
    assert unsendable.get(newest, _cid(newest, "withdraw/undo-3")) is not None
    assert unsendable.get("t-0", _cid("t-0", "withdraw/undo")) is None

    small = Unsendable(limit=2)
    for saga_id in ("a", "b", "c"):
        small.add(saga_id, _cid(saga_id, "x/do"), "cannot be sent")
    small.add("c", _cid("c", "y/do"), "cannot be sent")  # more of a saga kept: no eviction
    assert [s for s in "abc" if small.get(s, _cid(s, "x/do"))] == ["b", "c"]
    assert small.get("c", _cid("c", "y/do")) is not None


def test_command_ids_are_remembered_until_their_saga_ends_or_moves_away() -> None:
    sent = CommandIds()
    sent.add("t-1", _cid("t-1", "withdraw/do"))
    sent.add("t-1", _cid("t-1", "deposit/do"))
    sent.add("x/y", _cid("x/y", "withdraw/do"))  # a saga id with "/" is no problem
    assert sent.has("t-1", _cid("t-1", "deposit/do"))
    assert sent.has("x/y", _cid("x/y", "withdraw/do"))
    assert not sent.has("t-1", _cid("t-1", "withdraw/undo"))
    assert not sent.has("t-2", _cid("t-1", "withdraw/do"))  # asked per saga
    sent.ended("t-1")
    assert not sent.has("t-1", _cid("t-1", "withdraw/do")) and len(sent) == 1
    sent.keep(lambda saga_id: saga_id != "x/y")
    assert len(sent) == 0 and sent.forgotten == 0  # forgotten counts only the limit's evictions


def test_the_commands_sent_and_claimed_stay_bounded_over_a_long_run() -> None:
    """The runner kept every command id it sent, and every one the processor claimed before a
    fence, in a set that shrank only when a partition moved: one to four entries per saga for
    the worker's life. Now they go with their saga's end, and past the limit the oldest first
    (a sent one is then re-sent once, a claimed one claimed again: work, not harm)."""
    sent, claimed = CommandIds(), CommandIds()
    most = 0
    n = 5 * MAX_SAGAS_REMEMBERED
    for i in range(n):
        saga_id = f"t-{i}"
        for step in ("withdraw/do", "deposit/do", "withdraw/undo"):
            sent.add(saga_id, _cid(saga_id, step))
        if i % 7 == 0:  # timed out after the processor had claimed it
            claimed.add(saga_id, _cid(saga_id, "deposit/do"))
        if i % 3:  # two in three seen ending by this runner
            sent.ended(saga_id)
            claimed.ended(saga_id)
        most = max(most, len(sent), len(claimed))
    assert most == MAX_SAGAS_REMEMBERED
    open_ = len(range(0, n, 3))  # the sagas not seen ending: each still kept, or forgotten
    assert sent.forgotten == open_ - len(sent) > 0, (sent.forgotten, len(sent))
    newest = f"t-{n - 2}"  # one that did not end
    assert sent.has(newest, _cid(newest, "withdraw/undo"))
    assert not sent.has("t-0", _cid("t-0", "withdraw/do"))
    assert len(claimed) <= MAX_SAGAS_REMEMBERED

    small = CommandIds(limit=2)
    for saga_id in ("a", "b", "c"):
        small.add(saga_id, _cid(saga_id, "x/do"))
    small.add("c", _cid("c", "y/do"))  # more of a saga kept: no eviction
    assert [s for s in "abc" if small.has(s, _cid(s, "x/do"))] == ["b", "c"]
    assert small.forgotten == 1
