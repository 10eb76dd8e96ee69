"""The bank's task queue: an account's monthly statement, made from the `passbook` projection.

Submit `{"data": {"account": "acc-1", "month": "2026-11"}}` to `POST /tasks/statements`. Tasks
for one account are merged into one batch (merge key `account`), so the handler reads that
account's passbook once for every month asked, and gives each task its own statement as its
result. The passbook comes from a worker's query API (`GET /projections/passbook/{account}`),
at `REFOLD_BANK_URL` (default `http://127.0.0.1:8080`, the README's worker). Reading is its only
effect, so running a batch twice is harmless (the handler idempotency contract).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from refold.tasks import Retry, Task, TaskQueue

DEFAULT_URL = "http://127.0.0.1:8080"


def statement(passbook: dict[str, Any], account: str, month: str) -> dict[str, Any]:
    """One month (`YYYY-MM`) of an account's passbook: its lines, the balance before and after,
    and the month's deposits and withdrawals. Pure: the passbook state is all it reads."""
    opening = 0
    lines: list[dict[str, Any]] = []
    for entry in passbook.get("entries", ()):
        entry_month = str(entry.get("time", ""))[:7]
        if entry_month < month:
            opening = entry["balance_cents"]
        elif entry_month == month:
            lines.append({k: entry[k] for k in ("time", "memo", "amount_cents", "balance_cents")})
    amounts = [line["amount_cents"] for line in lines]
    return {
        "account": account,
        "owner": passbook.get("owner"),
        "month": month,
        "opening_cents": opening,
        "deposits_cents": sum(a for a in amounts if a > 0),
        "withdrawals_cents": -sum(a for a in amounts if a < 0),
        "closing_cents": lines[-1]["balance_cents"] if lines else opening,
        "lines": lines,
    }


class Statements(TaskQueue):
    """Monthly statements, merged by account: one passbook read per account and batch."""

    name = "statements"
    merge_key = "account"
    merge_window_ms = 200
    merge_max = 24  # two years of months for one account in one batch
    max_attempts = 3
    timeout_s = 30
    retry_backoff_s = 0.5

    def __init__(self, url: str | None = None) -> None:
        self.url = (url or os.environ.get("REFOLD_BANK_URL") or DEFAULT_URL).rstrip("/")

    def handle(self, batch: list[Task]) -> dict[str, Any]:
        accounts: dict[str, list[Task]] = {}
        for task in batch:
            accounts.setdefault(str(task.data["account"]), []).append(task)
        done = 0
        for account, tasks in accounts.items():
            passbook = self.passbook(account)
            for task in tasks:
                task.result = statement(passbook, account, str(task.data["month"]))
                done += 1
                task.progress(done, len(batch), f"{account} {task.data['month']}")
        return {"accounts": len(accounts), "statements": done}

    def passbook(self, account: str) -> dict[str, Any]:
        """The account's passbook state; an empty one for an account without entries."""
        url = f"{self.url}/projections/passbook/{urllib.parse.quote(account, safe='')}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                state: dict[str, Any] = json.loads(response.read())["state"]
                return state
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return {"owner": None, "balance_cents": 0, "entries": []}
            raise Retry(f"GET {url}: HTTP {exc.code}") from exc
        except OSError as exc:  # the worker is not up (yet): another attempt after the backoff
            raise Retry(f"GET {url}: {exc}") from exc
