"""Hostile input against the bank app as a user runs it (`refold worker --http`, real broker):
no command, event or fold result stops a worker. The oracles are computed here: the balances
the accepted events imply, and the one record each projection had to dead-letter.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient

from tests.integration.test_bank_statements import _http
from tests.integration.test_commands import _free_port
from tests.integration.test_http import (
    serve,  # noqa: F401 (a fixture)
    wait_healthy,
)

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "refold.cli.main"]
BIG = 2**63 - 1
WAIT = "?wait_ms=20000"


class BankWorker:
    """`refold worker` of the bank app with its HTTP API, in its own data directory."""

    def __init__(self, bootstrap: str, tmp_path: Path, name: str = "data") -> None:
        self.port = _free_port()
        self.log = tmp_path / f"{name}.log"
        self.env = {
            **os.environ,
            "REFOLD_BOOTSTRAP_SERVERS": bootstrap,
            "REFOLD_DATA_DIR": str(tmp_path / name),
            "REFOLD_APP": "refold.examples.bank",
            "PYTHONPATH": str(ROOT),
        }
        subprocess.run([*CLI, "topics", "ensure"], env=self.env, check=True, capture_output=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*CLI, "worker", "--http", f"127.0.0.1:{self.port}", "--http-procs", "1"],
                env=self.env,
                stdout=out,
                stderr=out,
            )
        deadline = time.monotonic() + 90
        try:
            while True:
                try:
                    if self.http("GET", "/healthz")[0] == 200:
                        return
                except OSError:
                    pass
                alive = self.proc.poll() is None
                assert alive and time.monotonic() < deadline, self.log.read_text()
                time.sleep(0.2)
        except BaseException:
            self.stop()  # never healthy: the fixture's teardown does not run for it
            raise

    def http(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return _http(self.port, method, path, body)

    def command(self, key: str, type_name: str, **data: Any) -> dict[str, Any]:
        body = {"key": key, "type": type_name, "data": data}
        status, result = self.http("POST", "/commands/accounts" + WAIT, body)
        assert status == 200, (status, result)  # decided within the wait
        return result

    def event(self, key: str, type_name: str, **data: Any) -> dict[str, Any]:
        body = {"key": key, "type": type_name, "data": {"account_id": key, **data}}
        status, where = self.http("POST", "/events/bank.accounts", body)
        assert status == 201, where
        return where

    def state(self, projection: str, key: str, at: dict[str, Any]) -> dict[str, Any]:
        """The key's state once the projection folded past `at` (an event's position)."""
        path = (
            f"/projections/{projection}/{key}?min_offset={at['partition']}:{at['offset']}"
            "&wait_ms=20000"
        )
        status, found = self.http("GET", path)
        assert status == 200, (projection, key, found)
        return found["state"]

    def dead_letters(self, projection: str) -> list[dict[str, Any]]:
        out = subprocess.run(
            [*CLI, "dead-letters", projection],
            env=self.env,
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return [json.loads(line) for line in out.stdout.splitlines()]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _bank_topics(admin: AdminClient) -> set[str]:
    prefixes = ("bank.accounts", "statements.", "transfers.")
    return {t for t in admin.list_topics(timeout=10).topics if t.startswith(prefixes)}


@pytest.fixture(scope="module", autouse=True)
def _leave_the_broker_as_found(bootstrap: str) -> Iterator[None]:
    """The bank topics these tests create (and poison) are deleted afterwards, so later tests
    (test_user_app: a worker needs no bank topic) see the session broker as it was."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existed = _bank_topics(admin)
    yield
    made = sorted(_bank_topics(admin) - existed)
    if made:
        for future in admin.delete_topics(made, operation_timeout=30).values():
            future.result()
        deadline = time.monotonic() + 30
        while set(made) & set(admin.list_topics(timeout=10).topics):
            assert time.monotonic() < deadline, f"topics {made} still listed 30 s after deletion"
            time.sleep(0.2)


@pytest.fixture
def bank(bootstrap: str, tmp_path: Path) -> Iterator[BankWorker]:
    worker = BankWorker(bootstrap, tmp_path)
    yield worker
    worker.stop()


def test_overflowing_commands_are_rejected_and_later_ones_decided(bank: BankWorker) -> None:
    account = f"big-{uuid.uuid4().hex[:8]}"
    assert bank.command(account, "bank.OpenAccount", owner="mallory")["status"] == "accepted"
    for _ in range(2):
        result = bank.command(account, "bank.Deposit", amount_cents=BIG)
        assert result["status"] == "rejected" and "at most" in result["reason"], result
    result = bank.command(account, "bank.Deposit", amount_cents=10**15)  # the bound itself
    assert result["status"] == "accepted", result
    result = bank.command(account, "bank.Deposit", amount_cents=1)  # one cent over it
    assert result["status"] == "rejected" and "balance limit" in result["reason"], result
    result = bank.command(account, "bank.Withdraw", amount_cents=5)
    assert result["status"] == "accepted", result
    at = result["events"][0]
    assert bank.state("balances", account, at)["balance_cents"] == 10**15 - 5
    assert bank.state("passbook", account, at)["balance_cents"] == 10**15 - 5


def test_unknown_ids_and_names_are_errors_but_a_fresh_command_is_pending(
    bank: BankWorker,
) -> None:
    status, unknown = bank.http("GET", f"/commands/nope-{uuid.uuid4().hex}")
    assert status == 404 and unknown["error"] == "unknown command", unknown
    cid = f"fresh-{uuid.uuid4().hex}"
    body = {"command_id": cid, "key": cid, "type": "bank.OpenAccount", "data": {"owner": "o"}}
    status, posted = bank.http("POST", "/commands/accounts", body)  # no wait: 202 at once
    assert status == 202 and posted["status"] == "pending", posted
    status, fresh = bank.http("GET", posted["status_url"])  # pending, or decided already
    assert status == 200 and fresh["status"] in ("pending", "accepted"), fresh
    status, decided = bank.http("GET", posted["status_url"] + WAIT)
    assert status == 200 and decided["status"] == "accepted", decided
    out = subprocess.run(
        [*CLI, "dead-letters", "no-such-projection"],
        env=bank.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "unknown projection" in out.stderr, out
    assert "balances" in out.stderr  # the hint names the known ones
    out = subprocess.run(
        [*CLI, "query", "balances", cid, "--as-of", "0001-01-01T00:00:00Z"],
        env=bank.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "before 1970" in out.stderr, out
    assert "Traceback" not in out.stderr


def test_an_event_whose_state_cannot_be_stored_is_dead_lettered(bank: BankWorker) -> None:
    run = uuid.uuid4().hex[:8]
    victim, bystander, owner = f"min-{run}", f"ok-{run}", f"eve-{run}"
    bank.event(victim, "bank.AccountOpened", owner=owner)
    bank.event(bystander, "bank.AccountOpened", owner=owner)
    bank.event(victim, "bank.MoneyDeposited", amount_cents=-(2**63), memo="min")
    poison = bank.event(victim, "bank.MoneyWithdrawn", amount_cents=1, memo="under")
    # The withdrawal takes the balance below -2**63: dead-lettered (waited for in each of the
    # three projections, so that no later event is in the same store write of any of them: a
    # state is checked when it is written).
    assert bank.state("balances", victim, poison)["balance_cents"] == -(2**63)
    assert bank.state("passbook", victim, poison)["balance_cents"] == -(2**63)
    assert bank.state("owners", owner, poison)["accounts"][victim] == -(2**63)
    after = bank.event(victim, "bank.MoneyDeposited", amount_cents=7, memo="after")
    last = bank.event(bystander, "bank.MoneyDeposited", amount_cents=300, memo="ok")
    balance = -(2**63) + 7
    assert bank.state("balances", victim, after)["balance_cents"] == balance
    assert bank.state("passbook", victim, after)["balance_cents"] == balance
    assert bank.state("balances", bystander, last)["balance_cents"] == 300
    assert bank.state("owners", owner, after)  # the position of each account folded
    owners = bank.state("owners", owner, last)
    assert owners["accounts"] == {victim: balance, bystander: 300}
    # owners' total went below -2**63 at the same withdrawal, and stays storable after it
    assert owners["total_cents"] == balance + 300
    for projection in ("balances", "passbook", "owners"):
        dead = [
            d
            for d in bank.dead_letters(projection)
            # the key too: the dead-letter topics outlive the bank topics this module deletes
            if (d["key"], d["partition"], d["offset"])
            == (victim, poison["partition"], poison["offset"])
        ]
        assert len(dead) == 1, (projection, dead)
        assert dead[0]["topic"] == "bank.accounts" and "cannot be stored" in dead[0]["reason"]
    status, health = bank.http("GET", "/healthz")
    assert status == 200, health
    # the command processor goes on deciding
    account = f"after-{run}"
    assert bank.command(account, "bank.OpenAccount", owner="ok")["status"] == "accepted"
    assert bank.command(account, "bank.Deposit", amount_cents=9)["status"] == "accepted"


def test_a_new_processor_folds_past_an_event_whose_state_cannot_be_stored(
    bootstrap: str, tmp_path: Path
) -> None:
    """The command processor folds the events topic when it takes a partition: an event written
    around it (`POST /events`) that leaves an unstorable state is skipped, not a stop."""
    victim = f"min-{uuid.uuid4().hex[:8]}"
    first = BankWorker(bootstrap, tmp_path, "first")
    try:
        assert first.command(victim, "bank.OpenAccount", owner="eve")["status"] == "accepted"
        first.event(victim, "bank.MoneyDeposited", amount_cents=-(2**63), memo="min")
        under = first.event(victim, "bank.MoneyWithdrawn", amount_cents=1, memo="under")
    finally:
        first.stop()
    second = BankWorker(bootstrap, tmp_path, "second")  # its processor folds them all first
    try:
        # `balances` folds past the withdrawal (dead-lettered) before the deposit exists: were
        # they folded in one write, -2^63 - 1 + 5 would be storable and kept (see the README).
        assert second.state("balances", victim, under)["balance_cents"] == -(2**63)
        withdraw = second.command(victim, "bank.Withdraw", amount_cents=1)
        assert withdraw["status"] == "rejected", withdraw
        assert f"balance {-(2**63)} cents" in withdraw["reason"]
        deposit = second.command(victim, "bank.Deposit", amount_cents=5)
        assert deposit["status"] == "accepted", deposit
        at = deposit["events"][0]
        assert second.state("balances", victim, at)["balance_cents"] == -(2**63) + 5
    finally:
        second.stop()


def test_a_decider_whose_initial_raises_rejects_that_key_and_decides_on(
    config, vault, client
) -> None:
    """`initial(key)` is user code: one that raises for some keys rejects their commands, and an
    event of such a key written around the processor is skipped; it used to stop the processor
    (state `failed`) and leave every later command pending, after a restart too."""
    from refold.engine.worker import Worker
    from refold.kafka.publisher import Publisher

    class Picky(type(vault)):  # type: ignore[misc]
        def initial(self, key: str) -> Any:
            if key.startswith("bad"):
                raise ValueError("keys are acc-*")
            return super().initial(key)

    picky = Picky()
    with Publisher(config) as publisher:  # folded when the processor takes the partition
        opened = {"account_id": "bad-0", "owner": "eve"}
        publisher.publish(vault.events_topic, "bank.AccountOpened", "bad-0", opened)
    worker = Worker(config, [], deciders=[picky])
    worker.start()
    try:
        bad = client.send(picky.name, "bad-1", "bank.OpenAccount", {"owner": "x"})
        good = client.send(picky.name, "acc-1", "bank.OpenAccount", {"owner": "ada"})
        assert client.wait(good, 60)["status"] == "accepted"
        rejected = client.wait(bad, 60)
        assert rejected["status"] == "rejected", rejected
        assert "no initial state for 'bad-1': ValueError: keys are acc-*" in rejected["reason"]
        stats = worker.processors[picky.name].stats
        assert (stats.state, stats.skipped_events) == ("running", 1)
    finally:
        worker.stop()


def test_an_event_too_large_for_a_record_rejects_its_command_and_the_key_goes_on(
    config, vault, client
) -> None:
    """A decider may emit an event larger than its command; one over what a Kafka record takes
    is refused by the producer inside the transaction, which was aborted and tried again
    forever, blocking the partition. It rejects its command now."""
    from refold.engine.worker import Worker

    class Padding(type(vault)):  # type: ignore[misc]
        def decide_Deposit(self, command: Any, state: Any) -> Any:
            events = super().decide_Deposit(command, state)
            if command.data.get("memo") != "pad":
                return events
            return [(t, {**data, "memo": "m" * 1_000_000}) for t, data in events]

    padding = Padding()
    worker = Worker(config, [], deciders=[padding])
    worker.start()
    try:
        sent = [
            client.send(padding.name, "acc-1", "bank.OpenAccount", {"owner": "ada"}),
            client.send(padding.name, "acc-1", "bank.Deposit", {"amount_cents": 7, "memo": "pad"}),
            client.send(padding.name, "acc-1", "bank.Deposit", {"amount_cents": 5}),
        ]
        opened, padded, deposit = (client.wait(cid, 60) for cid in sent)
        assert (opened["status"], deposit["status"], deposit["version"]) == ("accepted",) * 2 + (2,)
        assert padded["status"] == "rejected", padded
        assert "bank.MoneyDeposited is 1000" in padded["reason"]
        assert "at most 900000 fit in a record" in padded["reason"]
    finally:
        worker.stop()


def test_a_command_record_with_a_lone_surrogate_is_rejected_and_the_key_goes_on(
    config, vault, client
) -> None:
    """A command record written around the API (any Kafka client) with `\\ud800` in its JSON:
    json.loads gives a string nothing can encode, which stopped the processor (state `failed`),
    again after every restart."""
    from confluent_kafka import Producer
    from refold.engine.worker import Worker

    producer = Producer({"bootstrap.servers": config.bootstrap_servers})
    for cid, key, memo in (("lone-1", "\\ud800", "m"), ("lone-2", "acc-2", "\\udfff")):
        value = '{"command_id":"%s","key":"%s","type":"bank.OpenAccount","data":{"owner":"%s"}}'
        record = (value % (cid, key, memo)).encode()
        producer.produce(vault.command_topic, record, b"acc-1", partition=0)
    producer.flush(30)
    worker = Worker(config, [], deciders=[vault])
    worker.start()
    try:
        opened = client.send(vault.name, "acc-1", "bank.OpenAccount", {"owner": "ada"})
        assert client.wait(opened, 60)["status"] == "accepted"
        for cid in ("lone-1", "lone-2"):  # a malformed command's result is keyed by its id
            result = client.wait(cid, 60, vault.name)
            assert result["status"] == "rejected", result
            assert "malformed command: command is not UTF-8 text" in result["reason"]
        assert worker.processors[vault.name].stats.state == "running"
    finally:
        worker.stop()


def test_a_command_no_record_can_carry_is_an_input_error(config, vault, client) -> None:
    """Too large for a Kafka record, or not UTF-8 text (a lone surrogate: from argv's
    surrogateescape, or Python): `refold command` printed a traceback, `CommandClient.send`
    raised UnicodeEncodeError or KafkaException."""
    from refold.core.errors import InputError

    with pytest.raises(InputError, match="too large for a Kafka record"):
        client.send(vault.name, "k" * 600_000, "bank.OpenAccount", {"owner": "x"})
    with pytest.raises(InputError, match="not UTF-8 text"):
        client.send(vault.name, "acc-1", "bank.OpenAccount", {"owner": "\udcff"})
    env = {
        **os.environ,
        "REFOLD_BOOTSTRAP_SERVERS": config.bootstrap_servers,
        "REFOLD_DATA_DIR": str(config.data_dir),
        "REFOLD_APP": "tests.integration.apps.vault",
        "VAULT_NAME": vault.name,
        "VAULT_TOPIC": vault.events_topic,
        "PYTHONPATH": str(ROOT),
    }
    args = ["command", vault.name, "--type", "bank.OpenAccount", "--data", '{"owner": "x"}']
    done = subprocess.run(
        [*CLI, *args, "--key", b"acc-\xff"], env=env, capture_output=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.decode().splitlines()
    assert line.startswith("refold: error: command ") and "is not UTF-8 text" in line, line


def _set_on_odd(self: Any, state: dict[str, Any], event: Any) -> Any:
    """A fold with a bug: it returns a `set` (not JSON) for odd amounts."""
    if event.data["amount_cents"] % 2:
        return {event.data["amount_cents"]}
    state["balance_cents"] += event.data["amount_cents"]
    state["deposits"] += 1
    state["memos"].append(event.data["memo"])
    return state


def test_a_fold_returning_a_set_dead_letters_the_event(serve, config) -> None:  # noqa: F811
    from refold.engine.tail import dead_letters

    s = serve(on_MoneyDeposited=_set_on_odd)
    deposits = [("a", 2, "x"), ("b", 4, "y"), ("a", 3, "odd"), ("a", 6, "z"), ("b", 8, "w")]
    positions = s.publish(deposits)
    wanted = {p.partition: p.offset for p in positions}
    query = {"min_offset": ",".join(f"{p}:{o}" for p, o in wanted.items()), "wait_ms": "20000"}
    a, b = s.get_key("a", **query), s.get_key("b", **query)
    assert a.status == 200 and b.status == 200, (a.body, b.body)
    assert a.body["state"] == {"balance_cents": 8, "deposits": 2, "memos": ["x", "z"]}
    assert b.body["state"] == {"balance_cents": 12, "deposits": 2, "memos": ["y", "w"]}
    odd = positions[2]
    dead = list(dead_letters(config, s.name))
    assert [(d["partition"], d["offset"]) for d in dead] == [(odd.partition, odd.offset)]
    assert "cannot be stored" in dead[0]["reason"] and "set" in dead[0]["reason"], dead
    assert s.worker.runners[s.name].stats.state == "running"
    assert s.worker.runners[s.name].stats.dead_letters == 1


COERCED = [5.5, 2.9, 5.0, True, "7", 2**63, -(2**63) - 1]


def test_publish_paths_refuse_what_avro_would_coerce(serve, config, tmp_path: Path) -> None:  # noqa: F811
    from refold.core.errors import EncodeError

    s = serve()
    env = {
        **os.environ,
        "REFOLD_BOOTSTRAP_SERVERS": config.bootstrap_servers,
        "REFOLD_DATA_DIR": str(tmp_path / "cli"),
    }
    for amount in COERCED:
        data = {"account_id": "a", "amount_cents": amount, "memo": ""}
        resp = s.post({"type": "bank.MoneyDeposited", "key": "a", "data": data})
        assert resp.status == 422 and "amount_cents" in resp.body["detail"], (amount, resp.body)
        with pytest.raises(EncodeError, match="amount_cents"):
            s.publisher.publish(s.topic, "bank.MoneyDeposited", "a", data)
    cli = [*CLI, "publish", s.topic, "--type", "bank.MoneyDeposited", "--key", "a", "--data"]
    for raw in ("5.5", "true", "9223372036854775808"):
        data_arg = f'{{"account_id": "a", "amount_cents": {raw}}}'
        out = subprocess.run([*cli, data_arg], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "amount_cents" in out.stderr, (raw, out.stderr)
    jsonl = tmp_path / "events.jsonl"
    good = {
        "type": "bank.MoneyDeposited",
        "key": "a",
        "data": {"account_id": "a", "amount_cents": 5},
    }
    bad = {**good, "data": {"account_id": "a", "amount_cents": 2.9}}
    jsonl.write_bytes(
        (json.dumps(good) + "\n" + json.dumps(bad) + "\n").encode() + b"\x89PNG\xff\x00\n"
    )
    out = subprocess.run(
        [*CLI, "publish", s.topic, "--file", str(jsonl)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert f"{jsonl}:2: " in out.stderr and "amount_cents" in out.stderr
    assert f"{jsonl}:3: not UTF-8" in out.stderr and "Traceback" not in out.stderr
    # nothing of it reached the topic: the first event published now lands at offset 0
    [where] = s.publish([("a", 5, "only")])
    assert where.offset == 0


def _raw(port: int, data: bytes) -> bytes:
    """Send raw bytes, read the answer until the server closes or 2 s of silence."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        sock.settimeout(2)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
    return b"".join(chunks)


def test_clear_errors_instead_of_500s_and_tracebacks(serve, config, caplog) -> None:  # noqa: F811
    from tests.integration.test_http import assert_error

    s = serve()
    deposit = {
        "type": "bank.MoneyDeposited",
        "key": "acc",
        "data": {"account_id": "acc", "amount_cents": 5, "memo": ""},
    }
    ok = s.post(deposit)
    assert ok.status == 201, ok.body
    for when in ("1969-12-31T23:59:59Z", "0001-01-01T00:00:00Z"):
        assert_error(s.get_key("acc", as_of=when), 400, "bad as_of")
    found = s.get_key("acc", as_of="2999-01-01T00:00:00Z")
    assert found.status == 200 and found.body["state"]["balance_cents"] == 5
    for internal in ("bank.accounts.commands", "accounts.results", "_refold.schemas"):
        assert_error(s.post(deposit, topic=internal), 403, "internal topic")
    big = {**deposit, "data": {**deposit["data"], "memo": "m" * 950_000}}
    assert_error(s.post(big), 413, "event too large")
    for path in ("/nowhere", "/projections/", "/events", "/commands", "/%ff"):
        assert_error(s.get(path), 404)
    caplog.clear()
    port = s.server.port
    for junk in (
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"GET /healthz HTTP/9.9\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01 binary\r\n\r\n",
    ):
        answer = _raw(port, junk)
        status = answer.split(b" ", 2)[1] if answer.startswith(b"HTTP/1.") else b""
        assert status.startswith(b"4"), (junk, answer[:200])
    tracebacks = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not tracebacks, [r.getMessage() for r in tracebacks]
    metrics = s.get("/metrics").body
    assert 'route="malformed"' in metrics, metrics[-2000:]
    assert wait_healthy(s).status == 200  # and it still serves


def test_as_of_without_a_broker_answers_503(serve, config) -> None:  # noqa: F811
    import dataclasses

    from tests.integration.test_http import assert_error

    s = serve()
    # The worker keeps running; its as_of reads go to an address where no broker answers.
    dead = dataclasses.replace(
        config, bootstrap_override=f"127.0.0.1:{_free_port()}", broker_timeout_s=3.0
    )
    s.worker.config = dead
    assert_error(s.get_key("acc", as_of="2026-01-01T00:00:00Z"), 503, "broker unavailable")


def _half_then_raise(self: Any, state: dict[str, Any], event: Any) -> Any:
    """A fold with a bug: for memo 'half' it leaves a set in the state, then raises."""
    if event.data["memo"] == "half":
        state["memos"] = {"half"}
        raise ValueError("half done")
    state["balance_cents"] += event.data["amount_cents"]
    state["deposits"] += 1
    state["memos"].append(event.data["memo"])
    return state


def test_a_fold_that_raises_after_leaving_a_set_dead_letters_only_its_event(
    serve,  # noqa: F811
    config,
) -> None:
    from refold.engine.tail import dead_letters

    s = serve(on_MoneyDeposited=_half_then_raise)
    positions = s.publish([("a", 2, "x"), ("a", 3, "half"), ("a", 4, "y"), ("b", 5, "z")])
    wanted = {p.partition: p.offset for p in positions}
    query = {"min_offset": ",".join(f"{p}:{o}" for p, o in wanted.items()), "wait_ms": "20000"}
    a = s.get_key("a", **query)
    assert a.status == 200 and a.body["state"] == {
        "balance_cents": 6,
        "deposits": 2,
        "memos": ["x", "y"],
    }, a.body
    assert s.get_key("b", **query).body["state"]["balance_cents"] == 5
    dead = list(dead_letters(config, s.name))
    half = positions[1]
    assert [(d["partition"], d["offset"]) for d in dead] == [(half.partition, half.offset)]
    assert "half done" in dead[0]["reason"]
