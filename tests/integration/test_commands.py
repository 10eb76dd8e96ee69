"""Commands against the real broker: no overdraft under concurrency, one result per command,
expected-version conflicts, idempotent resends, kill -9 of the processor, aborted transactions.

Workers run as `refold worker` subprocesses over a decider of the test's own
(`tests/integration/apps/vault.py`: the bank's rules on a unique topic); the checks read the event
and results topics themselves and compare them with each other.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from refold.cli.broker_nodes import quiet_port
from refold.core import envelope
from refold.core.commands import Decider
from refold.core.config import Config
from refold.core.projection import Projection
from refold.core.serde import Event
from refold.engine.runtime import ProjectionRunner
from refold.engine.tail import tail
from refold.kafka.command_client import CommandClient
from refold.kafka.registry import codec_for

ROOT = Path(__file__).resolve().parents[2]


class WorkerProcess:
    """`refold worker --only <decider>` in a subprocess, as a user would run it."""

    def __init__(self, config: Config, decider: Decider, data_dir: Path, http: bool = False):
        self.env = {
            **os.environ,
            "REFOLD_BOOTSTRAP_SERVERS": config.bootstrap_servers,
            "REFOLD_DATA_DIR": str(data_dir),
            "REFOLD_APP": "tests.integration.apps.vault",
            "VAULT_NAME": decider.name,
            "VAULT_TOPIC": decider.events_topic,
            "PYTHONPATH": str(ROOT),
        }
        self.name = decider.name
        self.data_dir = data_dir
        self.port = _free_port() if http else None
        self.log = data_dir.parent / f"{data_dir.name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "refold.cli.main", "worker", "--only", self.name]
        if self.port:
            args += ["--http", f"127.0.0.1:{self.port}"]
        self.proc = subprocess.Popen(
            args, env=self.env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT
        )
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill9()

    def http(self, method: str, path: str, body: Any = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=data, method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def wait_http(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.http("GET", "/healthz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"worker HTTP not up; log:\n{self.log.read_text()[-3000:]}")


_HANDED_OUT: list[int] = []


def _free_port() -> int:
    """A free loopback port below the ephemeral range (no outgoing connection takes it), never
    one handed out before in this session: two workers started back to back were once given
    the same port 0 port, and the second's requests went to the first."""
    port = quiet_port(exclude=_HANDED_OUT)
    _HANDED_OUT.append(port)
    return port


def read_events(config: Config, topic: str) -> list[Event]:
    """Every committed event on the topic (read_committed, to the end)."""
    return [
        e
        for e in tail(config, codec_for(config), topic, from_beginning=True, follow=False)
        if isinstance(e, Event)
    ]


def read_results(config: Config, topic: str) -> list[dict]:
    """Every committed record of a results topic."""
    consumer = Consumer(
        config.kafka(
            **{
                "group.id": "test-results",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            }
        )
    )
    out = []
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), 10)[1] for p in parts}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.5):
                if msg.error() is None:
                    out.append(json.loads(msg.value()))
            positions = consumer.position([TopicPartition(topic, p) for p in ends if ends[p]])
            if all(tp.offset >= ends[tp.partition] for tp in positions):
                return out
        raise AssertionError("results topic not read to its end")
    finally:
        consumer.close()


def balances(events: list[Event]) -> dict[str, list[int]]:
    """Balance after each event, per account, folded independently of refold."""
    out: dict[str, list[int]] = defaultdict(list)
    for e in sorted(events, key=lambda e: (e.partition, e.offset)):
        now = out[e.key][-1] if out[e.key] else 0
        if e.type == "bank.MoneyDeposited":
            now += e.data["amount_cents"]
        elif e.type == "bank.MoneyWithdrawn":
            now -= e.data["amount_cents"]
        out[e.key].append(now)
    return out


def check_log_matches_results(events: list[Event], results: list[dict]) -> dict[str, dict]:
    """One result per command; accepted ones' events exist exactly once at their positions;
    no event without an accepted command. Returns the results by command id."""
    counts = Counter(r["command_id"] for r in results)
    assert [c for c, n in counts.items() if n > 1] == []
    by_id = {r["command_id"]: r for r in results}
    at = {(e.partition, e.offset): e for e in events}
    by_cause = Counter(e.causation_id for e in events)
    for r in results:
        if r["status"] == "accepted":
            for pos in r["events"]:
                event = at[(pos["partition"], pos["offset"])]
                assert event.causation_id == r["command_id"] and event.type == pos["type"]
            assert by_cause[r["command_id"]] == len(r["events"])
        else:
            assert r["events"] == [] and by_cause[r["command_id"]] == 0
    assert set(by_cause) <= {c for c, r in by_id.items() if r["status"] == "accepted"}
    return by_id


def settle(client: CommandClient, ids: list[str], timeout: float = 90) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    out = {}
    for cid in ids:
        out[cid] = client.wait(cid, max(0.1, deadline - time.monotonic()))
        assert out[cid]["status"] != "pending", f"command {cid} not decided in {timeout}s"
    return out


def open_and_fund(client: CommandClient, vault: Decider, key: str, cents: int) -> None:
    for type_name, data in (
        ("bank.OpenAccount", {"owner": "ada"}),
        ("bank.Deposit", {"amount_cents": cents}),
    ):
        result = client.wait(client.send(vault.name, key, type_name, data), 60)
        assert result["status"] == "accepted", result


def test_concurrent_withdrawals_never_overdraw(config, vault, client, tmp_path):
    worker = WorkerProcess(config, vault, tmp_path / "w1").start()
    try:
        open_and_fund(client, vault, "acc-1", 10_000)
        rng = random.Random(5)
        amounts = [rng.randrange(50, 500) for _ in range(240)]  # ~65,000 asked of 10,000

        def withdraw(amount: int) -> tuple[str, int]:
            return client.send(
                vault.name, "acc-1", "bank.Withdraw", {"amount_cents": amount}
            ), amount

        with ThreadPoolExecutor(12) as pool:
            sent = list(pool.map(withdraw, amounts))
        outcome = settle(client, [cid for cid, _ in sent])
    finally:
        worker.stop()
    accepted = [amount for cid, amount in sent if outcome[cid]["status"] == "accepted"]
    rejected = [outcome[cid] for cid, _ in sent if outcome[cid]["status"] == "rejected"]
    assert accepted and rejected
    assert all(r["reason"].startswith("insufficient funds") for r in rejected)
    events = read_events(config, vault.events_topic)
    check_log_matches_results(events, read_results(config, vault.results_topic))
    trail = balances(events)["acc-1"]
    assert min(trail) >= 0
    withdrawn = [e.data["amount_cents"] for e in events if e.type == "bank.MoneyWithdrawn"]
    assert sorted(withdrawn) == sorted(accepted)
    assert trail[-1] == 10_000 - sum(accepted)
    assert trail[-1] < min(amounts)  # it only stopped when no withdrawal fitted any more


def test_http_versions_idempotency_and_bad_input(config, vault, tmp_path):
    worker = WorkerProcess(config, vault, tmp_path / "w1", http=True).start()
    try:
        worker.wait_http()
        base = f"/commands/{vault.name}"
        status, opened = worker.http(
            "POST",
            base + "?wait_ms=20000",
            {"key": "acc-7", "type": "bank.OpenAccount", "data": {"owner": "bo"}},
        )
        assert status == 200 and opened["status"] == "accepted" and opened["version"] == 1
        assert opened["events"][0]["type"] == "bank.AccountOpened"
        status, stale = worker.http(
            "POST",
            base + "?wait_ms=20000",
            {
                "key": "acc-7",
                "type": "bank.Deposit",
                "data": {"amount_cents": 5},
                "expected_version": 0,
            },
        )
        assert stale["status"] == "rejected" and stale["current_version"] == 1
        assert "conflict" in stale["reason"]
        body = {
            "command_id": "dep-once",
            "key": "acc-7",
            "type": "bank.Deposit",
            "data": {"amount_cents": 700},
            "expected_version": 1,
        }
        status, first = worker.http("POST", base, body)
        assert status == 202 and first["status_url"] == "/commands/dep-once"
        status, decided = worker.http("GET", "/commands/dep-once?wait_ms=20000")
        assert decided["status"] == "accepted" and decided["version"] == 2
        for _ in range(3):  # resent: the first result, no new events
            status, again = worker.http("POST", base + "?wait_ms=5000", body)
            assert status == 200 and {k: again[k] for k in decided} == decided
        # the same id with other data is another command: a conflict, never executed
        status, other = worker.http(
            "POST", base + "?wait_ms=5000", {**body, "data": {"amount_cents": 1}}
        )
        assert status == 409 and other["first"] == {
            "aggregate": vault.name,
            "key": "acc-7",
            "type": "bank.Deposit",
            "status": "accepted",
        }
        status, missing = worker.http("GET", "/commands/no-such-command")
        assert status == 404 and missing["error"] == "unknown command", missing
        assert worker.http("POST", "/commands/nope", body)[0] == 404
        for bad in (
            {"key": "acc-7", "type": "bank.Deposit", "data": {"amount_cents": "7"}},
            {"key": "acc-7", "type": "bank.Fly", "data": {}},
            {"type": "bank.Deposit", "data": {"amount_cents": 7}},
        ):
            status, err = worker.http("POST", base, bad)
            assert status == 422 and err["error"] == "invalid command", err
        cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "refold.cli.main",
                "command",
                vault.name,
                "--type",
                "bank.Withdraw",
                "--key",
                "acc-7",
                "--data",
                '{"amount_cents": 100}',
                "--wait",
            ],
            env=worker.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout)["version"] == 3
        bad_cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "refold.cli.main",
                "command",
                vault.name,
                "--type",
                "bank.Withdraw",
                "--key",
                "acc-7",
                "--data",
                '{"amount_cents": 0.5}',
            ],
            env=worker.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad_cli.returncode == 2 and "must be an integer" in bad_cli.stderr
    finally:
        worker.stop()
    events = read_events(config, vault.events_topic)
    assert [e.type for e in events] == [
        "bank.AccountOpened",
        "bank.MoneyDeposited",
        "bank.MoneyWithdrawn",
    ]
    assert balances(events)["acc-7"][-1] == 600
    by_id = check_log_matches_results(events, read_results(config, vault.results_topic))
    assert by_id["dep-once"]["events"][0]["offset"] == events[1].offset


def test_kill_9_mid_stream_loses_and_duplicates_nothing(config, vault, client, tmp_path):
    accounts = [f"acc-{i:02d}" for i in range(20)]
    worker = WorkerProcess(config, vault, tmp_path / "w1").start()
    for key in accounts:  # opened before the killing starts; decided by the first worker
        client.send(vault.name, key, "bank.OpenAccount", {"owner": "k9"})
    rng = random.Random(9)
    sent: list[str] = []
    done = threading.Event()

    def produce() -> None:
        for i in range(6000):
            kind = "bank.Deposit" if rng.random() < 0.55 else "bank.Withdraw"
            command = client.prepare(
                vault.name,
                {
                    "key": rng.choice(accounts),
                    "type": kind,
                    "data": {"amount_cents": rng.randrange(1, 900)},
                },
            )
            client.append(command).result(30)
            sent.append(command.command_id)
            if i % 20 == 0:
                time.sleep(0.01)  # ~2,000 commands/s, spread over the kills
        done.set()

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        for _ in range(3):
            time.sleep(rng.uniform(2.0, 5.0))
            worker.kill9()
            worker.start()
        producer.join(120)
        assert done.is_set()
        outcome = settle(client, sent, timeout=180)
    finally:
        worker.stop()
    events = read_events(config, vault.events_topic)
    by_id = check_log_matches_results(events, read_results(config, vault.results_topic))
    assert set(outcome) <= set(by_id)
    trails = balances(events)
    assert all(min(trail) >= 0 for trail in trails.values())
    assert sum(r["status"] == "accepted" for r in outcome.values()) > 1000


class Sums(Projection):
    """Sums every deposit it folds, per account (to spot events of aborted transactions)."""

    name = "sums"
    topics = ("",)

    def initial(self, key: str) -> dict[str, Any]:
        return {"cents": 0, "memos": []}

    def on_MoneyDeposited(self, state: dict[str, Any], event: Event) -> dict[str, Any]:
        state["cents"] += event.data["amount_cents"]
        state["memos"].append(event.data["memo"])
        return state


def test_projection_never_sees_events_of_an_aborted_transaction(
    config, vault, client, tmp_path, unique
):
    worker = WorkerProcess(config, vault, tmp_path / "w1").start()
    codec = codec_for(config)
    try:
        open_and_fund(client, vault, "acc-a", 1_000)
        aborter = Producer(
            config.kafka(**{"transactional.id": unique("aborter"), "partitioner": "murmur2_random"})
        )
        aborter.init_transactions(30)
        aborter.begin_transaction()
        data = {"account_id": "acc-a", "amount_cents": 999_999, "memo": "aborted"}
        aborter.produce(
            vault.events_topic,
            codec.encode("bank.MoneyDeposited", data),
            b"acc-a",
            headers=envelope.headers("bank.MoneyDeposited", source="test"),
        )
        aborter.flush(30)
        aborter.abort_transaction(30)
        # The processor itself folds past the aborted records: withdrawing more than the real
        # balance is still refused.
        cid = client.send(vault.name, "acc-a", "bank.Withdraw", {"amount_cents": 5_000})
        assert client.wait(cid, 60)["status"] == "rejected"
        cid = client.send(vault.name, "acc-a", "bank.Deposit", {"amount_cents": 1, "memo": "ok"})
        assert client.wait(cid, 60)["status"] == "accepted"
    finally:
        worker.stop()
    projection = type("AbortSums", (Sums,), {"topics": (vault.events_topic,)})()
    runner = ProjectionRunner(config, codec, projection, dead_letters=Producer(config.kafka()))
    try:
        ends = runner.assign_all()
        assert runner.run_until(ends, timeout=60)
        assert runner.store.get("acc-a") == {"cents": 1_001, "memos": ["", "ok"]}
    finally:
        runner.close()
    assert "aborted" not in {e.data.get("memo") for e in read_events(config, vault.events_topic)}
