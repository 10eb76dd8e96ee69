"""The saga runner's memory of commands it could not send (`refold.engine.saga_runner.
Unsendable`), without Kafka: it answers them as rejected while their saga runs, and stays
bounded however many such sagas a long-running worker sees."""

from __future__ import annotations

from refold.engine.saga_runner import MAX_UNSENDABLE_SAGAS, Unsendable


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
    for i in range(5 * MAX_UNSENDABLE_SAGAS):
        saga_id = f"t-{i}"
        for step in ("withdraw/undo", "withdraw/undo-2", "withdraw/undo-3"):
            unsendable.add(saga_id, _cid(saga_id, step), "cannot be sent")
        if i % 3:  # two in three end while this runner drives them
            unsendable.ended(saga_id)
        most = max(most, len(unsendable))
    assert most == MAX_UNSENDABLE_SAGAS >= len(unsendable)
    # The newest are remembered, the oldest forgotten (they are re-sent and found again).
    newest = f"t-{5 * MAX_UNSENDABLE_SAGAS - 2}"  # one that did not end
    assert unsendable.get(newest, _cid(newest, "withdraw/undo-3")) is not None
    assert unsendable.get("t-0", _cid("t-0", "withdraw/undo")) is None

    small = Unsendable(limit=2)
    for saga_id in ("a", "b", "c"):
        small.add(saga_id, _cid(saga_id, "x/do"), "cannot be sent")
    small.add("c", _cid("c", "y/do"), "cannot be sent")  # more of a saga kept: no eviction
    assert [s for s in "abc" if small.get(s, _cid(s, "x/do"))] == ["b", "c"]
    assert small.get("c", _cid("c", "y/do")) is not None
