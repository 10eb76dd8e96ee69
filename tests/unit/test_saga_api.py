"""The saga API without Kafka: the fold of saga events and the pure decision `advance`, driven
against the bank's own decider (decided in memory) as the command processor would."""

from __future__ import annotations

import re
from typing import Any

import pytest
from refold import Command, Rejected
from refold.core.errors import InputError, SagaError, SagaStepsError
from refold.core.saga_decision import steps_failed
from refold.core.sagas import (
    Start,
    apply_event,
    command_id,
    initial_state,
    public_state,
    saga_projection,
    start_from_json,
)
from refold.examples.bank import Accounts, Transfers
from refold.sagas import Saga, Send, Step, advance

T0 = 1_700_000_000_000


class Bank:
    """The accounts decider decided in memory, with the command processor's idempotency: a
    command id seen before answers its first result and applies nothing."""

    def __init__(self, balances: dict[str, int], closed: tuple[str, ...] = ()) -> None:
        self.decider = Accounts()
        self.states = {
            k: {"status": "closed" if k in closed else "open", "owner": k, "balance_cents": v}
            for k, v in balances.items()
        }
        self.results: dict[str, dict[str, Any]] = {}
        self.applied: list[tuple[str, str, int, str]] = []
        self.hold: set[str] = set()  # command ids left undecided (a slow or lost command)

    def send(self, cid: str, send: Send) -> None:
        if cid in self.results or cid in self.hold:
            return
        state = self.states.get(send.key, self.decider.initial(send.key))
        command = Command(cid, send.aggregate, send.key, send.type, dict(send.data))
        try:
            events = self.decider.decide(command, state)
        except Rejected as exc:
            self.results[cid] = {"command_id": cid, "status": "rejected", "reason": exc.reason}
            return
        for type_name, data in events:
            sign = -1 if type_name == "bank.MoneyWithdrawn" else 1
            state["balance_cents"] += sign * data["amount_cents"]
            self.applied.append((send.key, type_name, data["amount_cents"], data["memo"]))
        self.states[send.key] = state
        self.results[cid] = {"command_id": cid, "status": "accepted"}


def run(
    saga: Saga, bank: Bank, saga_id: str, data: dict[str, Any], *, ticks: int = 50, step_ms=100
) -> dict[str, Any]:
    state = initial_state(saga_id)
    apply_event(saga, state, {"saga_id": saga_id, "kind": "started", "data": _json(data)})
    now = T0
    for _ in range(ticks):
        now += step_ms
        nxt = advance(saga, state, bank.results.get, now)
        for event in nxt.events:
            apply_event(saga, state, event)
        for out in (*nxt.commands, *nxt.waiting):  # re-sending is harmless: same ids
            bank.send(out.command_id, out.send)
        if state["status"] in ("completed", "compensated", "failed"):
            break
    return state


def _json(data: dict[str, Any]) -> str:
    import json

    return json.dumps(data)


def test_a_transfer_completes() -> None:
    bank = Bank({"a": 1000, "b": 0})
    state = run(Transfers(), bank, "t1", {"from": "a", "to": "b", "amount_cents": 300})
    assert state["status"] == "completed"
    assert bank.states["a"]["balance_cents"] == 700
    assert bank.states["b"]["balance_cents"] == 300
    view = public_state(state, "transfers")
    assert [s["status"] for s in view["steps"]] == ["accepted", "accepted"]
    assert view["steps"][0]["command_id"] == "saga:transfers/t1/withdraw/do"


def test_a_transfer_to_an_unknown_account_is_compensated_once() -> None:
    bank = Bank({"a": 1000})
    state = run(Transfers(), bank, "t2", {"from": "a", "to": "nobody", "amount_cents": 300})
    assert state["status"] == "compensated"
    assert bank.states["a"]["balance_cents"] == 1000
    memos = [memo for key, _t, _a, memo in bank.applied if key == "a"]
    assert memos == ["transfer t2 to nobody", "refund t2"]
    assert "unknown account nobody" in state["reason"]
    assert [s["status"] for s in state["steps"]] == ["compensated", "rejected"]


def test_a_transfer_to_a_closed_account_is_compensated() -> None:
    bank = Bank({"a": 1000, "c": 0}, closed=("c",))
    state = run(Transfers(), bank, "t3", {"from": "a", "to": "c", "amount_cents": 1})
    assert state["status"] == "compensated"
    assert bank.states["a"]["balance_cents"] == 1000


def test_insufficient_funds_fails_with_nothing_to_undo() -> None:
    bank = Bank({"a": 100, "b": 0})
    state = run(Transfers(), bank, "t4", {"from": "a", "to": "b", "amount_cents": 300})
    assert state["status"] == "failed"
    assert "insufficient funds" in state["reason"]
    assert bank.applied == []


def test_a_step_with_no_result_times_out_and_the_saga_compensates() -> None:
    bank = Bank({"a": 1000, "b": 0})
    bank.hold.add("saga:transfers/t5/deposit/do")
    state = run(
        Transfers(), bank, "t5", {"from": "a", "to": "b", "amount_cents": 5}, step_ms=10_000
    )
    assert state["status"] == "compensated"
    assert state["steps"][1]["status"] == "timed_out"
    assert bank.states["a"]["balance_cents"] == 1000


def test_a_timed_out_step_applied_late_without_undo_fails_for_a_person() -> None:
    saga, bank = Transfers(), Bank({"a": 1000, "b": 0})
    dep = "saga:transfers/t6/deposit/do"
    bank.hold.add(dep)
    state = initial_state("t6")
    apply_event(
        saga, state, {"kind": "started", "data": _json({"from": "a", "to": "b", "amount_cents": 5})}
    )
    now = T0
    for _ in range(4):  # withdraw sent + accepted, deposit sent
        now += 1
        nxt = advance(saga, state, bank.results.get, now)
        for e in nxt.events:
            apply_event(saga, state, e)
        for out in nxt.commands:
            bank.send(out.command_id, out.send)
    nxt = advance(saga, state, bank.results.get, now + 61_000)
    assert [e["kind"] for e in nxt.events] == ["step_timed_out"]
    apply_event(saga, state, nxt.events[0])
    bank.results[dep] = {"command_id": dep, "status": "accepted"}  # decided after all
    nxt = advance(saga, state, bank.results.get, now + 62_000)
    assert [e["kind"] for e in nxt.events] == ["step_accepted"]
    apply_event(saga, state, nxt.events[0])
    nxt = advance(saga, state, bank.results.get, now + 63_000)
    assert nxt.events[0]["status"] == "failed" and nxt.dead


class Stubborn(Saga):
    """A compensation the aggregate keeps rejecting (its account was closed meanwhile)."""

    name = "stubborn"
    max_compensation_attempts = 3
    compensation_backoff_s = 1.0

    def steps(self, saga_id: str, data: dict[str, Any]) -> list[Step]:
        return [
            Step(
                "take",
                Send("accounts", "a", "bank.Withdraw", {"amount_cents": 10}),
                undo=Send("accounts", "gone", "bank.Deposit", {"amount_cents": 10}),
            ),
            Step("give", Send("accounts", "nobody", "bank.Deposit", {"amount_cents": 10})),
        ]


def test_a_rejected_compensation_is_retried_with_backoff_then_fails() -> None:
    bank = Bank({"a": 100})
    state = run(Stubborn(), bank, "s1", {}, ticks=200, step_ms=500)
    assert state["status"] == "failed"
    assert "rejected 3 time(s)" in state["reason"]
    ids = [c for c in bank.results if "/take/undo" in c]
    assert ids == [
        "saga:stubborn/s1/take/undo",
        "saga:stubborn/s1/take/undo-2",
        "saga:stubborn/s1/take/undo-3",
    ]


def test_the_backoff_waits_before_the_next_attempt() -> None:
    saga = Stubborn()
    state = initial_state("s2")
    apply_event(saga, state, {"kind": "started", "data": "{}"})
    state["status"] = "compensating"
    state["steps"][0].update(
        status="compensation_rejected", undo_attempts=1, undo_ms=T0, reason="no"
    )
    assert advance(saga, state, {}.get, T0 + 999) == type(advance(saga, state, {}.get, 0))()
    nxt = advance(saga, state, {}.get, T0 + 1000)
    assert nxt.commands[0].command_id == command_id(saga, "s2", "take", 2)


def test_the_fold_ignores_events_after_the_end_and_a_second_start() -> None:
    saga, state = Transfers(), initial_state("t7")
    start = {"kind": "started", "data": _json({"from": "a", "to": "b", "amount_cents": 1})}
    apply_event(saga, state, start)
    apply_event(saga, state, start)
    apply_event(saga, state, {"kind": "finished", "status": "completed"})
    apply_event(saga, state, {"kind": "step_rejected", "step": 0, "reason": "late"})
    assert state["status"] == "completed" and state["duplicates"] == 2
    assert advance(saga, state, {}.get, T0).events == ()


def test_the_projection_folds_events() -> None:
    from refold.core.serde import Event

    projection = saga_projection(Transfers())
    assert projection.name == "sagas.transfers" and projection.topics == ("transfers.saga",)
    event = Event(
        type="refold.sagas.SagaEvent",
        key="t8",
        data={"kind": "started", "data": _json({"from": "a", "to": "b", "amount_cents": 1})},
        topic="transfers.saga",
        partition=0,
        offset=0,
    )
    state = projection.apply(projection.initial("t8"), event)
    assert state["status"] == "running" and len(state["steps"]) == 2


def test_starts_are_checked() -> None:
    saga = Transfers()
    ok = start_from_json(
        saga, {"saga_id": "x", "data": {"from": "a", "to": "b", "amount_cents": 5}}
    )
    assert ok.saga_id == "x"
    assert start_from_json(saga, {"data": {"from": "a", "to": "b", "amount_cents": 5}}).saga_id
    for bad in (
        [],
        {"data": []},
        {"data": {"from": "a", "to": "b"}},
        {"data": {"from": "a", "to": "b", "amount_cents": "5"}},
        {"data": {"from": "a", "to": "b", "amount_cents": True}},
        {"saga_id": "", "data": {"from": "a", "to": "b", "amount_cents": 5}},
        {"data": {"from": "a", "to": "b", "amount_cents": 5}, "extra": 1},
    ):
        with pytest.raises(InputError):
            start_from_json(saga, bad)


def test_a_saga_declaration_is_checked() -> None:
    class Nameless(Saga):
        def steps(self, saga_id: str, data: dict[str, Any]) -> list[Step]:
            return []

    class NoSteps(Saga):
        name = "nosteps"

    for cls in (Nameless, NoSteps):
        with pytest.raises(SagaError):
            cls.validate()
    # Settings of the wrong type or out of range: one clear SagaError each, never a TypeError.
    for attr, value in (
        ("step_timeout_s", "10"),
        ("step_timeout_s", float("nan")),
        ("step_timeout_s", 0),
        ("compensation_backoff_s", -1),
        ("compensation_backoff_s", None),
        ("max_compensation_attempts", True),
        ("partitions", 0),
    ):
        bad = type("Bad", (Transfers,), {attr: value})
        with pytest.raises(SagaError, match=attr):
            bad.validate()
    Transfers.validate()


def test_a_timeout_names_the_command_to_fence_and_counts_from_the_takeover() -> None:
    saga, state = Transfers(), initial_state("t9")
    apply_event(
        saga, state, {"kind": "started", "data": _json({"from": "a", "to": "b", "amount_cents": 1})}
    )
    apply_event(saga, state, {"kind": "step_sent", "step": 0, "at_ms": T0})
    later = T0 + 61_000
    assert advance(saga, state, {}.get, later, since_ms=T0 + 30_000).waiting  # still waiting
    nxt = advance(saga, state, {}.get, later)
    assert [e["kind"] for e in nxt.events] == ["step_timed_out"]
    assert nxt.fence is not None and nxt.fence.command_id == "saga:transfers/t9/withdraw/do"


def _drive(saga: Saga, state: dict[str, Any], bank: Bank, now: int) -> list[dict[str, Any]]:
    """One decision of a runner on `state`: the events it records (not folded here)."""
    nxt = advance(saga, state, bank.results.get, now)
    for out in (*nxt.commands, *nxt.waiting):
        bank.send(out.command_id, out.send)
    return list(nxt.events)


def test_events_decided_from_an_older_state_change_nothing() -> None:
    """Two runners drive one saga for a moment when its partition moves between workers: the old
    owner decides from the state it last folded. Every event it adds is a repeat or stale, and
    the saga still ends where one runner alone would have, with the money moved once."""
    import copy

    saga, bank = Transfers(), Bank({"a": 1000})
    data = {"from": "a", "to": "nobody", "amount_cents": 300}
    log: list[dict[str, Any]] = [{"kind": "started", "data": _json(data)}]
    snapshots = []
    state = initial_state("t10")
    apply_event(saga, state, log[0])
    now = T0
    while state["status"] not in ("completed", "compensated", "failed"):
        snapshots.append(copy.deepcopy(state))
        now += 100
        events = _drive(saga, state, bank, now)
        for event in events:
            apply_event(saga, state, event)
        log.extend(events)
    alone = copy.deepcopy(state)
    assert alone["status"] == "compensated"
    # The old owner's decisions from each older state, appended after everything else.
    stale = [e for snap in snapshots for e in _drive(saga, snap, bank, now + 100)]
    assert {e["kind"] for e in stale} >= {"step_sent", "compensation_sent", "step_rejected"}
    again = initial_state("t10")
    for event in log + stale:
        apply_event(saga, again, event)
    assert again["steps"] == alone["steps"] and again["status"] == "compensated"
    assert again["duplicates"] == len(stale)
    # ...and interleaved: each stale decision right after the event that followed its snapshot.
    mixed = initial_state("t10")
    for i, event in enumerate(log):
        apply_event(saga, mixed, event)
        if 0 < i <= len(snapshots):
            for e in _drive(saga, snapshots[i - 1], bank, now + 100):
                apply_event(saga, mixed, e)
    assert mixed["steps"] == alone["steps"] and mixed["status"] == "compensated"
    memos = [m for k, _t, _a, m in bank.applied if k == "a"]
    assert memos == ["transfer t10 to nobody", "refund t10"]


def test_a_late_rejection_of_an_earlier_attempt_does_not_count_against_the_next() -> None:
    saga = Stubborn()
    state = initial_state("s3")
    apply_event(saga, state, {"kind": "started", "data": "{}"})
    events = [
        {"kind": "step_sent", "step": 0},
        {"kind": "step_accepted", "step": 0},
        {"kind": "step_sent", "step": 1},
        {"kind": "step_rejected", "step": 1, "reason": "unknown account"},
        {"kind": "compensation_sent", "step": 0, "attempt": 1, "command_id": "u1"},
        {"kind": "compensation_rejected", "step": 0, "attempt": 1, "reason": "closed"},
        {"kind": "compensation_sent", "step": 0, "attempt": 2, "command_id": "u2"},
        {"kind": "compensation_rejected", "step": 0, "attempt": 1, "reason": "closed"},  # stale
        {"kind": "compensation_sent", "step": 0, "attempt": 2, "command_id": "u2"},  # repeat
    ]
    for event in events:
        apply_event(saga, state, event)
    take = state["steps"][0]
    assert (take["status"], take["undo_attempts"], take["undo_command_id"]) == (
        "compensating",
        2,
        "u2",
    )
    assert state["duplicates"] == 2


class Fickle(Transfers):
    """A transfer whose steps() fails on some data, or changes between calls (not pure)."""

    calls = 0

    def steps(self, saga_id: str, data: dict[str, Any]) -> list[Step]:
        Fickle.calls += 1
        if data.get("raise"):
            raise RuntimeError("the rates service is down")
        if data.get("empty"):
            return []
        if data.get("dicts"):
            return [{"name": "withdraw"}]  # type: ignore[list-item]
        steps = list(super().steps(saga_id, data))
        return steps[: 1 + Fickle.calls % 2] if data.get("fickle") else steps


def test_a_start_whose_steps_fail_is_invalid_input_not_a_crash() -> None:
    # RuntimeError gave a 500 (and a traceback in `refold saga start`), no step a 503 whose
    # client retries for ever, a dict an AttributeError: each is a 422 that says why.
    for bad, why in (("raise", "rates service"), ("empty", "one Step"), ("dicts", "one Step")):
        data = {"from": "a", "to": "b", "amount_cents": 5, bad: True}
        with pytest.raises(InputError, match=why):
            start_from_json(Fickle(), {"saga_id": "x", "data": data})


def test_a_saga_whose_steps_fail_later_ends_failed_for_a_person() -> None:
    saga = Fickle()
    for bad in ("fickle", "raise"):
        state = initial_state("f-1")
        data = {"from": "a", "to": "b", "amount_cents": 5, bad: True}
        apply_event(saga, state, {"saga_id": "f-1", "kind": "started", "data": _json(data)})
        with pytest.raises(SagaStepsError, match="rates service" if bad == "raise" else "pure"):
            for tick in range(3):  # the fold, then advance: the steps differ at once or next
                advance(saga, state, {}.get, T0 + tick)
        nxt = steps_failed(saga, "f-1", SagaStepsError("steps() raised"), T0)
        assert nxt.dead and nxt.events[0]["status"] == "failed", nxt
        apply_event(saga, state, nxt.events[0])
        assert state["status"] == "failed" and "steps() raised" in state["reason"]


def test_a_saga_id_must_be_utf8_text() -> None:
    data = {"from": "a", "to": "b", "amount_cents": 5}
    with pytest.raises(InputError, match="not UTF-8"):
        start_from_json(Transfers(), {"saga_id": "t-\udcff", "data": data})
    assert start_from_json(Transfers(), {"saga_id": "t-\u00e9\n", "data": data}).saga_id


def test_start_data_with_nan_or_infinity_is_refused_naming_where() -> None:
    """json.dumps wrote them as `NaN` into the `started` event (strict JSON readers refuse
    it): the Python client and `refold saga start --data` (json.loads takes `NaN`) let them
    through, in a field the saga does not declare or one declared float."""

    class Rated(Transfers):
        fields = {**Transfers.fields, "rate": float}

    transfer = {"from": "a", "to": "b", "amount_cents": 5}
    for data, where in (
        ({**transfer, "rate": float("nan")}, "data.rate = nan"),
        ({**transfer, "rate": 1.0, "fees": [0.5, float("-inf")]}, "data.fees[1] = -inf"),
        ({**transfer, "rate": 1.0, "note": {"weight": float("inf")}}, "data.note.weight = inf"),
    ):
        with pytest.raises(InputError) as refused:
            start_from_json(Rated(), {"saga_id": "r-1", "data": data})
        assert str(refused.value) == (
            f"{where} is not JSON: NaN and Infinity have no JSON form; send null, a string or "
            "a finite number instead"
        ), refused.value
        with pytest.raises(InputError, match=f"^{re.escape(where)} is not JSON"):
            _ = Start("r-1", data).data_json  # a Start made by hand, not by start_from_json
    ok = start_from_json(Rated(), {"saga_id": "r-2", "data": {**transfer, "rate": 1e308}})
    assert ok.data_json == '{"amount_cents":5,"from":"a","rate":1e+308,"to":"b"}'


class Misdirected(Transfers):
    """A transfer whose steps are wrong in the way `data.wrong` says."""

    def steps(self, saga_id: str, data: dict[str, Any]) -> list[Step]:
        withdraw, deposit = super().steps(saga_id, data)
        wrong = data.get("wrong")
        if wrong == "aggregate":  # the deposit to a decider the app does not have
            deposit = Step("deposit", Send("acounts", data["to"], "bank.Deposit", {}))
        elif wrong == "type":  # the withdrawal's refund of a type accounts does not declare
            undo = Send("accounts", data["from"], "bank.Refund", {"amount_cents": 1})
            withdraw = Step("withdraw", withdraw.do, undo)
        elif wrong == "data":
            deposit = Step("deposit", Send("accounts", data["to"], "bank.Deposit", {"cents": 1}))
        return [withdraw, deposit]


def test_a_start_whose_steps_no_decider_takes_is_refused_naming_the_step_and_the_known() -> None:
    """Found only when the runner sent them, such commands failed the saga after the steps
    before had run (the withdrawal done, then refunded), or (a refund) were never decided."""
    deciders = {"accounts": Accounts()}
    transfer = {"from": "a", "to": "b", "amount_cents": 5}
    for wrong, said in (
        (
            "aggregate",
            "step 'deposit': its command goes to aggregate 'acounts', which no decider of the "
            "app is; known aggregates: accounts",
        ),
        (
            "type",
            "step 'withdraw': its compensation is of type 'bank.Refund', which aggregate "
            "'accounts' does not declare; known command types: bank.CloseAccount, bank.Deposit, "
            "bank.OpenAccount, bank.Withdraw",
        ),
        ("data", "step 'deposit': its command would be refused: bank.Deposit: unknown field"),
    ):
        obj = {"saga_id": "m", "data": {**transfer, "wrong": wrong}}
        with pytest.raises(InputError) as refused:
            start_from_json(Misdirected(), obj, deciders)
        assert f"saga 'transfers', {said}" in str(refused.value), refused.value
        assert start_from_json(Misdirected(), obj).saga_id == "m"  # no deciders: not checked
    assert start_from_json(Misdirected(), {"data": transfer}, deciders).data == transfer
