"""Three workers share a bank: every key of `balances` and of the re-keyed `owners` is answered
exactly from every worker (refold.engine.repartition, refold.http.routing), and again within 60 s
after one of them is killed with kill -9.

The oracle is the test's own: the states computed from the events it published.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from refold.core.config import Config
from refold.core.inputs import EventInput
from refold.kafka.publisher import Publisher
from refold.kafka.registry import codec_for
from refold.kafka.topics import Topics, event_topic, internal_topics

from tests.integration.test_commands import _free_port

ROOT = Path(__file__).resolve().parents[2]
EVENTS = int(os.environ.get("REFOLD_SCALEOUT_EVENTS", "100000"))
ACCOUNTS = 2000
OWNERS = 250
SAMPLED_ACCOUNTS = 400  # balances keys asked of each worker (every owner key is asked)

Bank = tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]


def _events(rng: random.Random) -> list[tuple[str, str, dict[str, Any]]]:
    """Every account opened for an owner first, then deposits and withdrawals."""
    out: list[tuple[str, str, dict[str, Any]]] = []
    for i in range(ACCOUNTS):
        account = f"acc-{i}"
        owner = f"owner-{rng.randrange(OWNERS)}"
        out.append(("bank.AccountOpened", account, {"account_id": account, "owner": owner}))
    for i in range(EVENTS - ACCOUNTS):
        account = f"acc-{rng.randrange(ACCOUNTS)}"
        kind = "bank.MoneyDeposited" if rng.random() < 0.7 else "bank.MoneyWithdrawn"
        data = {"account_id": account, "amount_cents": rng.randrange(1, 5000), "memo": str(i)}
        out.append((kind, account, data))
    return out


def _oracle(events: list[tuple[str, str, dict[str, Any]]]) -> Bank:
    """`balances` and `owners` as the bank's folds define them, computed without refold."""
    balances: dict[str, dict[str, Any]] = {}
    owners: dict[str, dict[str, Any]] = {}
    owner_of: dict[str, str] = {}
    for kind, account, data in events:
        b = balances.setdefault(
            account,
            {"balance_cents": 0, "deposits": 0, "withdrawals": 0, "events": 0, "owner": None},
        )
        b["events"] += 1
        if kind == "bank.AccountOpened":
            b["owner"] = owner_of[account] = data["owner"]
            owners.setdefault(data["owner"], {"accounts": {}, "total_cents": 0})
            owners[data["owner"]]["accounts"].setdefault(account, 0)
            continue
        delta = data["amount_cents"] if kind == "bank.MoneyDeposited" else -data["amount_cents"]
        b["balance_cents"] += delta
        b["deposits" if delta > 0 else "withdrawals"] += 1
        o = owners[owner_of[account]]
        o["accounts"][account] += delta
        o["total_cents"] += delta
    return balances, owners


class BankWorker:
    """`refold worker --http` over the test's bank, in a subprocess of its own."""

    def __init__(self, config: Config, prefix: str, topic: str, data_dir: Path) -> None:
        self.env = {
            **os.environ,
            "REFOLD_BOOTSTRAP_SERVERS": config.bootstrap_servers,
            "REFOLD_DATA_DIR": str(data_dir),
            "REFOLD_APP": "tests.integration.apps.scaleout",
            "SCALEOUT_PREFIX": prefix,
            "SCALEOUT_TOPIC": topic,
            "PYTHONPATH": str(ROOT),
        }
        self.prefix = prefix
        self.data_dir = data_dir
        self.log = data_dir.parent / f"{data_dir.name}.log"
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        only = f"{self.prefix}-balances,{self.prefix}-owners"
        cmd = [sys.executable, "-m", "refold.cli.main", "worker", "--only", only]
        cmd += ["--http", f"127.0.0.1:{self.port}", "--http-procs", "1"]
        self.proc = subprocess.Popen(
            cmd, env=self.env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT
        )

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill9()

    def get(self, path: str) -> tuple[int, Any, dict[str, str]]:
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=60) as resp:
                return resp.status, json.loads(resp.read()), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            body = exc.read()
            return exc.code, json.loads(body) if body else None, dict(exc.headers)

    def owners_of(self, name: str) -> set[str]:
        code, body, _ = self.get("/projections")
        assert code == 200, body
        [entry] = [p for p in body if p["name"] == name]
        return {p["owner"] for p in entry["health"].get("partitions", [])}


def _answers(worker: BankWorker, name: str, truth: dict[str, dict[str, Any]]) -> set[str]:
    """Who served each of `truth`'s keys when `worker` was asked; AssertionError naming the
    first answer that is missing, stale or not the oracle's."""
    served = set()
    for key, state in truth.items():
        code, body, headers = worker.get(f"/projections/{name}/{urllib.parse.quote(key)}")
        assert code == 200, (worker.port, name, key, code, body)
        assert not body["stale"], (worker.port, name, key, body)
        assert body["state"] == state, (worker.port, name, key, body["state"], state)
        served.add(headers.get("X-Refold-Served-By", "here"))
    return served


def _eventually(check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (AssertionError, OSError):  # OSError: not listening yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.timeout(420)
def test_three_workers_answer_every_key_of_balances_and_owners_and_survive_kill9(
    config: Config, unique: Any, tmp_path: Path
) -> None:
    topic, prefix = unique("bank"), unique("so")
    balances_name, owners_name = f"{prefix}-balances", f"{prefix}-owners"
    Topics(config).ensure([event_topic(topic, partitions=6), *internal_topics(config)])
    events = _events(random.Random(23))
    codec = codec_for(config)
    with Publisher(config, codec) as publisher:
        encoded = [EventInput(t, k, d, codec.encode(t, d)) for t, k, d in events]
        publisher.publish_bulk(topic, encoded)
    balances, owners = _oracle(events)
    sampled = dict(random.Random(5).sample(sorted(balances.items()), SAMPLED_ACCOUNTS))
    workers = [BankWorker(config, prefix, topic, tmp_path / f"w{i}") for i in range(3)]
    for w in workers:
        w.start()
    try:
        # Each worker folds some partitions of both projections (owners: of its repartition
        # topic) and sees the others' as "elsewhere".
        def shared() -> None:
            for w in workers:
                for name in (balances_name, owners_name):
                    assert w.owners_of(name) == {"here", "elsewhere"}, (name, w.owners_of(name))

        _eventually(shared, 120)
        for w in workers:
            served = _eventually(lambda w=w: _answers(w, owners_name, owners), 150)
            assert len(served) == 3, served  # the owner keys of all three workers
            _eventually(lambda w=w: _answers(w, balances_name, sampled), 60)
        # Each worker routes some source partitions of owners, all of them routed to the end.
        routed = []
        for w in workers:
            code, body, _ = w.get("/projections")
            assert code == 200, body
            [entry] = [p for p in body if p["name"] == owners_name]
            assert entry["routing"]["state"] == "running", entry["routing"]
            routed += entry["routing"]["partitions"]
        assert sorted(p["partition"] for p in routed) == list(range(6)), routed
        assert sum(p["next_offset"] for p in routed) == EVENTS, routed
        # kill -9 one: within 60 s the other two answer every key again, exactly.
        workers[2].kill9()
        killed_at = time.monotonic()
        deadline = killed_at + 60
        for w in workers[:2]:
            for name, truth in ((owners_name, owners), (balances_name, sampled)):
                left = max(1.0, deadline - time.monotonic())
                _eventually(lambda w=w, n=name, t=truth: _answers(w, n, t), left)
        elapsed = time.monotonic() - killed_at
        print(f"every key answered again {elapsed:.1f} s after kill -9")
    finally:
        for w in workers:
            w.stop()
