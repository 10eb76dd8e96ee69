"""A command id means one command, with one worker or many (refold.engine.claims).

A repeat with the same body gets the first result wherever it lands; a repeat with another body
(another key, type, amount or expected version) is a conflict: 409 with the first command's key
and type, and nothing executed twice. The oracles are the event and results topics themselves.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from refold.core.commands import Decider, parse_command
from refold.core.config import Config
from refold.engine.timetravel import murmur2_partition
from refold.kafka.command_client import CommandClient

from tests.integration.conftest import PARTITIONS
from tests.integration.test_commands import WorkerProcess, read_events, read_results


def two_keys_in_different_partitions() -> tuple[str, str]:
    a = "acc-a"
    for i in range(100):
        b = f"acc-b{i}"
        if murmur2_partition(b.encode(), PARTITIONS) != murmur2_partition(a.encode(), PARTITIONS):
            return a, b
    raise AssertionError("no key in another partition")


def open_accounts(client: CommandClient, vault: Decider, *keys: str) -> None:
    for key in keys:
        cid = client.send(vault.name, key, "bank.OpenAccount", {"owner": key})
        assert client.wait(cid, 60)["status"] == "accepted"


def test_one_worker_repeat_returns_the_first_result_and_another_body_is_409(
    config: Config, vault: Decider, client: CommandClient, tmp_path
) -> None:
    worker = WorkerProcess(config, vault, tmp_path / "w", http=True).start()
    try:
        worker.wait_http()
        a, b = two_keys_in_different_partitions()
        open_accounts(client, vault, a, b)
        body = {
            "command_id": "pay-1",
            "key": a,
            "type": "bank.Deposit",
            "data": {"amount_cents": 700},
        }
        path = f"/commands/{vault.name}?wait_ms=20000"
        status, first = worker.http("POST", path, body)
        assert status == 200 and first["status"] == "accepted", first
        status, again = worker.http("POST", path, body)
        assert status == 200 and again["command_position"] == first["command_position"]
        # without wait_ms too: the first result at once, not a 202 "pending" for a decided id
        status, again = worker.http("POST", f"/commands/{vault.name}", body)
        assert status == 200 and again["command_position"] == first["command_position"], again
        assert again["status"] == "accepted" and again["status_url"] == "/commands/pay-1"
        for other in (
            {**body, "data": {"amount_cents": 701}},  # same key, another amount
            {**body, "key": b},  # another account: another partition
            {**body, "type": "bank.Withdraw"},
        ):
            status, answer = worker.http("POST", path, other)
            assert status == 409, answer
            assert answer["first"]["key"] == a and answer["first"]["type"] == "bank.Deposit"
        status, got = worker.http("GET", "/commands/pay-1")
        assert status == 200 and got["key"] == a and got["status"] == "accepted"
    finally:
        worker.stop()
    deposits = [e for e in read_events(config, vault.events_topic) if e.correlation_id == "pay-1"]
    assert [(e.key, e.data["amount_cents"]) for e in deposits] == [(a, 700)]
    results = [r for r in read_results(config, vault.results_topic) if r["command_id"] == "pay-1"]
    assert len(results) == 1


def test_two_workers_racing_one_id_for_two_accounts_execute_it_once(
    config: Config, vault: Decider, client: CommandClient, tmp_path
) -> None:
    """Both commands are durable in their partitions before either is decided, and the
    partitions belong to two workers: exactly one of each pair is executed."""
    workers = [WorkerProcess(config, vault, tmp_path / f"w{i}", http=True) for i in (1, 2)]
    for worker in workers:
        worker.start()
    try:
        for worker in workers:
            worker.wait_http()
        a, b = two_keys_in_different_partitions()
        open_accounts(client, vault, a, b)
        time.sleep(3)  # let the group settle on two members before the race
        pairs = []
        for i in range(40):
            cid, cents = f"race-{i}", 100 + i
            pairs.append(
                tuple(
                    parse_command(
                        vault,
                        {
                            "command_id": cid,
                            "key": k,
                            "type": "bank.Deposit",
                            "data": {"amount_cents": cents},
                        },
                    )
                    for k in (a, b)
                )
            )
        with ThreadPoolExecutor(8) as pool:
            futures = [client.append(c) for pair in pairs for c in pair]
            list(pool.map(lambda f: f.result(60), futures))
        outcomes = Counter()
        winners: dict[str, str] = {}
        for first, second in pairs:
            answers = [client.wait(c.command_id, 60, sent=c) for c in (first, second)]
            assert sorted(x["status"] for x in answers) == ["accepted", "conflict"], answers
            winner = next(c for c, x in zip((first, second), answers, strict=True)
                          if x["status"] == "accepted")  # fmt: skip
            winners[first.command_id] = winner.key
            outcomes[winner.key] += 1
    finally:
        for worker in workers:
            worker.stop()
    events = Counter(e.correlation_id for e in read_events(config, vault.events_topic))
    assert all(events[cid] == 1 for cid in winners), "an id was executed twice or never"
    results = Counter(r["command_id"] for r in read_results(config, vault.results_topic))
    assert all(results[cid] == 1 for cid in winners)
    by_key = {e.correlation_id: e.key for e in read_events(config, vault.events_topic)}
    assert {cid: by_key[cid] for cid in winners} == winners
