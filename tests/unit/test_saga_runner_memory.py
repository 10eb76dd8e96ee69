"""What the saga runner remembers per saga (`refold.engine.saga_runner`), without Kafka: the
commands it could not send (`Unsendable`: answered as rejected while their saga runs), the
commands it sent itself and the timed-out ones the processor claimed first (`CommandIds`).
Each holds the sagas the runner drives and nothing else: a sweep keeps only the open sagas of
its partitions (`keep`), so the memory follows what the store holds open, with no fixed limit
whose evictions would be re-sent (tests/integration/test_saga_resends.py)."""

from __future__ import annotations

from refold.engine.saga_runner import CommandIds, Unsendable


def _cid(saga_id: str, step: str) -> str:
    return f"saga:transfers/{saga_id}/{step}"


def test_unsendable_commands_are_answered_until_their_saga_is_no_longer_driven() -> None:
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
    unsendable.keep(lambda saga_id: saga_id != "t-1")  # a sweep saw it ended
    assert unsendable.get("t-1", _cid("t-1", "withdraw/undo")) is None
    assert len(unsendable) == 1
    unsendable.keep(lambda saga_id: saga_id != "t-2")  # its partition moved to another worker
    assert len(unsendable) == 0


def test_command_ids_are_remembered_while_their_saga_is_driven_however_many() -> None:
    """A fixed limit of 10,000 sagas forgot the oldest while they still waited: with more
    waiting than that, every sweep re-sent the forgotten ones. Now every saga still driven
    is kept, and only those."""
    sent = CommandIds()
    n = 25_000
    for i in range(n):
        saga_id = f"t-{i}"
        for step in ("withdraw/do", "deposit/do"):
            sent.add(saga_id, _cid(saga_id, step))
    sent.add("x/y", _cid("x/y", "withdraw/do"))  # a saga id with "/" is no problem
    assert len(sent) == n + 1
    assert sent.has("t-0", _cid("t-0", "withdraw/do")) and sent.has(
        "x/y", _cid("x/y", "withdraw/do")
    )
    assert not sent.has("t-1", _cid("t-1", "withdraw/undo"))
    assert not sent.has("t-2", _cid("t-1", "withdraw/do"))  # asked per saga
    driven = {f"t-{i}" for i in range(0, n, 3)}  # the others ended or moved away
    sent.keep(driven.__contains__)
    assert len(sent) == len(driven)
    assert sent.has("t-3", _cid("t-3", "deposit/do")) and not sent.has(
        "t-1", _cid("t-1", "deposit/do")
    )
