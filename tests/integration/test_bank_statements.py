"""The bank example's `statements` task queue end to end, as a user runs it: `refold worker`
(commands, the `passbook` projection, intake and dispatch) and a `refold task-worker --queue
statements` reading the passbook over HTTP. The oracle is the test's own commands: each
account's accepted deposits and withdrawals, in order.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient

from tests.integration.test_commands import _free_port

ROOT = Path(__file__).resolve().parents[2]


def _ours(admin: AdminClient) -> set[str]:
    names = admin.list_topics(timeout=10).topics
    return {
        t for t in names if t.startswith("bank.accounts") or t.startswith("statements.")
    }  # fmt: skip


def _http(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _months() -> list[str]:
    now = datetime.now(UTC)
    before = (now.year, now.month - 1) if now.month > 1 else (now.year - 1, 12)
    after = (now.year, now.month + 1) if now.month < 12 else (now.year + 1, 1)
    return [f"{y:04d}-{m:02d}" for y, m in (before, (now.year, now.month), after)]


def test_statements_are_merged_by_account_and_each_task_gets_its_month(
    bootstrap: str, tmp_path: Path
) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existed = _ours(admin)
    port = _free_port()
    env = {
        **os.environ,
        "REFOLD_BOOTSTRAP_SERVERS": bootstrap,
        "REFOLD_DATA_DIR": str(tmp_path / "data"),
        "REFOLD_APP": "refold.examples.bank",
        "REFOLD_BANK_URL": f"http://127.0.0.1:{port}",
        "PYTHONPATH": str(ROOT),
    }
    cli = [sys.executable, "-m", "refold.cli.main"]
    procs: list[subprocess.Popen] = []

    def spawn(name: str, *args: str) -> None:
        log = (tmp_path / f"{name}.log").open("ab")
        procs.append(subprocess.Popen([*cli, *args], env=env, stdout=log, stderr=log))

    run = uuid.uuid4().hex[:6]
    accounts = [f"st-{run}-{i}" for i in range(3)]
    months = _months()
    rng = random.Random(3)
    amounts: dict[str, list[int]] = defaultdict(list)
    decided: Counter[str] = Counter()
    try:
        subprocess.run([*cli, "topics", "ensure"], env=env, check=True, capture_output=True)
        spawn("worker", "worker", "--http", f"127.0.0.1:{port}", "--http-procs", "1")
        spawn("task-worker", "task-worker", "--queue", "statements", "--concurrency", "2")
        deadline = time.monotonic() + 60
        while True:
            try:
                if _http(port, "GET", "/healthz")[0] == 200:
                    break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
                time.sleep(0.2)
        for account in accounts:
            commands = [("bank.OpenAccount", {"owner": "ada"})]
            commands += [
                (rng.choice(["bank.Deposit", "bank.Deposit", "bank.Withdraw"]),
                 {"amount_cents": rng.randrange(100, 50_000), "memo": f"m{n}"})
                for n in range(8)
            ]  # fmt: skip
            for type_name, data in commands:
                body = {"key": account, "type": type_name, "data": data}
                code, result = _http(port, "POST", "/commands/accounts?wait_ms=10000", body)
                assert code in (200, 202) and result["status"] in ("accepted", "rejected"), result
                decided[result["status"]] += 1
                if result["status"] == "accepted" and type_name != "bank.OpenAccount":
                    sign = 1 if type_name == "bank.Deposit" else -1
                    amounts[account].append(sign * data["amount_cents"])
        for account in accounts:  # the passbook has folded every entry
            deadline = time.monotonic() + 60
            while True:
                code, found = _http(port, "GET", f"/projections/passbook/{account}")
                if code == 200 and len(found["state"]["entries"]) == len(amounts[account]):
                    break
                assert time.monotonic() < deadline, found
                time.sleep(0.2)
        tasks = {
            f"statement-{account}-{month}": {"account": account, "month": month}
            for account in accounts
            for month in months
        }

        def submit(item: tuple[str, dict]) -> tuple[int, Any]:
            return _http(port, "POST", "/tasks/statements", {"task_id": item[0], "data": item[1]})

        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(submit, tasks.items()))
        states: dict[str, dict] = {}
        deadline = time.monotonic() + 120
        while len(states) < len(tasks):
            assert time.monotonic() < deadline, (set(tasks) - set(states), states)
            for task_id in tasks:
                code, state = _http(port, "GET", f"/tasks/statements/{task_id}")
                if code == 200 and state["status"] in ("succeeded", "dead", "cancelled"):
                    states[task_id] = state
            time.sleep(0.3)
        # The dashboard's numbers are this worker's: its commands decided, the queue's tasks.
        deadline = time.monotonic() + 30
        while True:
            dash = _http(port, "GET", "/dashboard.json")[1]
            [queue] = [q for q in dash["tasks"] if q["name"] == "statements"]
            if queue["counts"].get("succeeded", 0) >= len(tasks):
                break
            assert time.monotonic() < deadline, queue
            time.sleep(0.5)
        [accounts_processor] = [c for c in dash["commands"] if c["name"] == "accounts"]
        assert (accounts_processor["accepted"], accounts_processor["rejected"]) == (
            decided["accepted"],
            decided["rejected"],
        ), (accounts_processor, decided)
        assert queue["total"] == sum(queue["counts"].values()) and not queue["capped"], queue
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
        gone = sorted(_ours(admin) - existed)
        if gone:
            for future in admin.delete_topics(gone, operation_timeout=30).values():
                future.result()

    assert all(code == 202 for code, _ in answers), answers
    assert {s["status"] for s in states.values()} == {"succeeded"}, states
    batches: dict[str, list[str]] = defaultdict(list)
    for task_id, state in states.items():
        batches[state["batch_id"]].append(task_id)
    for members in batches.values():  # one account per batch (the merge key)
        assert len({tasks[t]["account"] for t in members}) == 1, members
    before, this, after = months
    for account in accounts:
        mine = amounts[account]
        balance = sum(mine)
        empty = states[f"statement-{account}-{before}"]["result"]
        now = states[f"statement-{account}-{this}"]["result"]
        later = states[f"statement-{account}-{after}"]["result"]
        assert (empty["opening_cents"], empty["closing_cents"], empty["lines"]) == (0, 0, [])
        assert [line["amount_cents"] for line in now["lines"]] == mine
        assert (now["opening_cents"], now["closing_cents"]) == (0, balance)
        assert now["deposits_cents"] == sum(a for a in mine if a > 0)
        assert now["withdrawals_cents"] == -sum(a for a in mine if a < 0)
        assert (later["opening_cents"], later["closing_cents"], later["lines"]) == (
            balance,
            balance,
            [],
        )
        assert now["account"] == account and now["owner"] == "ada"
    for task_id, state in states.items():  # the handler's progress, one report per statement
        size = len(batches[state["batch_id"]])
        progress = state["progress"]
        assert progress["total"] == size and 1 <= progress["done"] <= size, state
        assert progress["message"] == f"{tasks[task_id]['account']} {tasks[task_id]['month']}"
