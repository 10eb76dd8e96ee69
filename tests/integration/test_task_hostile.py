"""Task queues against hostile handlers, on the real broker: `refold worker` and `refold
task-worker` processes as a user runs them, over `tests.integration.apps.hostile_tasks`.

Oracles: each task's status from the worker, and the handler's side-effect log (one line per
call: which tasks ran, at which attempt).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
from refold.core.config import Config

from tests.integration.test_tasks import Processes, records

APP = "tests.integration.apps.hostile_tasks"


def _run(config: Config, unique, tmp_path: Path) -> Processes:
    run = Processes(config, unique("hostile"), tmp_path, timeout_s=6)
    run.env["REFOLD_APP"] = APP
    return run


def test_a_handler_that_raises_base_exceptions_or_returns_unwritable_results_fails_its_attempts(
    config: Config, unique, tmp_path: Path
) -> None:
    run = _run(config, unique, tmp_path)
    bad = {
        "exit": {"raise": "SystemExit"},
        "interrupt": {"raise": "KeyboardInterrupt"},
        "circular": {"result": "circular"},
        "tuple-key": {"result": "tuple-key"},
        "nan": {"result": "nan"},
        "huge": {"result": "huge"},
        "own-circular": {"own_result": "circular"},
    }
    try:
        run.worker()
        run.task_worker("tw-a", concurrency=2)
        for task_id, data in bad.items():
            run.submit(task_id, data)
        states = run.wait_ended(list(bad), timeout=90)
        # The task worker still runs: a task submitted after them succeeds.
        run.submit("after", {})
        after = run.wait_ended(["after"], timeout=60)["after"]
        calls = run.calls()
        health = run.http("GET", "/healthz")
    finally:
        run.stop()

    # /healthz names the queue's dispatcher and reconciler (a failed one would make it 503).
    assert health[0] == 200, health
    assert health[1]["tasks"] == {run.queue: {"dispatch": "running", "reconcile": "running"}}

    assert after["status"] == "succeeded", after
    ran = Counter(task_id for call in calls for task_id, _ in call["tasks"])
    errors = {
        "exit": "SystemExit: 3",
        "interrupt": "KeyboardInterrupt",
        "circular": "result is not JSON",
        "tuple-key": "result is not JSON",
        "nan": "result is not JSON",
        "huge": "result is too large",
        "own-circular": "result is not JSON",
    }
    for task_id, error in errors.items():
        state = states[task_id]
        # Each attempt failed at once, with its reason (not re-driven as "no status" after
        # the timeout, nor handed over again by the share group), max_attempts times.
        assert (state["status"], state["attempts"]) == ("dead", 2), state
        assert error in state["error"], state
        assert [h["attempt"] for h in state["history"] if h["status"] == "failed"] == [1, 2]
        assert ran[task_id] == 2, (task_id, ran)


def test_a_split_that_answers_no_list_of_dicts_runs_the_task_whole_and_the_queue_goes_on(
    config: Config, unique, tmp_path: Path
) -> None:
    """A split whose parts hold a NaN is one of them: such parts were dispatched, each part's
    data written as `NaN` in its work item and `dispatched` status (strict JSON readers refuse
    it); the task now runs whole, and no record of the queue says `NaN`."""
    run = _run(config, unique, tmp_path)
    ids = ["odd", "nan", "plain"]
    try:
        run.worker()
        run.task_worker("tw-a")
        run.submit("odd", {"split": True})
        run.submit("nan", {"split": "nan"})
        run.submit("plain", {})
        states = run.wait_ended(ids, timeout=60)
    finally:
        run.stop()

    assert [states[t]["status"] for t in ids] == ["succeeded"] * 3, states
    for task_id in ("odd", "nan"):
        assert states[task_id]["parts"] == [], states[task_id]
        assert states[task_id]["result"] == {"handled": 1}, states[task_id]
    work = [task for _k, item in records(config, f"{run.queue}.work") for task in item["tasks"]]
    assert sorted(task["task_id"] for task in work) == sorted(ids), work  # each whole, once
    for topic in ("work", "status"):
        for _key, value in records(config, f"{run.queue}.{topic}"):
            orjson.loads(json.dumps(value, allow_nan=False))  # nothing that is not JSON
            for task in value.get("tasks", [value]):
                for text in (task.get("data"), task.get("result")):
                    if isinstance(text, str):
                        orjson.loads(text)  # a JSON text a strict reader takes


def test_tasks_near_the_size_limit_with_one_merge_key_are_dispatched_in_records_that_fit(
    config: Config, unique, tmp_path: Path
) -> None:
    run = _run(config, unique, tmp_path)
    ids = [f"big-{i}" for i in range(8)]
    try:
        run.worker()
        run.task_worker("tw-a")
        blob = "x" * (200 * 1024)  # 8 of them: 1.6 MB, over a record's 1 MB if merged
        with ThreadPoolExecutor(8) as pool:  # at once, so that they meet in one window
            list(pool.map(lambda t: run.submit(t, {"group": "g", "blob": blob}), ids))
        states = run.wait_ended(ids, timeout=60)
    finally:
        run.stop()

    assert {states[t]["status"] for t in ids} == {"succeeded"}, states


def test_a_cancel_sent_to_either_of_two_workers_is_answered_by_the_one_that_folds_the_task(
    config: Config, unique, tmp_path: Path
) -> None:
    queue = unique("hostile")
    nodes = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        node = Processes(config, queue, tmp_path / name, timeout_s=6)
        node.env["REFOLD_APP"] = APP
        nodes.append(node)
    a, b = nodes
    ids = [f"c-{i}" for i in range(12)]
    try:
        a.worker()
        b.worker()  # two intake nodes: the status partitions are split between them
        for task_id in ids:  # no task worker: they wait, dispatched
            a.submit(task_id, {})
        deadline = time.monotonic() + 60
        while any(b.status(t)["status"] != "dispatched" for t in ids):
            assert time.monotonic() < deadline, {t: b.status(t)["status"] for t in ids}
            time.sleep(0.3)
        first = {t: b.http("POST", f"/tasks/{queue}/{t}/cancel") for t in ids}
        states = a.wait_ended(ids, timeout=60)
        again = {t: a.http("POST", f"/tasks/{queue}/{t}/cancel")[0] for t in ids}
    finally:
        a.stop()
        b.stop()

    assert first == {t: (200, {"task_id": t, "status": "cancelled"}) for t in ids}, first
    assert {s["status"] for s in states.values()} == {"cancelled"}
    assert again == dict.fromkeys(ids, 409), again


def test_a_task_worker_started_before_its_queue_s_topics_exist_says_so(
    config: Config, unique, tmp_path: Path
) -> None:
    run = _run(config, unique, tmp_path)
    started = time.monotonic()
    done = run.cli("task-worker", "--queue", run.queue)
    took = time.monotonic() - started

    assert done.returncode == 1, done
    assert f"{run.queue}.work" in done.stderr and "refold topics ensure" in done.stderr, done
    assert len(done.stderr.strip().splitlines()) == 1 and took < 20, (took, done.stderr)


def test_a_task_worker_replaces_a_share_consumer_that_failed(
    config: Config, unique, tmp_path: Path, monkeypatch
) -> None:
    """Every consumer of an in-process task worker fails on its first round (an error injected
    in refold's own loop, after a real share consumer was made and subscribed): each is
    replaced, and the queue's tasks still succeed."""
    from refold.engine import task_worker as tw
    from refold.kafka.registry import codec_for

    from tests.integration.apps.hostile_tasks import Hostile

    run = _run(config, unique, tmp_path)
    real = tw.TaskWorker._consume
    failed: list[str] = []

    def first_round_fails(self, consumer) -> None:
        if len(failed) < self.consumers:
            consumer.subscribe([self.queue.work_topic])
            failed.append(self.queue.name)
            raise RuntimeError("injected: the share consumer's round failed")
        real(self, consumer)

    monkeypatch.setattr(tw.TaskWorker, "_consume", first_round_fails)
    mine = config.__class__(
        **{**{f: getattr(config, f) for f in config.__dataclass_fields__}, "data_dir": tmp_path}
    )
    queue = type("Q", (Hostile,), {"name": run.queue})()
    worker = None
    try:
        run.worker()
        worker = tw.TaskWorker(mine, codec_for(mine), queue, concurrency=2, consumers=2)
        worker.start()
        for i in range(5):
            run.submit(f"t{i}", {"group": "g"})
        states = run.wait_ended([f"t{i}" for i in range(5)], timeout=90)
    finally:
        if worker is not None:
            worker.stop()
        run.stop()

    assert failed == [run.queue, run.queue]
    assert worker.stats.restarts == 2
    assert {s["status"] for s in states.values()} == {"succeeded"}, states
