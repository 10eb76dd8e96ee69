"""Task queues end to end on the real broker: `refold worker` (intake, dispatch, status,
reconciliation) and `refold task-worker` processes on a share group, as a user runs them.

Oracles come from the test's own inputs and from the handler's side-effect log (one line per
call: which tasks ran, at which attempt, in which process).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING
from refold.core.config import Config
from refold.kafka import clients
from refold.kafka.log import read_to_end
from refold.kafka.registry import codec_for
from refold.kafka.topics import Topics

from tests.integration.test_commands import _free_port

ROOT = Path(__file__).resolve().parents[2]
#: The merge test's size: 200 tasks over 10 keys by default; the issue's full size is
#: REFOLD_TEST_TASKS=5000 REFOLD_TEST_TASK_KEYS=50.
TASKS = int(os.environ.get("REFOLD_TEST_TASKS", "200"))
KEYS = int(os.environ.get("REFOLD_TEST_TASK_KEYS", "10"))
APP = "tests.integration.apps.shipping"


class Processes:
    """One `refold worker --http` and any number of `refold task-worker`s for one queue."""

    def __init__(self, config: Config, queue: str, tmp: Path, timeout_s: float = 8) -> None:
        self.queue = queue
        self.tmp = tmp
        self.handled = tmp / "handled.jsonl"
        self.env = {
            **os.environ,
            "REFOLD_BOOTSTRAP_SERVERS": config.bootstrap_servers,
            "REFOLD_DATA_DIR": str(tmp / "worker"),
            "REFOLD_APP": APP,
            "REFOLD_TEST_QUEUE": queue,
            "REFOLD_TEST_TIMEOUT_S": str(timeout_s),
            "REFOLD_TEST_TASK_LOG": str(self.handled),
            "PYTHONPATH": str(ROOT),
        }
        self.port = _free_port()
        self.procs: list[subprocess.Popen] = []

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = (self.tmp / f"{name}.log").open("ab")
        cmd = [sys.executable, "-m", "refold.cli.main", *args]
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def worker(self) -> subprocess.Popen:
        proc = self._spawn(
            "worker", "worker", "--http", f"127.0.0.1:{self.port}", "--http-procs", "1"
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if self.http("GET", "/healthz")[0] == 200:
                    return proc
            except OSError:
                time.sleep(0.2)
        raise AssertionError("worker did not answer /healthz")

    def task_worker(self, name: str, concurrency: int = 2) -> subprocess.Popen:
        return self._spawn(
            name, "task-worker", "--queue", self.queue, "--concurrency", str(concurrency)
        )

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "refold.cli.main", *args]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def http(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        url = f"http://127.0.0.1:{self.port}{path}"
        request = urllib.request.Request(url, data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def submit(self, task_id: str, data: dict) -> None:
        status, body = self.http("POST", f"/tasks/{self.queue}", {"task_id": task_id, "data": data})
        assert status == 202, body
        assert body == {
            "task_id": task_id,
            "status": "accepted",
            "status_url": f"/tasks/{self.queue}/{task_id}",
        }

    def warm_up(self) -> None:
        """One task through, so the task workers have joined their share group (that takes
        seconds) before a test's tasks start their timeouts."""
        self.submit("warm-up", {"product_id": "warm-up"})
        assert self.wait_ended(["warm-up"], timeout=90)["warm-up"]["status"] == "succeeded"

    def status(self, task_id: str) -> dict:
        code, body = self.http("GET", f"/tasks/{self.queue}/{task_id}")
        return body if code == 200 else {"status": None}

    def wait_ended(self, ids: list[str], timeout: float = 120) -> dict[str, dict]:
        deadline = time.monotonic() + timeout
        pending = set(ids)
        states: dict[str, dict] = {}
        while pending and time.monotonic() < deadline:
            for task_id in sorted(pending):
                state = self.status(task_id)
                if state["status"] in ("succeeded", "dead", "cancelled"):
                    states[task_id] = state
                    pending.discard(task_id)
            time.sleep(0.5)
        assert not pending, {t: self.status(t)["status"] for t in sorted(pending)[:10]}
        return states

    def calls(self) -> list[dict]:
        if not self.handled.exists():
            return []
        return [json.loads(line) for line in self.handled.read_text().splitlines()]


def records(config: Config, topic: str) -> list[tuple[str, dict]]:
    """Every record of a task topic, decoded, each partition in order: (key, data)."""
    codec = codec_for(config)
    consumer = clients.consumer(config, config.group("test-reader"))
    starts = {(topic, p): OFFSET_BEGINNING for p in range(Topics(config).partitions(topic))}
    out: list[tuple[str, dict]] = []
    try:
        for batch in read_to_end(consumer, starts, timeout=30):
            out += [(msg.key().decode(), codec.decode(msg.value())[1]) for msg in batch]
    finally:
        consumer.close()
    return out


@pytest.mark.timeout(300 + TASKS // 3)  # the full size takes minutes on 2 cores
def test_merged_and_split_tasks_succeed_exactly_once_with_task_workers_killed(
    config: Config, unique, tmp_path: Path
) -> None:
    queue = unique("ship")
    run = Processes(config, queue, tmp_path, timeout_s=20)
    rng = random.Random(13)
    tasks = {
        f"t{i}": {"product_id": f"p{rng.randrange(KEYS)}", "qty": rng.randrange(1, 25)}
        for i in range(TASKS)
    }
    try:
        run.worker()
        workers = [run.task_worker(name) for name in ("tw-a", "tw-b", "tw-c")]
        run.warm_up()
        for i, (task_id, data) in enumerate(tasks.items()):
            run.submit(task_id, data)
            if i in (TASKS // 3, 2 * TASKS // 3):  # a task worker dies, items in hand
                victim = workers.pop(0)
                victim.send_signal(signal.SIGKILL)
                victim.wait(10)
                workers.append(run.task_worker(f"tw-{i}"))
        states = run.wait_ended(list(tasks), timeout=180 + TASKS / 5)
        split = {t for t, d in tasks.items() if d["qty"] > 10}
        parts = {part: run.status(part) for t in split for part in states[t]["parts"]}
        calls = run.calls()
    finally:
        run.stop()

    not_ok = [s for s in states.values() if s["status"] != "succeeded"]
    assert not not_ok, (len(not_ok), json.dumps(not_ok[:1]))
    for state in [*states.values(), *parts.values()]:
        assert [h["status"] for h in state["history"]].count("succeeded") == 1
    ran: set[str] = set()
    for call in calls:
        assert len(call["tasks"]) <= 5  # merge_max
        assert len({product for _, _, product, _ in call["tasks"]}) == 1  # one merge key
        ran.update(task_id for task_id, *_ in call["tasks"])
    assert set(tasks) - split <= ran  # repeats are allowed (a killed worker), gaps never
    assert set(parts) <= ran
    for parent in split:
        mine = states[parent]["parts"]
        assert len(mine) == -(-tasks[parent]["qty"] // 10)
        assert all(parts[p]["status"] == "succeeded" for p in mine)
        done_at = max(parts[p]["history"][-1]["at_ms"] for p in mine)
        assert states[parent]["history"][-1]["at_ms"] >= done_at  # after every part
    # The dispatched work items: parts add up to their task; the rest each exactly once.
    work = [item for _, item in records(config, f"{queue}.work")]
    first = [item for item in work if "-attempt-" not in item["batch_id"]]
    qty_of_parts: dict[str, int] = defaultdict(int)
    dispatched: Counter[str] = Counter()
    for item in first:
        for task in item["tasks"]:
            dispatched[task["task_id"]] += 1
            if task["parent_id"]:
                qty_of_parts[task["parent_id"]] += json.loads(task["data"])["qty"]
    assert dict(qty_of_parts) == {p: tasks[p]["qty"] for p in split}
    assert set(dispatched.values()) == {1}
    assert set(dispatched) == (set(tasks) - split) | set(parts) | {"warm-up"}


def test_dead_after_max_attempts_hang_redriven_repeat_queues_nothing_cancel_never_runs(
    config: Config, unique, tmp_path: Path
) -> None:
    queue = unique("ship")
    run = Processes(config, queue, tmp_path, timeout_s=6)
    try:
        run.worker()
        # Bad input: 4xx, nothing appended.
        for body in ({"data": "x"}, {"data": {}, "task_id": ""}, {"nope": 1}):
            assert run.http("POST", f"/tasks/{queue}", body)[0] == 422
        assert run.http("POST", "/tasks/no-such-queue", {"data": {}})[0] == 404
        # Cancelled before any task worker runs: never handed to the handler.
        run.submit("cancel-me", {"product_id": "p2"})
        deadline = time.monotonic() + 30
        while run.status("cancel-me")["status"] is None and time.monotonic() < deadline:
            time.sleep(0.2)
        code, body = run.http("POST", f"/tasks/{queue}/cancel-me/cancel")
        assert (code, body) == (200, {"task_id": "cancel-me", "status": "cancelled"}), body
        assert run.http("POST", f"/tasks/{queue}/nobody/cancel")[0] == 404
        run.task_worker("tw-a")
        run.task_worker("tw-b")  # takes new items while tw-a's poll waits for the hang
        run.warm_up()
        # A repeated task id: the first answer, nothing queued; with another body, 409.
        run.submit("same", {"product_id": "p1"})
        run.submit("same", {"product_id": "p1"})
        other = {"task_id": "same", "data": {"product_id": "p1", "other": "body"}}
        conflict = run.http("POST", f"/tasks/{queue}", other)
        for i in range(3):
            run.submit(f"fail-{i}", {"product_id": f"f{i}", "fail": True})
        run.submit("hang", {"product_id": "h", "hang_once": True})
        run.submit("long", {"product_id": "l", "until_cancelled": True})
        deadline = time.monotonic() + 60
        while run.status("long")["status"] != "running" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert run.http("POST", f"/tasks/{queue}/long/cancel")[0] == 200
        submitted = run.cli(
            "task", "submit", queue, "--id", "cli-1", "--data", '{"product_id": "c"}', "--wait"
        )
        clash = run.cli("task", "submit", queue, "--id", "same", "--data", '{"product_id": "x"}')
        again = run.cli("task", "submit", queue, "--id", "cli-1", "--data", '{"product_id": "c"}')
        states = run.wait_ended(
            [f"fail-{i}" for i in range(3)] + ["hang", "cancel-me", "same", "long"]
        )
        deadline = time.monotonic() + 30
        while not any(c.get("told") == "long" for c in run.calls()):
            assert time.monotonic() < deadline, "the running task was never told"
            time.sleep(0.2)
        code, dead = run.http("GET", f"/tasks/{queue}?status=dead&limit=10")
        listed = run.cli("task", "list", queue, "--status", "dead")
        shown = run.cli("task", "status", queue, "hang")
        assert run.http("POST", f"/tasks/{queue}/same/cancel")[0] == 409  # it ended
        calls = run.calls()
    finally:
        run.stop()

    told = [c for c in calls if "told" in c]
    calls = [c for c in calls if "tasks" in c]
    ran = Counter(task_id for call in calls for task_id, *_ in call["tasks"])
    # A running task is told (task.cancelled()) and ends cancelled; its success changes nothing.
    assert told == [{"told": "long", "cancelled": True}]
    assert states["long"]["status"] == "cancelled" and ran["long"] == 1
    assert ran["cancel-me"] == 0 and states["cancel-me"]["status"] == "cancelled"
    for i in range(3):
        state = states[f"fail-{i}"]
        assert (state["status"], state["attempts"]) == ("dead", 3), state
        assert "Retry: this task always fails" in state["error"]
        assert ran[f"fail-{i}"] == 3  # exactly max_attempts handler calls
        failed = [h["attempt"] for h in state["history"] if h["status"] == "failed"]
        assert failed == [1, 2, 3], state["history"]
    hang = states["hang"]
    assert hang["status"] == "succeeded" and hang["attempts"] == 2, hang
    assert [h["status"] for h in hang["history"]].count("succeeded") == 1
    assert states["same"]["status"] == "succeeded" and ran["same"] == 1
    assert conflict[0] == 409 and conflict[1]["error"] == "task id conflict", conflict
    assert states["long"]["history"][-1]["status"] == "cancelled"
    assert code == 200 and {t["task_id"] for t in dead["items"]} == {f"fail-{i}" for i in range(3)}
    # The dead-letter topic holds each dead task once, with its data and the last error.
    letters = records(config, f"{queue}.dead")
    assert sorted(k for k, _ in letters) == [f"fail-{i}" for i in range(3)]
    assert all(json.loads(v["data"])["fail"] and v["error"] for _, v in letters)
    # One intake record per distinct task id (the repeat appended nothing).
    intake = Counter(v["task_id"] for _, v in records(config, f"{queue}.tasks"))
    assert intake["same"] == 1 and set(intake.values()) == {1}
    # The CLI: submit --wait, list, status.
    assert submitted.returncode == 0, submitted.stderr
    assert json.loads(submitted.stdout)["status"] == "succeeded"
    assert clash.returncode != 0 and "another body" in clash.stderr, clash.stderr
    assert again.returncode == 0 and json.loads(again.stdout)["status"] == "accepted"
    assert intake["cli-1"] == 1
    assert listed.returncode == 0, listed.stderr
    assert sorted(json.loads(x)["task_id"] for x in listed.stdout.splitlines()) == [
        f"fail-{i}" for i in range(3)
    ]
    assert shown.returncode == 0 and json.loads(shown.stdout)["status"] == "succeeded"


def test_two_intake_workers_one_task_id_read_your_writes_progress_own_results_routed_reads(
    config: Config, unique, tmp_path: Path
) -> None:
    queue = unique("ship")
    a = Processes(config, queue, tmp_path / "a", timeout_s=6)
    b = Processes(config, queue, tmp_path / "b", timeout_s=6)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    b.handled = a.handled  # one side-effect log for the handler, wherever it runs
    b.env["REFOLD_TEST_TASK_LOG"] = str(a.handled)
    try:
        a.worker()
        b.worker()  # two intake nodes: the status partitions are split between them
        a.task_worker("tw-a")
        # Read-your-writes: a GET right after the 202, to the same worker, is never a 404.
        answers = []
        for i in range(20):
            node = (a, b)[i % 2]
            node.submit(f"ryw-{i}", {"product_id": f"r{i % 3}"})
            answers.append(node.http("GET", f"/tasks/{queue}/ryw-{i}"))
        # One task id sent to both workers at once, the same body: both 202, queued once.
        duplicates = [f"dup-{i}" for i in range(8)]
        with ThreadPoolExecutor(2) as pool:
            for task_id in duplicates:
                list(pool.map(lambda node, t=task_id: node.submit(t, {"product_id": "d"}), (a, b)))
        # Both answered 202, so both show the task (one appended it, one knew it was a repeat).
        dup_reads = [
            node.http("GET", f"/tasks/{queue}/{t}")[0] for t in duplicates for node in (a, b)
        ]
        # Another body for a claimed id: 409 from either worker, nothing queued.
        other = {"task_id": "dup-0", "data": {"product_id": "other"}}
        conflicts = [
            a.http("POST", f"/tasks/{queue}", other),
            b.http("POST", f"/tasks/{queue}", other),
        ]
        # Progress: 10 steps of 1 s, longer than timeout_s (6 s): reports keep it alive (the
        # slack, 5 s between reports and the timeout, is for a status fold behind under load).
        a.submit("slow", {"product_id": "s", "progress": 10, "step_s": 1.0})
        seen: list[dict] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            state = max(
                (a.status("slow"), b.status("slow")), key=lambda s: len(s.get("history", ()))
            )
            if state["status"] == "succeeded":
                break
            if state.get("progress"):
                seen.append(state["progress"])
            time.sleep(0.3)
        # Merged or not, each task gets its own result.
        for i in range(3):
            b.submit(f"own-{i}", {"product_id": "o", "own_result": True})
        # A task's status is folded by the worker that owns its status partition.
        ids = [f"ryw-{i}" for i in range(20)] + duplicates + ["slow"]
        states = _ended_on_either((a, b), ids)
        own = _ended_on_either((a, b), [f"own-{i}" for i in range(3)])
        # Either worker answers for every task: the one that does not fold its status
        # partition forwards the GET to the one that does (refold.http.routing).
        routed = {t: [node.status(t) for node in (a, b)] for t in ids}
        # Either worker lists every task of the queue, the other's partitions merged in: in
        # one page, and page by page (7 at a time).
        listed = {node.port: _listed(node, 1000) for node in (a, b)}
        paged = {node.port: _listed(node, 7) for node in (a, b)}
        calls = a.calls()
    finally:
        a.stop()
        b.stop()

    assert [code for code, _ in answers] == [200] * 20, answers
    assert dup_reads == [200] * len(dup_reads)
    assert all(body["status"] is not None for _, body in answers), answers
    assert all(s["status"] == "succeeded" for s in states.values()), states
    assert all(pair == [states[t], states[t]] for t, pair in routed.items()), routed
    every = sorted([*ids, *own], key=str.encode)
    assert all(found == every for found in listed.values()), listed
    assert all(found == every for found in paged.values()), paged
    intake = Counter(v["task_id"] for _, v in records(config, f"{queue}.tasks"))
    assert {t: intake[t] for t in duplicates} == dict.fromkeys(duplicates, 1)
    assert set(intake.values()) == {1} and "other" not in json.dumps(list(intake))
    assert [c for c, _ in conflicts] == [409, 409], conflicts
    assert all(body["error"] == "task id conflict" for _, body in conflicts)
    ran = Counter(task_id for call in calls if "tasks" in call for task_id, *_ in call["tasks"])
    assert all(ran[t] == 1 for t in duplicates), ran
    slow = states["slow"]
    assert slow["attempts"] == 1 and ran["slow"] == 1, slow  # never re-driven
    assert slow["progress"] == {"done": 10, "total": 10, "message": "step 10"}
    assert seen and all(p["total"] == 10 and 1 <= p["done"] <= 10 for p in seen)
    assert [p["done"] for p in seen] == sorted(p["done"] for p in seen)
    assert [h["status"] for h in slow["history"]][-3:] == ["running", "progress", "succeeded"]
    assert slow["history"][-2]["progress"] == slow["progress"]
    assert {t: s["result"] for t, s in own.items()} == {t: {"task_id": t} for t in own}


def _listed(node: Processes, limit: int) -> list[str]:
    """The ids of the queue's succeeded tasks as `GET /tasks/{queue}?status=` lists them,
    page after page."""
    found: list[str] = []
    after = ""
    while True:
        query = f"status=succeeded&limit={limit}" + (f"&after={after}" if after else "")
        code, body = node.http("GET", f"/tasks/{node.queue}?{query}")
        assert code == 200, body
        found += [item["task_id"] for item in body["items"]]
        if body["next"] is None:
            return found
        after = body["next"]


def _ended_on_either(nodes: tuple[Processes, ...], ids: list[str]) -> dict[str, dict]:
    """Each task's ended status from whichever worker folds its status partition."""
    deadline = time.monotonic() + 120
    states: dict[str, dict] = {}
    while len(states) < len(ids) and time.monotonic() < deadline:
        for task_id in ids:
            for node in nodes:
                state = node.status(task_id)
                if state["status"] in ("succeeded", "dead", "cancelled"):
                    states[task_id] = state
        time.sleep(0.5)
    assert len(states) == len(ids), sorted(set(ids) - set(states))[:10]
    return states


def test_a_split_task_cancelled_before_its_dispatch_runs_none_of_its_parts(
    config: Config, unique, tmp_path: Path
) -> None:
    """The cancel names the parent only (its parts do not exist yet); the dispatcher splits it
    later; the task worker ends each part `cancelled` and never hands one to the handler."""
    from refold.kafka.task_log import TaskClient

    from tests.integration.apps.shipping import Shipping

    queue = unique("ship")
    run = Processes(config, queue, tmp_path, timeout_s=6)
    shipping = type("Q", (Shipping,), {"name": queue})()
    ensured = run.cli("topics", "ensure")
    assert ensured.returncode == 0, ensured.stderr
    made = int(ensured.stdout.split(" created)")[0].rsplit("(", 1)[1])
    assert made >= 4, ensured.stdout  # the new queue's own topics count (they were "0 created")
    submitted = run.cli("task", "submit", queue, "--data", '{"product_id": "p", "qty": 25}',
                        "--id", "big")  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    client = TaskClient(config, {queue: shipping})
    try:
        client.cancel(queue, ["big"])  # no worker runs yet: nothing is dispatched
    finally:
        client.close()
    try:
        run.worker()
        run.task_worker("tw-a")
        run.submit("after", {"product_id": "q"})  # a task after them still runs
        states = run.wait_ended(["big", "after", "big.part-0", "big.part-1", "big.part-2"])
        calls = run.calls()
    finally:
        run.stop()

    assert states["after"]["status"] == "succeeded", states["after"]
    assert {t: states[t]["status"] for t in states if t != "after"} == dict.fromkeys(
        ["big", "big.part-0", "big.part-1", "big.part-2"], "cancelled"
    ), states
    ran = {task_id for call in calls for task_id, *_ in call["tasks"]}
    assert ran == {"after"}, calls
