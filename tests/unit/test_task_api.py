"""The task API without Kafka: intake checks, the batch planner, the status fold, reconciliation
decisions. Oracles are computed here from the inputs."""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from math import inf, nan
from re import escape as re_escape

import pytest
from refold.core.app import load_task_queues
from refold.core.errors import InputError, TaskError
from refold.core.task_status import (
    apply_status,
    due_ms,
    initial_status,
    next_step,
    public_status,
    task_data,
    task_data_json,
)
from refold.core.tasks import (
    MAX_DATA_BYTES,
    Task,
    TaskQueue,
    fingerprint,
    intake_key,
    plan_batches,
    submission_from_json,
)
from refold.examples.bank.statements import statement


class Shipping(TaskQueue):
    name = "shipping"
    merge_key = "product_id"
    merge_max = 4
    max_attempts = 3
    timeout_s = 10
    retry_backoff_s = 1.0

    def split(self, data):
        if data.get("qty", 0) > 10:
            return [{**data, "qty": q} for q in (10, data["qty"] - 10)]
        return None

    def handle(self, batch):
        return None


def test_submission_checks_refuse_bad_input() -> None:
    ok = submission_from_json({"task_id": "t1", "data": {"a": 1}})
    assert (ok.task_id, ok.key, ok.data) == ("t1", "t1", {"a": 1})
    assert submission_from_json({"data": {}}).task_id  # a new id when none is given
    for bad in (
        [],
        {"data": "x"},
        {"data": {}, "task_id": ""},
        {"data": {}, "task_id": 5},
        {"data": {}, "extra": 1},
        {"data": {"big": "x" * 300_000}},
    ):
        with pytest.raises(InputError):
            submission_from_json(bad)


def test_data_json_cannot_carry_is_refused_and_the_error_says_where() -> None:
    """NaN and Infinity were written as `NaN` in the canonical JSON (json.dumps allows them);
    other values json cannot encode raised TypeError, a loop ValueError (tracebacks)."""
    loop: list = []
    loop.append(loop)
    for data, said in (
        ({"price": float("nan")}, "data.price = nan is not JSON: NaN and Infinity"),
        ({"a": {"b": [1, float("-inf")]}}, "data.a.b[1] = -inf is not JSON"),
        ({"ok": [loop, float("inf")]}, "data.ok[1] = inf is not JSON"),
        ({"when": {1, 2}}, "data is not JSON: Object of type set"),
        ({"loop": loop}, "data is not JSON: Circular reference"),
    ):
        with pytest.raises(InputError, match=r"^" + re_escape(said)):
            submission_from_json({"task_id": "t", "data": data})
    assert submission_from_json({"data": {"x": 1e308, "y": -0.0}}).data_json == (
        '{"x":1e+308,"y":-0.0}'
    )


def test_intake_key_puts_tasks_to_merge_in_one_partition() -> None:
    q = Shipping()
    a = submission_from_json({"data": {"product_id": "p1"}})
    b = submission_from_json({"data": {"product_id": "p1"}, "key": "other"})
    assert intake_key(q, a) == intake_key(q, b) == "product_id=p1"
    assert intake_key(q, submission_from_json({"key": "k", "data": {}})) == "k"


def test_plan_merges_by_key_at_most_merge_max_and_splits_add_up() -> None:
    rng = random.Random(7)
    tasks = [
        Task(f"t{i}", f"t{i}", {"product_id": f"p{rng.randrange(5)}", "qty": rng.randrange(1, 20)})
        for i in range(200)
    ]
    plan = plan_batches(Shipping(), tasks, "x")
    by_id = {t.id: t for t in tasks}
    parts_seen: Counter[str] = Counter()
    whole: list[str] = []
    for batch in plan.batches:
        assert 1 <= len(batch.tasks) <= Shipping.merge_max
        assert len({t.data["product_id"] for t in batch.tasks}) == 1
        for t in batch.tasks:
            if t.parent_id:
                assert len(batch.tasks) == 1  # a part is its own work item
                parts_seen[t.parent_id] += t.data["qty"]
            else:
                whole.append(t.id)
    split_ids = {t.id for t in tasks if t.data["qty"] > 10}
    assert set(plan.parents) == split_ids
    assert {p: by_id[p].data["qty"] for p in split_ids} == dict(parts_seen)
    assert sorted(whole) == sorted(set(by_id) - split_ids)  # every other task exactly once
    assert len({b.batch_id for b in plan.batches}) == len(plan.batches)
    assert plan_batches(Shipping(), tasks, "x") == plan  # a redone window plans the same


def test_a_split_that_raises_or_answers_no_list_of_dicts_leaves_the_task_whole() -> None:
    class Oddly(Shipping):
        """A split that answers badly, as `data["split"]` says."""

        def split(self, data):
            kind = data["split"]
            if kind == "raises":
                raise ValueError("boom")
            return {
                "empty": [],
                "a dict": {"qty": 1},
                "not dicts": [1, 2],
                "a string": "ab",
                "a generator": ({"qty": q} for q in (1, 2)),
                "not JSON": [{"at": object()}],
                "fine": ({"qty": 1}, {"qty": 2}),
            }[kind]

    odd = ["raises", "empty", "a dict", "not dicts", "a string", "a generator", "not JSON"]
    tasks = [Task(kind, kind, {"split": kind}) for kind in [*odd, "fine"]]
    plan = plan_batches(Oddly(), tasks, "x")
    assert plan.parents == {"fine": ("fine.part-0", "fine.part-1")}
    ran = [t.id for b in plan.batches for t in b.tasks]
    assert ran == [*odd, "fine.part-0", "fine.part-1"]
    assert [t.data for b in plan.batches for t in b.tasks][-2:] == [{"qty": 1}, {"qty": 2}]


def test_a_merged_batch_stays_one_record_and_a_part_too_large_leaves_its_task_whole() -> None:
    blob = "x" * (200 * 1024)
    tasks = [Task(f"t{i}", f"t{i}", {"product_id": "p", "blob": blob}) for i in range(7)]
    plan = plan_batches(Shipping(), tasks, "x")  # merge_max 4; 2 of these fill MAX_BATCH_BYTES
    assert [[t.id for t in b.tasks] for b in plan.batches] == [
        ["t0", "t1"], ["t2", "t3"], ["t4", "t5"], ["t6"],
    ]  # fmt: skip
    texts = {t.id: json.dumps(t.data) for t in tasks}
    assert plan_batches(Shipping(), tasks, "x", texts) == plan

    class Inflating(Shipping):
        def split(self, data):
            return [{**data, "copy": "y" * MAX_DATA_BYTES}, {"small": 1}]

    plan = plan_batches(Inflating(), tasks[:1], "x")
    assert plan.parents == {} and [b.tasks for b in plan.batches] == [(tasks[0],)]


def test_a_split_with_nan_or_infinity_in_a_part_leaves_the_task_whole_and_says_where(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Such parts were dispatched: each part's data, made with json.dumps, said `NaN` in the
    work item and the `dispatched` status, which strict JSON readers refuse. A part is one
    more value of the user's split that cannot be written: a bad split, like one that is not
    JSON at all."""

    class NotFinite(Shipping):
        def split(self, data):
            return [{"qty": 1}, {"qty": 2, "weights": [0.5, data["bad"]]}]

    tasks = [Task(f"t-{i}", f"t-{i}", {"bad": bad}) for i, bad in enumerate((nan, inf, -inf))]
    with caplog.at_level(logging.ERROR, logger="refold.core.tasks"):
        plan = plan_batches(NotFinite(), tasks, "x")
    assert plan.parents == {}
    assert [b.tasks for b in plan.batches] == [(t,) for t in tasks]  # each whole, as submitted
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        f"shipping: a part of task 't-{i}' is not JSON (parts[1].weights[1] = {bad}: NaN and "
        "Infinity have no JSON form; send null, a string or a finite number instead); it runs "
        "whole"
        for i, bad in enumerate(("nan", "inf", "-inf"))
    ], said


def _fold(events: list[dict]) -> dict:
    state = initial_status("t1")
    for at, event in enumerate(events):
        state = apply_status(state, {"task_id": "t1", **event}, at)
    return state


def test_first_terminal_status_wins() -> None:
    state = _fold(
        [
            {"status": "accepted", "data": json.dumps({"a": 1}), "key": "t1"},
            {"status": "dispatched", "attempt": 1, "batch_id": "b1"},
            {"status": "succeeded", "attempt": 1, "result": json.dumps({"ok": 1})},
            {"status": "succeeded", "attempt": 2, "result": json.dumps({"ok": 2})},
            {"status": "failed", "attempt": 2, "error": "late"},
        ]
    )
    assert state["status"] == "succeeded" and state["result"] == {"ok": 1}
    assert state["duplicates"] == 2 and state["error"] is None
    assert [h["status"] for h in state["history"]].count("succeeded") == 1


def test_a_re_drive_folded_after_its_attempt_started_keeps_that_attempt_s_status() -> None:
    # The reconciler writes the work item, then `retrying`; a quick task worker's `running`
    # and `failed` for that attempt may land first. The late `retrying` must not hide them.
    events = [
        {"status": "accepted", "data": "{}", "key": "t1"},
        {"status": "dispatched", "attempt": 1, "batch_id": "b1"},
        {"status": "running", "attempt": 1, "batch_id": "b1"},
        {"status": "failed", "attempt": 1, "error": "boom 1"},
        {"status": "running", "attempt": 2, "batch_id": "t1-attempt-2"},
        {"status": "failed", "attempt": 2, "error": "boom 2"},
        {"status": "retrying", "attempt": 2, "batch_id": "t1-attempt-2"},
    ]
    state = _fold(events)
    assert (state["status"], state["attempts"], state["error"]) == ("failed", 2, "boom 2")
    assert state["updated_ms"] == 5 and state["duplicates"] == 1  # the backoff counts from it
    running = _fold([*events[:5], events[6]])  # landed after `running`: still running
    assert (running["status"], running["attempts"], running["updated_ms"]) == ("running", 2, 4)
    # In order, or re-driving a running attempt (a hung handler), it is the new status.
    assert _fold([*events[:4], events[6]])["status"] == "retrying"
    assert _fold([*events[:3], events[6]])["status"] == "retrying"


def test_parent_succeeds_after_all_parts_and_dies_with_one() -> None:
    parent = initial_status("p")
    parent = apply_status(parent, {"status": "dispatched", "parts": ["p.0", "p.1"]}, 1)
    parent = apply_status(parent, {"status": "part-succeeded", "part_id": "p.0"}, 2)
    parent = apply_status(parent, {"status": "part-succeeded", "part_id": "p.0"}, 3)
    assert parent["status"] == "dispatched"
    parent = apply_status(parent, {"status": "part-succeeded", "part_id": "p.1"}, 4)
    assert parent["status"] == "succeeded"
    # Parts end on several threads: their reports reach the log out of their clocks' order,
    # and the parent ends at the latest part's time (never before a part it waited for).
    late = apply_status(initial_status("r"), {"status": "dispatched", "parts": ["r.0", "r.1"]}, 1)
    late = apply_status(late, {"status": "part-succeeded", "part_id": "r.0"}, 594)
    late = apply_status(late, {"status": "part-succeeded", "part_id": "r.1"}, 587)
    assert late["status"] == "succeeded" and late["history"][-1]["at_ms"] == 594
    other = apply_status(initial_status("q"), {"status": "dispatched", "parts": ["q.0"]}, 1)
    other = apply_status(other, {"status": "part-dead", "part_id": "q.0", "error": "x"}, 2)
    assert other["status"] == "dead" and "q.0" in other["error"]


def test_reconciler_steps_backoff_timeout_and_max_attempts() -> None:
    q = Shipping()
    failed = {"status": "failed", "attempts": 1, "updated_ms": 0, "error": "boom"}
    assert next_step(q, failed, 999) is None  # backoff 1 s after attempt 1
    assert next_step(q, failed, 1000) == ("redrive", "boom")
    assert next_step(q, {**failed, "attempts": 2}, 1999) is None  # 2 s after attempt 2
    assert next_step(q, {**failed, "attempts": 3}, 0) == ("dead", "boom")
    running = {"status": "running", "attempts": 1, "updated_ms": 0}
    assert next_step(q, running, 9_999) is None
    assert next_step(q, running, 10_000)[0] == "redrive"
    assert next_step(q, {**running, "attempts": 3}, 10_000)[0] == "dead"
    queued = {"status": "dispatched", "attempts": 1, "updated_ms": 0}
    assert next_step(q, queued, 10_000) is None  # waiting in line is no failure
    assert next_step(q, queued, int(q.queued_timeout_s * 1000))[0] == "redrive"
    assert next_step(q, {"status": "succeeded", "attempts": 1, "updated_ms": 0}, 10**9) is None
    assert next_step(q, {**running, "parts": ["a"]}, 10**9) is None


def test_queue_validation_and_loading() -> None:
    class NoHandler(TaskQueue):
        name = "x"

    with pytest.raises(TaskError):
        NoHandler.validate()
    for attrs in (
        {"name": "café"},
        {"name": "a.b"},
        {"name": "q" * 242},
        {"name": None},
        {"timeout_s": "10"},
        {"timeout_s": 0},
        {"timeout_s": float("nan")},
        {"queued_timeout_s": -1},
        {"retry_backoff_s": None},
        {"merge_max": 0},
        {"merge_max": True},
        {"max_attempts": 0},
        {"merge_window_ms": 0.5},
    ):
        bad = type("Bad", (Shipping,), attrs)
        with pytest.raises(TaskError):
            bad.validate()
    type(
        "Fine", (Shipping,), {"name": "q" * 241, "retry_backoff_s": 0, "timeout_s": 0.5}
    ).validate()
    type("Fine", (Shipping,), {"merge_window_ms": 0}).validate()
    queues = load_task_queues(["tests.unit.test_task_api"])
    assert list(queues) == ["shipping"] and type(queues["shipping"]).__name__ == "Shipping"


def test_progress_keeps_the_status_shows_the_latest_and_is_a_sign_of_life() -> None:
    state = _fold(
        [
            {"status": "accepted", "data": json.dumps({"a": 1}), "key": "t1"},
            {"status": "running", "attempt": 1, "batch_id": "b1"},
            *(
                {"status": "progress", "attempt": 1, "progress": json.dumps({"done": i})}
                for i in range(1, 4)
            ),
        ]
    )
    assert state["status"] == "running" and state["progress"] == {"done": 3}
    assert [h["status"] for h in state["history"]] == ["accepted", "running", "progress"]
    assert state["history"][-1]["progress"] == {"done": 3}
    assert state["updated_ms"] == 4  # the last report's time: timeout_s counts from it
    late = apply_status(state, {"status": "progress", "attempt": 0, "progress": "{}"}, 9)
    assert late["progress"] == {"done": 3} and late["duplicates"] == 1
    rerun = apply_status(state, {"status": "running", "attempt": 2}, 10)
    assert rerun["progress"] is None  # a new run reports its own
    assert "progress" in public_status(state)


def test_task_progress_and_cancelled_as_a_handler_sees_them() -> None:
    reports: list[tuple[str, dict]] = []
    cancels = {"t2"}
    t1 = Task(
        "t1",
        "k",
        {},
        _cancelled=cancels.__contains__,
        _progress=lambda t, r: reports.append((t.id, r)),
    )
    t1.progress(3, 10, "three")
    t1.progress(0.5)
    assert reports == [("t1", {"done": 3, "total": 10, "message": "three"}), ("t1", {"done": 0.5})]
    assert not t1.cancelled() and not t1.told_cancelled
    t2 = Task("t2", "k", {}, _cancelled=cancels.__contains__)
    assert t2.cancelled() and t2.told_cancelled
    cancels.clear()
    assert t2.cancelled()  # once told, it stays told
    Task("t3", "k", {}).progress(1)  # no sink: nothing happens


def test_due_ms_is_exactly_when_next_step_first_acts() -> None:
    q = Shipping()
    rng = random.Random(5)
    for _ in range(500):
        state = {
            "status": rng.choice(
                ["accepted", "dispatched", "running", "failed", "retrying", "succeeded", None]
            ),
            "attempts": rng.randrange(0, 5),
            "updated_ms": rng.randrange(0, 10_000),
            "error": "e",
        }
        if rng.random() < 0.1:
            state["parts"] = ["x"]
        due = due_ms(q, state)
        if due is None:
            assert all(next_step(q, state, now) is None for now in (0, 10**6, 10**12))
        else:
            assert next_step(q, state, due) is not None
            assert due == state["updated_ms"] or next_step(q, state, due - 1) is None


def test_submission_fingerprint_is_key_and_data() -> None:
    a = submission_from_json({"task_id": "x", "data": {"a": 1, "b": 2}})
    b = submission_from_json({"task_id": "x", "data": {"b": 2, "a": 1}})
    c = submission_from_json({"task_id": "x", "data": {"a": 1, "b": 3}})
    d = submission_from_json({"task_id": "x", "key": "other", "data": {"a": 1, "b": 2}})
    assert a.fingerprint == b.fingerprint
    assert len({a.fingerprint, c.fingerprint, d.fingerprint}) == 3


def test_fingerprint_is_the_sha256_of_the_canonical_json_of_key_and_data() -> None:
    # The fingerprint is built from the data's JSON made once per submit; claims written before
    # that change must still match: the oracle is the canonical JSON of the whole body.
    import hashlib

    for key, data in [("k", {"b": 1, "a": [1, 2.5, None]}), ('é"x', {"z": {"y": "ü"}}), ("p", {})]:
        body = json.dumps({"data": data, "key": key}, separators=(",", ":"), sort_keys=True)
        expected = hashlib.sha256(body.encode()).hexdigest()[:32]
        sub = submission_from_json({"task_id": "t", "key": key, "data": data})
        assert sub.fingerprint == fingerprint(key, data) == expected
        assert json.loads(sub.data_json) == data


def test_fold_keeps_the_data_as_its_json_text() -> None:
    text = json.dumps({"qty": 3, "product_id": "p1"})
    state = _fold([{"status": "accepted", "data": text, "key": "k"}])
    assert state["data"] == text  # not parsed: a work item or dead letter carries it as is
    assert task_data(state) == {"qty": 3, "product_id": "p1"}
    assert task_data_json(state) == text
    old = {**state, "data": {"qty": 3}}  # a state folded by an earlier version: parsed
    assert task_data(old) == {"qty": 3} and json.loads(task_data_json(old)) == {"qty": 3}
    assert task_data_json(initial_status("t")) == "{}"
    done = _fold([{"status": "succeeded", "attempt": 1, "result": "null"}])
    assert done["result"] is None


def test_statement_of_a_month_from_the_passbook() -> None:
    entries, balance = [], 0
    rng = random.Random(11)
    for day in range(60):
        amount = rng.choice([1, -1]) * rng.randrange(1, 5000)
        balance += amount
        month = "2026-10" if day < 31 else "2026-11"
        entries.append(
            {
                "time": f"{month}-{day % 28 + 1:02d}T10:00:00Z",
                "memo": f"m{day}",
                "amount_cents": amount,
                "balance_cents": balance,
                "offset": day,
            }
        )
    book = {"owner": "ada", "balance_cents": balance, "entries": entries}
    oct_, nov = (statement(book, "acc", m) for m in ("2026-10", "2026-11"))
    october = [e for e in entries if e["time"].startswith("2026-10")]
    assert oct_["opening_cents"] == 0 and oct_["closing_cents"] == october[-1]["balance_cents"]
    assert nov["opening_cents"] == oct_["closing_cents"] and nov["closing_cents"] == balance
    for s, mine in ((oct_, october), (nov, entries[len(october) :])):
        assert len(s["lines"]) == len(mine)
        assert s["deposits_cents"] == sum(e["amount_cents"] for e in mine if e["amount_cents"] > 0)
        assert (
            s["opening_cents"] + s["deposits_cents"] - s["withdrawals_cents"] == s["closing_cents"]
        )
    later = statement(book, "acc", "2027-01")
    assert (later["opening_cents"], later["closing_cents"], later["lines"]) == (
        balance,
        balance,
        [],
    )
    assert statement(book, "acc", "2026-01")["closing_cents"] == 0
